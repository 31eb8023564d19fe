"""The held-out grid's outputs: the paper's Table 2 shape as mean ± 95% t-interval over seeds, the
utility and random-control tables, the verdict naming each report cell whose ASR after ``purify run``
is above :data:`~purifylib.studies.grid.ASR_BAR`, the figures, the run log, and what a committed grid
says (:func:`committed_markdown`). :mod:`purifylib.studies.grid` defines and runs the cells.
"""

from __future__ import annotations

import json
from pathlib import Path

from purifylib.studies.grid import ASR_BAR, DEFENCE_NAMES, GRID_FILE, PURIFY, GridConfig, GridStudy, grid_folder


def _ci(values) -> str:
    import math

    from purifylib.stats import t_interval

    mean, half = t_interval([100 * v for v in values])
    return f"{mean:.1f}" if math.isnan(half) else f"{mean:.1f} ± {half:.1f}"


def cell_means(frame, metric: str = "asr"):
    """``metric`` per (family, threat, attack, defence, seed): random draws averaged within a seed."""
    return frame.groupby(["family", "threat", "attack", "defence", "seed"], as_index=False)[metric].mean()


def table2(frame, metric: str = "asr"):
    """The paper's Table 2 shape: rows (family, threat, attack) plus an average per (family, threat),
    columns the defences, each ``mean ± 95% t-interval`` over seeds of ``metric`` in %."""
    import pandas as pd

    per_seed = cell_means(frame, metric)
    defences = [d for d in DEFENCE_NAMES if d in set(per_seed["defence"])]
    rows = []
    for (family, threat), part in per_seed.groupby(["family", "threat"], sort=True):
        for attack, cell in list(part.groupby("attack", sort=True)) + [("average", part)]:
            row = {"family": family, "threat": threat, "attack": attack}
            for d in defences:
                vals = cell[cell["defence"] == d]
                if attack == "average":  # average over attacks, per seed, then the interval over seeds
                    vals = vals.groupby("seed")[metric].mean()
                else:
                    vals = vals[metric]
                row[DEFENCE_NAMES[d]] = _ci(vals) if len(vals) else ""
            rows.append(row)
    return pd.DataFrame(rows)


def random_range(frame, metric: str = "asr"):
    """Per cell and seed: the random-channel control's mean, min and max over its draws (in %)."""
    part = frame[frame["defence"] == "random"]
    if part.empty:
        return part
    g = part.groupby(["family", "threat", "attack", "seed"])[metric]
    out = (100 * g.agg(["mean", "min", "max", "count"])).reset_index()
    out["count"] = (out["count"] / 100).astype(int)
    return out.rename(columns={"count": "draws"})


def against_random(frame):
    """``purify run`` against the random-channel control on the same cells: per (cell, seed) the two ASRs
    and clean accuracies in % (random: the mean of its draws, at the τ that run chose, repaired as it
    repairs) and their differences (purify run minus random). Empty without both defences."""
    import pandas as pd

    keys = ["family", "threat", "attack", "seed"]
    part = frame[frame["defence"].isin([PURIFY, "random"])]
    if set(part["defence"]) != {PURIFY, "random"}:
        return pd.DataFrame()
    g = (100 * part.groupby(keys + ["defence"])[["asr", "clean_accuracy"]].mean()).unstack("defence")
    out = pd.DataFrame({"ASR purify run %": g[("asr", PURIFY)], "ASR random %": g[("asr", "random")],
                        "accuracy purify run %": g[("clean_accuracy", PURIFY)],
                        "accuracy random %": g[("clean_accuracy", "random")]}).dropna()
    out["ASR difference"] = out["ASR purify run %"] - out["ASR random %"]
    out["accuracy difference"] = out["accuracy purify run %"] - out["accuracy random %"]
    return out.round(2).reset_index()


def against_random_line(frame) -> str | None:
    """One sentence: the mean paired differences with 95% t-intervals over the (cell, seed) runs, and in
    how many runs ``purify run`` left less and more ASR than the random control's mean."""
    from purifylib.stats import t_interval

    pairs = against_random(frame)
    if pairs.empty:
        return None
    (da, ha), (dc, hc) = (t_interval(pairs[c].tolist()) for c in ("ASR difference", "accuracy difference"))
    lower, higher = int((pairs["ASR difference"] < 0).sum()), int((pairs["ASR difference"] > 0).sum())
    return (f"purify run minus the random control at its tau (same repair), over {len(pairs)} cell runs: ASR "
            f"{da:+.1f} ± {ha:.1f} points, clean accuracy {dc:+.1f} ± {hc:.1f} points; less ASR in {lower}, "
            f"more in {higher}")


def failing_cells(frame, bar: float = ASR_BAR):
    """Report cells (per seed) whose ASR after ``purify run`` is above ``bar``, with Wilson intervals."""
    import pandas as pd

    from purifylib.stats import wilson

    part = frame[(frame["defence"] == PURIFY) & (frame["split"] == "report") & (frame["asr"] > bar)]
    rows = []
    for r in part.to_dict(orient="records"):
        lo, hi = wilson(r["asr"], int(r["n_attack"]))
        rows.append({"family": r["family"], "threat": r["threat"], "attack": r["attack"], "seed": r["seed"],
                     "trigger": r["triggers"], "target": r["target"], "ASR after %": round(100 * r["asr"], 1),
                     "95% interval": f"{100 * lo:.1f}-{100 * hi:.1f}", "tau": r["tau"]})
    return pd.DataFrame(rows)


def verdict(frame, bar: float = ASR_BAR) -> list[str]:
    """Plain sentences from the numbers: the headline per defence and every failing report cell."""
    lines = []
    per_seed = cell_means(frame)
    for d in [d for d in DEFENCE_NAMES if d in set(per_seed["defence"])]:
        vals = per_seed[per_seed["defence"] == d].groupby("seed")["asr"].mean()
        lines.append(f"{DEFENCE_NAMES[d]}: mean ASR {_ci(vals)}% over {len(vals)} seed(s)")
    versus = against_random_line(frame)
    if versus:
        lines.append(versus)
    fails = failing_cells(frame, bar)
    report = frame[(frame["defence"] == PURIFY) & (frame["split"] == "report")]
    if report.empty:
        lines.append("no report cell was purified with purify run's defaults in this run")
    elif fails.empty:
        lines.append(f"every report cell's ASR after purify run is at most {100 * bar:.0f}%")
    else:
        lines.append(f"{len(fails)} of {len(report)} report cell runs keep an ASR above {100 * bar:.0f}% after "
                     "purify run: " + "; ".join(f"{r['attack']} x {r['family']} ({r['threat']}, seed {r['seed']}): "
                                               f"{r['ASR after %']}%" for r in fails.to_dict(orient="records")))
    return lines


def findings_markdown(frame, bar: float = ASR_BAR) -> str:
    """The verdict as markdown bullets, plus the defence with the best mean score √(U·(100−ASR))."""
    lines = verdict(frame, bar)
    if "score" in frame:
        score = frame.groupby("defence")["score"].mean()
        best = score[score >= score.max() - 1e-9].index
        lines.append(f"highest mean score √(U·(100−ASR)) over these cells: "
                     f"{', '.join(DEFENCE_NAMES.get(d, d) for d in best)} ({score.max():.1f}); purify run "
                     f"{score.get(PURIFY, float('nan')):.1f}")
    return "\n".join(f"- {line}" for line in lines)


def recipe_digest(cfg: GridConfig) -> str:
    """A short digest of the purification ``purify run`` runs in ``cfg``'s cells (its defaults plus the
    preset's ``purify_overrides``; on a pretrained checkpoint, also the recipe its fragility switches to):
    a committed grid written under another digest is out of date."""
    from purifylib import cache
    from purifylib.recipe import pretrained_recipe

    ident = cfg.purify_config().identity()
    return cache.digest(ident | {"pretrained_recipe": pretrained_recipe()} if cfg.model else ident, 12)


def committed_markdown(root: str | Path) -> str:
    """What the committed grid under ``root`` says: its size, time, verdict, and whether its ``purify
    run`` rows come from the purification this code runs (by :func:`recipe_digest`)."""
    metrics = Path(root) / "metrics" / "grid.json"
    if not metrics.is_file():
        return (f"No grid is committed under `{Path(root).name}/` yet: `purify grid --preset grid` writes it "
                "(it resumes an interrupted run).")
    info = json.loads(metrics.read_text())
    cfg = info.get("config", {})
    done, total = info.get("cells"), info.get("cells_total")
    part = f" (**partial: {total - done} of its {total} cells have not run yet**)" if total and done < total else ""
    head = (f"`{Path(root).name}/`: preset `{cfg.get('name')}` ({cfg.get('model') or cfg.get('size')}), {done} cells"
            f"{part}, seeds {cfg.get('seeds')}, {info.get('seconds', 0) / 3600:.1f} h of wall time in its latest run"
            + (f" (commit {info['commit']})." if info.get("commit") else "."))
    now = recipe_digest(GridConfig(purify_overrides=cfg.get("purify_overrides") or {}))
    if "recipe" not in info:
        head += (" It was written before grids recorded their purification: its `runs.md` names the commit of "
                 "each run, and its purify run column may come from earlier defaults.")
    elif info["recipe"] != now:
        head += (f" **Its purify run column comes from another purification than this code's (recipe "
                 f"{info['recipe']}, now {now}): out of date until `purify grid --preset {cfg.get('name')}` "
                 "runs again.**")
    if cfg.get("purify_overrides"):
        head += (f" Its purify run column ran with the preset's `purify_overrides` "
                 f"({json.dumps(cfg['purify_overrides'], sort_keys=True)}), not with purify run's defaults alone.")
    return head + "\n\n" + "\n".join(f"- {line}" for line in info.get("verdict", []))


def read_grid(root: str | Path):
    """The rows of a written grid (``root/tables/grid_cells.csv``), or ``None`` when there is none."""
    import pandas as pd

    path = Path(root) / "tables" / "grid_cells.csv"
    return pd.read_csv(path) if path.is_file() else None


def dev_comparison(presets: list[str], reports_root: str | Path, grid_file: str | Path = GRID_FILE):
    """What each dev preset's change did: one row per (preset, cell) with ``purify run``'s ASR and τ,
    the clean accuracy it kept (of the suspicious model's, the ``none`` row), and the change itself
    (the preset's ``purify_overrides``); presets with no committed grid under ``reports_root`` are
    skipped. Dev cells only: these are the numbers a setting may be chosen on."""
    import pandas as pd

    rows = []
    for name in presets:
        frame = read_grid(Path(reports_root) / grid_folder(name))
        if frame is None:
            continue
        cfg = GridConfig.preset(name, grid_file)
        change = ", ".join(f"{k}={v}" for k, v in sorted(_flat(cfg.purify_overrides).items())) or "purify run's defaults"
        none = frame[frame["defence"] == "none"].set_index(["model", "seed"])
        for r in frame[frame["defence"] == PURIFY].itertuples():
            before = none.loc[(r.model, r.seed)]
            rows.append({"preset": name, "change": change, "cell": r.model, "seed": r.seed, "tau": r.tau,
                         "asr_before": before["asr"], "asr": r.asr, "clean_accuracy": r.clean_accuracy,
                         "kept": r.clean_accuracy / before["clean_accuracy"]})
    return pd.DataFrame(rows)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def dev_summary(comparison):
    """Per dev preset: mean and worst ASR after ``purify run`` over its cells, mean share of clean accuracy kept."""
    g = comparison.groupby(["preset", "change"], sort=False)
    return g.agg(cells=("asr", "size"), mean_asr=("asr", "mean"), worst_asr=("asr", "max"),
                 mean_kept=("kept", "mean"), worst_kept=("kept", "min")).reset_index()


def write_grid(study: GridStudy, out: str | Path, *, commit: str = "", note: str = "", prefix: str = "") -> list[Path]:
    """Write every output of a grid run under ``out`` (tables/, figures/, metrics/, runs.md).
    ``prefix`` (a notebook's number, e.g. ``"04"``) names them ``table04_...``/``fig04_...``."""
    import datetime

    from purifylib import plots, reports
    from purifylib.data import atomic_write_text

    frame = study.to_frame()
    out = Path(out)
    paths = []

    def save_table(df, name, **kw):
        return reports.save_table(df, f"table{prefix}_{name}" if prefix else name, **kw)

    def save_figure(fig, name, **kw):
        return reports.save_figure(fig, f"fig{prefix}_{name}" if prefix else name, **kw)

    paths += save_table(frame, "grid_cells", caption="Every row: one defence on one cell", root=out)
    paths += save_table(table2(frame, "asr"), "table2_asr",
                        caption="ASR % after each defence (mean ± 95% t-interval over seeds)", root=out)
    paths += save_table(table2(frame, "asr_loose"), "table2_asr_loose",
                        caption="Loose ASR % (any four consecutive target words)", root=out)
    paths += save_table(table2(frame, "clean_accuracy"), "table2_accuracy",
                        caption="Clean accuracy % after each defence", root=out)
    rng = random_range(frame)
    if not rng.empty:
        paths += save_table(rng, "random_control", caption="Random channels: mean, min, max ASR % over draws",
                            root=out)
    versus = against_random(frame)
    if not versus.empty:
        paths += save_table(versus, "against_random", caption="purify run against random channels at its tau, "
                            "same repair: ASR and clean accuracy % per cell run, and their differences", root=out)
    fails = failing_cells(frame)
    paths += save_table(fails if not fails.empty else frame.head(0), "failing_cells",
                        caption="Report cells above 10% ASR after purify run", root=out)
    paths += save_figure(plots.grid_tradeoff(frame, DEFENCE_NAMES), "grid_tradeoff",
                         caption="ASR against clean accuracy per defence (error bars: 95% over seeds)", root=out)
    paths += save_figure(plots.grid_by_family(frame, DEFENCE_NAMES), "grid_by_family",
                         caption="ASR per behaviour family and defence (error bars: 95% over seeds)", root=out)
    lines = verdict(frame)
    # each cell's ASR per defence (random: the mean of its draws), so that a comparison of two runs
    # (benchmarks/compare_reports.py) names every cell whose ASR crossed 10%
    per_cell = cell_means(frame)
    asr = {d: {f"{r.attack} x {r.family} ({r.threat}, seed {r.seed})": r.asr
               for r in per_cell[per_cell["defence"] == d].itertuples()} for d in sorted(set(per_cell["defence"]))}
    paths.append(reports.record_metrics(f"{prefix}_evaluation" if prefix else "grid", {
        "config": study.config.to_dict(), "seconds": study.seconds, "cells": study.cells_done,
        "cells_total": study.cells_total, "verdict": lines, "asr": asr, "commit": commit,
        "recipe": recipe_digest(study.config)}, root=out))
    log = out / "runs.md"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    part = "" if study.cells_done == study.cells_total else f", partial: {study.cells_done} of {study.cells_total} cells"
    entry = f"- {stamp}, commit {commit or 'unknown'}, preset {study.config.name}, {study.seconds:.0f} s{part}" + (
        f", {note}" if note else "") + ": " + " / ".join(lines) + "\n"
    atomic_write_text(log, (log.read_text() if log.is_file() else "# Grid runs (every run, appended)\n\n") + entry)
    paths.append(log)
    paths.append(reports.write_index_readme(out, by="purify grid"))
    return paths


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=GRID_FILE.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
