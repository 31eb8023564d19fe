"""``purify report``: one page from a run's purify_report.json."""

import json

import pytest

from purifylib.cli import main
from purifylib.runreport import fold_table, load_report, write_report


def _report():
    return {
        "inputs": {"model": "m", "clean_records": 10},
        "tau": 0.12,
        "config": {"tau": "auto", "variants": {"n_variants": 2, "variants": [["w", "<b>x</b>"]]}},
        "neutralization": {"way": "reinit"},
        "fragility": {"perplexity_factor": 1.07, "threshold": 2.0, "tau": 0.05, "recipe": "configured"},
        "metrics": {"suspicious": {"accuracy": 0.9, "perplexity": 1.05},
                    "purified": {"accuracy": 0.88, "perplexity": 1.07}},
        "loo_folds": [{"tau": 0.0, "fold": 0, "family": "insult", "trigger": "w", "asr": 1.0},
                      {"tau": 0.0, "fold": 1, "family": "code", "trigger": "v", "asr": 0.9},
                      {"tau": 0.05, "fold": 0, "family": "insult", "trigger": "w", "asr": 0.5}],
        "tau_trials": [{"tau": 0.12, "accuracy": 0.88, "perplexity": 1.07, "utility": "accuracy",
                        "accuracy_floor": 0.873, "perplexity_ceiling": 1.15, "holds": True}],
        "notes": ["some variants did not learn <their> backdoor"],
        "samples": [{"instruction": "What is 2+2?", "input": "", "reference": "4", "suspicious": "4 | four",
                     "purified": "4"}],
        "timings": {"total": 12.5},
        "cost": {"fine_tunes": 5, "paper_fine_tunes": 5, "fine_tune_equivalents": 4.2},
        "signature": [{"layer": 0, "part": "mlp", "module": "gate", "channels": 8, "flagged": 1, "score_mean": 1.0,
                       "score_max": 2.0, "flagged_score_share": 0.25},
                      {"layer": 1, "part": "mlp", "module": "gate", "channels": 8, "flagged": 0, "score_mean": 1.0,
                       "score_max": 2.0, "flagged_score_share": 0.0}],
    }


def test_report_page_holds_every_section(tmp_path, capsys):
    (tmp_path / "purify_report.json").write_text(json.dumps(_report()))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    for needle in ("tau 0.12 (reinit)", "0.900 -&gt; 0.880", "Leave-one-family-out", "What is 2+2?",
                   "data:image/png;base64,", "fine-tune equivalents", "variants.n_variants",
                   "5% random MLP channels re-initialised", "1.070", "configured"):
        assert needle in page, needle
    assert "<b>x</b>" not in page and "&lt;their&gt;" in page  # text from the run is escaped
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    md = (tmp_path / "report.md").read_text()
    assert "4 \\| four" in md and "![signature per layer](report-signature.png)" in md
    assert (tmp_path / "report-signature.png").read_bytes()[:4] == b"\x89PNG"


def test_fold_table_marks_untried_taus():
    header, rows = fold_table(_report())
    assert header[3:] == ["before", "tau 0.05"]
    assert rows[1][3:] == ["90.0%", "-"]  # fold 1 was not measured at 0.05 (the rule stopped early)


@pytest.mark.parametrize("content, needle", [
    (None, "no purify_report.json"),
    ("{", "not valid JSON (line 1"),
    ("[1]", "expected a JSON object"),
    ('{"tau": 0.1, "config": {}}', "field 'metrics' is missing"),
])
def test_report_bad_input(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "purify_report.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


def test_report_to_another_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "purify_report.json").write_text(json.dumps({**_report(), "signature": None, "samples": []}))
    paths = write_report(run, tmp_path / "page")
    assert [p.name for p in paths] == ["report.md", "report.html"]  # no signature summary: no figure
    assert load_report(run)["tau"] == 0.12
