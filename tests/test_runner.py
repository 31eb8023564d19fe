import json

import nbformat
import pytest

from purifylib import PurifyError
from purifylib.runner import load_preset, run


def make_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("preset = 'smoke'\nvalue = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(nb, path)


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "notebooks"
    (d / "params").mkdir(parents=True)
    make_notebook(d / "00_first.ipynb", "import pandas as pd\nfrom purifylib import reports\n"
                  "reports.save_table(pd.DataFrame({'v': [value]}), 'table_v', caption='the value')\n"
                  "reports.record_metrics('first', {'value': value, 'preset': preset})")
    make_notebook(d / "01_second.ipynb", "assert value < 10, 'value too big'")
    (d / "params" / "good.yaml").write_text("00_first:\n  value: 7\n")
    (d / "params" / "bad.yaml").write_text("01_second:\n  value: 11\n")
    (d / "params" / "typo.yaml").write_text("02_missing: {}\n")
    (d / "params" / "broken.yaml").write_text("00_first: [1, 2\n")
    (d / "params" / "shared.yaml").write_text("shared:\n  value: 5\n01_second:\n  value: 3\n")
    (d / "params" / "stray.yaml").write_text("shared:\n  valeu: 5\n")
    return d


@pytest.mark.slow
def test_runs_in_order_with_preset_values(books, tmp_path):
    out = tmp_path / "reports"
    done = run("good", notebooks_dir=books, reports=out, progress=False)
    assert [p.name for p in done] == ["00_first.ipynb", "01_second.ipynb"]
    assert json.loads((out / "metrics" / "first.json").read_text()) == {"value": 7, "preset": "good"}
    assert (out / "tables" / "table_v.csv").read_text().splitlines() == ["v", "7"]
    index = (out / "README.md").read_text()
    assert "tables/table_v.md" in index and "00_first.ipynb" in index and "the value" in index
    only = run("good", only=["01"], notebooks_dir=books, reports=tmp_path / "r2", progress=False)
    assert [p.name for p in only] == ["01_second.ipynb"]
    # a shared block reaches every notebook that declares the name; a notebook's own entry wins
    run("shared", notebooks_dir=books, reports=tmp_path / "r3", progress=False)
    assert json.loads((tmp_path / "r3" / "metrics" / "first.json").read_text())["value"] == 5
    second = nbformat.read(tmp_path / "r3" / "executed" / "01_second.ipynb", as_version=4)
    assert "value = 3" in second.cells[1].source and "value = 5" not in second.cells[1].source


def test_failing_notebook_stops_with_cell_and_error(books, tmp_path):
    with pytest.raises(PurifyError, match=r"01_second.ipynb: cell In \[3\] \(assert value < 10.*\) failed: "
                       r"AssertionError: value too big \(executed copy: .*01_second.ipynb\)"):
        run("bad", notebooks_dir=books, reports=tmp_path / "r", progress=False)


def test_preset_errors(books, tmp_path):
    with pytest.raises(PurifyError, match="unknown preset 'nope' \\(choose from bad, broken, good, shared, stray, typo\\)"):
        load_preset("nope", books)
    with pytest.raises(PurifyError, match="broken.yaml: invalid YAML"):
        load_preset("broken", books)
    with pytest.raises(PurifyError, match="unknown notebooks: 02_missing"):
        run("typo", notebooks_dir=books, reports=tmp_path / "r", progress=False)
    with pytest.raises(PurifyError, match="shared parameter\\(s\\) valeu are declared by no notebook"):
        run("stray", notebooks_dir=books, reports=tmp_path / "r", progress=False)
    with pytest.raises(PurifyError, match="--only 07 matches no notebook"):
        run("good", only=["07"], notebooks_dir=books, reports=tmp_path / "r", progress=False)


def test_index_names_the_paper_claim(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from purifylib import reports

    reports.save_table(pd.DataFrame({"a": [1]}), "table1_sanity", caption="t1", root=tmp_path)
    reports.save_figure(plt.figure(), "fig02_effect_of_n", caption="n", root=tmp_path)
    reports.save_table(pd.DataFrame({"a": [1]}), "table_other", caption="x", root=tmp_path)
    text = reports.write_index_readme(tmp_path).read_text()
    assert "| Finding 1 (Table 1): the backdoor lives in the MLP | [tables/table1_sanity.md]" in text
    assert "| effect of N (Fig. 2) | [figures/fig02_effect_of_n.png]" in text
    assert "|  | [tables/table_other.md]" in text  # no claim: an empty cell, listed last
    assert text.index("table1_sanity") < text.index("fig02_effect") < text.index("table_other")
    assert "Held-out attack grids" not in text
    reports.record_metrics("grid", {"cells": 1}, root=tmp_path / "grid")
    assert "Held-out attack grids (the paper's Table 2" in reports.write_index_readme(tmp_path).read_text()
    assert "[grid/](grid/README.md)" in (tmp_path / "README.md").read_text()
    assert "Other records" not in (tmp_path / "README.md").read_text()
    (tmp_path / "screen").mkdir()
    (tmp_path / "screen" / "README.md").write_text("# a screen")
    text = reports.write_index_readme(tmp_path).read_text()
    assert "Other records: [screen/](screen/README.md)." in text and "[grid/](grid/README.md)." in text


def test_two_writers_of_one_figure_do_not_move_each_others_temporaries(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from purifylib import reports

    fig = plt.figure()
    real = fig.savefig

    def interleaved(path, **kw):  # another run saves the same figure while this one is between its two steps
        real(path, **kw)
        with monkeypatch.context() as m:
            m.setattr(reports.os, "getpid", lambda: 1)
            reports.save_figure(plt.figure(), "fig_shared", root=tmp_path)

    monkeypatch.setattr(fig, "savefig", interleaved)
    paths = reports.save_figure(fig, "fig_shared", root=tmp_path)
    assert all(p.is_file() for p in paths)
    assert not [p.name for p in (tmp_path / "figures").iterdir() if ".tmp" in p.name]


def test_compare_metrics_names_changed_conclusions(tmp_path):
    import json

    from purifylib.reports import compare_metrics

    old, new = tmp_path / "old", tmp_path / "new"
    rows = [{"model": "badnets", "asr": 0.0, "meets_targets": True, "clean_accuracy": 0.80, "perplexity": 1.20},
            {"model": "vpi", "asr": 0.05, "meets_targets": True, "clean_accuracy": 0.81, "perplexity": 1.21}]
    moved = [dict(rows[1], asr=0.30, clean_accuracy=0.75), dict(rows[0], meets_targets=False, perplexity=1.21)]
    for root, models, verdict in ((old, rows, "holds"), (new, moved, "fails")):
        (root / "metrics").mkdir(parents=True)
        (root / "metrics" / "00.json").write_text(json.dumps({"models": models, "verdict": [verdict],
                                                               "config": {"seed": len(models)}}))
    changed = compare_metrics(old, new)
    assert sorted(changed["conclusions"]) == [
        "00: models.badnets.meets_targets: True -> False",
        "00: models.vpi.asr: 0.050 -> 0.300 (crosses 10%)",
        "00: verdict: 'holds' -> 'fails'"]
    assert changed["numbers"] == ["00: models.vpi.clean_accuracy: 0.810 -> 0.750"]  # perplexity moved < 5%
    assert compare_metrics(old, old) == {"conclusions": [], "numbers": [], "missing": []}


@pytest.mark.slow
def test_inner_progress_reaches_the_terminal_and_kernels_use_no_tcp(books, tmp_path, capfd):
    make_notebook(books / "00_first.ipynb", "from purifylib.progress import bar\n"
                  "for _ in bar(range(3), desc='inner work'):\n    pass")
    (books / "params" / "one.yaml").write_text("00_first: {}\n")
    run("one", notebooks_dir=books, reports=tmp_path / "r", progress=True)
    err = capfd.readouterr().err
    assert "inner work" in err and "3/3" in err  # the cell's own bar, as text, on our stderr
    assert "without encryption" not in err and "TCP" not in err


def test_only_the_default_preset_writes_the_committed_reports(monkeypatch):
    from purifylib.reports import REPO_ROOT, reports_dir
    from purifylib.runner import default_reports

    assert default_reports("default") == REPO_ROOT / "reports"
    assert default_reports("smoke") == REPO_ROOT / "reports" / "smoke"
    monkeypatch.delenv("PURIFY_REPORTS_DIR", raising=False)
    assert reports_dir() == REPO_ROOT / "reports" / "interactive"  # a notebook run by hand
    monkeypatch.setenv("PURIFY_REPORTS_DIR", "/somewhere")
    assert str(reports_dir()) == "/somewhere" and str(reports_dir("/given")) == "/given"


def test_a_cell_past_the_timeout_fails_the_run_with_its_notebook(books, tmp_path, monkeypatch):
    import purifylib.runner as runner

    monkeypatch.setattr(runner, "CELL_TIMEOUT_S", 2)
    make_notebook(books / "00_first.ipynb", "import time\ntime.sleep(30)")
    (books / "params" / "slow.yaml").write_text("00_first: {}\n")
    with pytest.raises(PurifyError, match=r"00_first.ipynb: a cell ran past 2 s and was stopped"):
        run("slow", notebooks_dir=books, reports=tmp_path / "r", progress=False)


def test_the_tuner_is_one_static_preview_in_a_headless_run(monkeypatch):
    import purifylib.widgets as widgets

    calls = []
    monkeypatch.setenv(widgets.HEADLESS, "1")
    monkeypatch.setattr(widgets, "preview", lambda t, **kw: calls.append(kw) or {})
    png = b"\x89PNG\r\n\x1a\n" + bytes(16)
    monkeypatch.setattr(widgets, "rendered", lambda t, p: {"table": "<table></table>", "note": "", "figure": png,
                                                           "samples": "<table></table>"})
    from types import SimpleNamespace

    assert widgets.tuner(SimpleNamespace(synthetic_learnt=True), tau=0.12) is None  # no widgets to leave behind
    assert calls == [{"tau": 0.12, "strength": 1.0, "lam": 0.01}]
