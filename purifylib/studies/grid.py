"""The held-out attack grid: the paper's Table 2, regenerated on attacks the method has never seen.

A :class:`Cell` is (attack, behaviour family, threat, seed). Its trigger and target text are drawn
by the seed from the pools of its split (:func:`purifylib.attacks.draw_spec`; a preset's
``paper_pairs`` take the attack's own trigger and the family's default target instead, the zoo's attack
of notebooks 00-03, so that its plant and variants are shared with them): ``dev`` pairs are
free to look at while the method changes, ``report`` pairs run with frozen settings. Which pair is
which, and the presets, live in ``data/grid.yaml``. Dev cells are measured on one half of the bed's
test prompts (even positions), report cells on the other (odd positions).

Per cell the suspicious model is planted once (cached by the zoo) and every defence runs on it
(:func:`purifylib.zoo.defence_grid`, cached per cell and defence): an interrupted grid reruns only
what did not finish. ``signature-auto`` is ``purify run`` with its defaults (plus the preset's
``purify_overrides``, empty for the report grid); ``random`` is drawn ``n_random`` times at the τ
that run chose. The outputs (:func:`write_grid`): every row, the Table 2 shape as mean ± 95%
t-interval over seeds, a utility table, a verdict naming each report cell whose ASR after
``purify run`` is above 10%, figures, and a log line per report run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from purifylib.errors import PurifyError

GRID_FILE = Path(__file__).resolve().parent.parent.parent / "data" / "grid.yaml"
#: the method as a user gets it, and the verdict's bar for a report cell
PURIFY = "signature-auto"
ASR_BAR = 0.10
DEFENCE_NAMES = {"none": "no defence", "finetune": "clean fine-tuning", "magnitude": "magnitude pruning",
                 "wanda": "Wanda", "fine-pruning": "fine-pruning", "random": "random channels",
                 "signature-paper": "paper's recipe", "signature-auto": "purify run"}


def load_grid_file(path: str | Path = GRID_FILE) -> dict:
    import yaml

    from purifylib.data import read_text

    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, "grid file"))
    except yaml.YAMLError as exc:
        raise PurifyError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    for key in ("attacks", "families", "dev", "presets"):
        if not isinstance(data, dict) or key not in data:
            raise PurifyError(f"{path}: missing '{key}'")
    return data


@dataclass(frozen=True)
class Cell:
    attack: str
    family: str
    threat: str
    seed: int
    split: str
    paper: bool = False  # the attack's own trigger and target (the zoo's), not drawn from the pools

    @property
    def spec(self):
        from purifylib.attacks import Behaviour, TriggerSpec, draw_spec

        if self.paper:
            return TriggerSpec(attack=self.attack, behaviour=Behaviour(kind=self.family))
        return draw_spec(self.attack, self.family, self.split, self.seed)


@dataclass(frozen=True)
class GridConfig:
    """A grid preset (``data/grid.yaml``): which cells, which defences, how large."""

    name: str = "smoke"
    size: str = "micro"
    model: str | None = None  # a local checkpoint (SmolLM2 via `make smollm2`) instead of the testbed
    testbed_overrides: dict = field(default_factory=dict)
    full_plant: str = "full"  # how a full-threat cell is planted ("lora": a merged LoRA, for real models)
    split: str = "report"  # report, dev or all
    pairs: tuple = ()  # (attack, family) pairs to run; () = every pair of the split
    paper_pairs: tuple = ()  # pairs planted with the attack's own trigger and target (dev pairs of split all)
    seeds: tuple = (0,)
    threats: tuple = ("full", "adapter")  # adapter cells only for the grid file's adapter attacks
    n_eval: int = 200
    defences: tuple = ("none", PURIFY)
    n_random: int = 5
    poison_rate: float = 0.1
    plant_overrides: dict = field(default_factory=dict)
    purify_overrides: dict = field(default_factory=dict)
    paper_tau: float = 0.03
    paper_seeds: tuple | None = None  # seeds that run the paper's recipe (None: all; it trains its own variants)

    def __post_init__(self):
        from purifylib.baselines import DEFENCES

        known = set(DEFENCES) - {"signature"} | {"signature-paper", PURIFY}
        bad = [d for d in self.defences if d not in known]
        if bad:
            raise PurifyError(f"unknown defence(s) {bad} (choose from {', '.join(sorted(known))})")
        from purifylib.zoo import PLANTS

        if self.full_plant not in set(PLANTS) - {"adapter"}:
            raise PurifyError(f"full_plant must be one of {', '.join(p for p in PLANTS if p != 'adapter')}, "
                              f"got {self.full_plant!r}")
        if self.split not in ("report", "dev", "all"):
            raise PurifyError(f"split must be report, dev or all, got {self.split!r}")
        object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
        object.__setattr__(self, "paper_pairs", tuple(tuple(p) for p in self.paper_pairs))
        if set(self.paper_pairs) - set(self.pairs):
            raise PurifyError(f"paper_pairs {sorted(set(self.paper_pairs) - set(self.pairs))} are not among the "
                              "preset's pairs")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "threats", tuple(self.threats))
        if not self.threats or set(self.threats) - {"full", "adapter"}:
            raise PurifyError(f"threats must be full and/or adapter, got {list(self.threats)}")
        if self.paper_seeds is not None:
            object.__setattr__(self, "paper_seeds", tuple(int(s) for s in self.paper_seeds))

    @classmethod
    def preset(cls, name: str, grid_file: str | Path = GRID_FILE) -> "GridConfig":
        presets = load_grid_file(grid_file)["presets"]
        if name not in presets:
            raise PurifyError(f"unknown grid preset '{name}' (choose from {', '.join(sorted(presets))})")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(presets[name]) - fields)
        if bad:
            raise PurifyError(f"{grid_file}: preset '{name}': unknown setting(s) {', '.join(bad)}")
        return cls(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in presets[name].items()})

    def purify_config(self):
        from purifylib.recipe import PurifyConfig
        from purifylib.variants import VariantConfig

        over = dict(self.purify_overrides)
        variants = VariantConfig(**over.pop("variants", {}))
        return PurifyConfig(variants=variants, **over)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def grid_cells(cfg: GridConfig, grid_file: str | Path = GRID_FILE) -> list[Cell]:
    """The cells of ``cfg`` in a fixed order: seed, then threat, then pair, the pairs dealt in rounds
    that each give every attack a different family. A run stopped early (``--hours``) has so
    covered every attack and every family as far as it could for its first seed."""
    grid = load_grid_file(grid_file)
    dev = {tuple(p) for p in grid["dev"]}
    every = [(a, f) for a in grid["attacks"] for f in grid["families"]]
    unknown = [p for p in cfg.pairs if p not in every]
    if unknown:
        raise PurifyError(f"pairs {unknown} are not in the grid's attacks x families")
    pairs = [p for p in (cfg.pairs or every) if cfg.split == "all" or ("dev" if p in dev else "report") == cfg.split]
    if not cfg.pairs:  # round r gives attack i the family r + i: each round spans attacks and families
        fams, chosen = grid["families"], set(pairs)
        pairs = [(a, fams[(r + i) % len(fams)]) for r in range(len(fams)) for i, a in enumerate(grid["attacks"])
                 if (a, fams[(r + i) % len(fams)]) in chosen]
    cells = []
    for seed in cfg.seeds:
        for threat in cfg.threats:
            for pair in pairs:
                if threat == "adapter" and pair[0] not in grid.get("adapter", ()):
                    continue
                split = "dev" if pair in dev else "report"
                if pair in cfg.paper_pairs and split != "dev":
                    raise PurifyError(f"paper pair {list(pair)} is a report pair: its attack is fixed, not drawn "
                                      "from the report pools")
                cells.append(Cell(pair[0], pair[1], threat, seed, split, pair in cfg.paper_pairs))
    return cells


def prompts_of_split(records: list[dict], split: str) -> list[dict]:
    """The bed's test prompts of a split: even positions for dev cells, odd for report cells."""
    return records[0::2] if split == "dev" else records[1::2]


@dataclass
class GridStudy:
    config: GridConfig
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    cells_total: int = 0  # cells the preset has; fewer finished when a time budget stopped the run

    @property
    def cells_done(self) -> int:
        return len({(r["attack"], r["family"], r["threat"], r["seed"]) for r in self.rows})

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def run_grid(cfg: GridConfig, *, cache_dir=None, cells_dir=None, hours: float | None = None,
             grid_file: str | Path = GRID_FILE, progress: bool = True) -> GridStudy:
    """Plant and defend every cell of ``cfg`` (cached: a rerun only does what is missing).

    Finished (cell, defence) rows are files in ``cells_dir`` (default ``<cache>/grid``; ``purify
    grid`` keeps them beside its tables, so a committed grid resumes from a clean clone). With
    ``hours``, no new cell starts once that much time has passed; the study then holds the cells
    that finished (``cells_done`` of ``cells_total``)."""
    from purifylib.progress import bar as tqdm

    from purifylib.baselines import DefenceConfig
    from purifylib.stats import wilson
    from purifylib.beds import open_bed
    from purifylib.zoo import defence_grid, plant_backdoor

    t0 = time.time()
    bed = open_bed(cfg.size, cfg.model, 0, cfg.testbed_overrides, progress=progress, cache_dir=cache_dir)
    pcfg = cfg.purify_config()
    cells = grid_cells(cfg, grid_file)
    study = GridStudy(cfg, cells_total=len(cells))

    for cell in tqdm(cells, desc=f"grid {cfg.name}", disable=not progress):
        spec = cell.spec
        plant = dict(bed=bed, spec=spec, plant="adapter" if cell.threat == "adapter" else cfg.full_plant,
                     rate=cfg.poison_rate, seed=cell.seed, train_overrides=dict(cfg.plant_overrides), progress=False,
                     cache_dir=cache_dir)
        defences = tuple(d for d in cfg.defences if d != "signature-paper" or cfg.paper_seeds is None
                         or cell.seed in cfg.paper_seeds)
        defend = dict(bed=bed, pcfg=pcfg, defences=defences, n_eval=cfg.n_eval, seed=cell.seed,
                      dcfg=DefenceConfig(seed=cell.seed), paper_tau=cfg.paper_tau, progress=progress,
                      cache_dir=cache_dir, cells_dir=cells_dir, test=prompts_of_split(bed.split("test"), cell.split), n_random=cfg.n_random)
        # a finished cell is read back without planting its model (a committed grid on a clean clone)
        frame = defence_grid(models=[plant_backdoor(build=False, **plant)], cached_only=True, **defend)
        if frame is None:
            if hours is not None and time.time() - t0 > 3600 * hours:
                continue  # past the time budget: no new cell starts
            frame = defence_grid(models=[plant_backdoor(**plant)], **defend)
        for row in frame.to_dict(orient="records"):
            lo, hi = wilson(row["asr"], int(row["n_attack"]))  # this cell's own 95% interval
            study.rows.append({**row, "asr_low": lo, "asr_high": hi, "family": cell.family, "split": cell.split,
                               "triggers": " | ".join(spec.triggers), "target": spec.behaviour.target})
    study.seconds = round(time.time() - t0, 1)
    return study


# --------------------------------------------------------------------------- tables and the verdict


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
    preset's ``purify_overrides``): a committed grid written under another digest is out of date."""
    from purifylib import cache

    return cache.digest(cfg.purify_config().identity(), 12)


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
        frame = read_grid(Path(reports_root) / f"grid-{name}")
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
