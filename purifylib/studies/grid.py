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
that run chose. The outputs (:func:`purifylib.studies.grid_tables.write_grid`): every row, the Table 2 shape as mean ± 95%
t-interval over seeds, a utility table, a verdict naming each report cell whose ASR after
``purify run`` is above 10%, figures, and a log line per report run.
"""

from __future__ import annotations

import dataclasses
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


def grid_folder(preset: str) -> str:
    """Where a preset's grid is written under ``reports/`` (``purify grid``'s default, and where notebook 02
    reads the committed dev grids): ``grid-P``, or ``P`` itself when it already names a grid (``grid``,
    ``grid-auto``)."""
    return preset if preset == "grid" or preset.startswith("grid-") else f"grid-{preset}"


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


def _unplantable(bed, cells, rate: float) -> list[str]:
    """``attack x family (threat, seed): why`` for every cell whose poisoned training data cannot be
    drawn from ``bed`` (e.g. a jailbreak on a bed without refused requests); pure Python, no model."""
    from purifylib.attacks import poison

    train, out = bed.split("train"), []
    for cell in cells:
        try:
            poison(train, cell.spec, rate=rate, seed=cell.seed)
        except PurifyError as exc:
            out.append(f"{cell.attack} x {cell.family} ({cell.threat}, seed {cell.seed}): {exc}")
    return out


def run_grid(cfg: GridConfig, *, cache_dir=None, cells_dir=None, hours: float | None = None,
             grid_file: str | Path = GRID_FILE, progress: bool = True) -> GridStudy:
    """Plant and defend every cell of ``cfg`` (cached: a rerun only does what is missing).

    Finished (cell, defence) rows are files in ``cells_dir`` (default ``<cache>/grid``; ``purify
    grid`` keeps them beside its tables, so a committed grid resumes from a clean clone). With
    ``hours``, no new cell starts once that much time has passed; the study then holds the cells
    that finished (``cells_done`` of ``cells_total``)."""
    from purifylib.progress import bar as tqdm

    from purifylib.baselines import DefenceConfig
    from purifylib.beds import open_bed
    from purifylib.zoo import defence_grid, plant_backdoor

    t0 = time.time()
    bed = open_bed(cfg.size, cfg.model, 0, cfg.testbed_overrides, progress=progress, cache_dir=cache_dir)
    pcfg = cfg.purify_config()
    cells = grid_cells(cfg, grid_file)
    unplantable = _unplantable(bed, cells, cfg.poison_rate)
    if unplantable:  # before any work: a cell that cannot be planted would otherwise stop the run hours in
        raise PurifyError(f"grid preset {cfg.name}: {len(unplantable)} cell(s) cannot be planted on this bed "
                          f"({'; '.join(unplantable)}); leave their pairs out (--pairs) or change the preset")
    study = GridStudy(cfg, cells_total=len(cells))

    for cell in tqdm(cells, desc=f"grid {cfg.name}", disable=not progress):
        spec = cell.spec
        plant = dict(bed=bed, spec=spec, plant=_plant(cfg, cell),
                     rate=cfg.poison_rate, seed=cell.seed, train_overrides=dict(cfg.plant_overrides), progress=False,
                     cache_dir=cache_dir)
        defend = dict(bed=bed, pcfg=pcfg, defences=_defences(cfg, cell), n_eval=cfg.n_eval, seed=cell.seed,
                      dcfg=DefenceConfig(seed=cell.seed), paper_tau=cfg.paper_tau, progress=progress,
                      cache_dir=cache_dir, cells_dir=cells_dir, test=prompts_of_split(bed.split("test"), cell.split), n_random=cfg.n_random)
        # a finished cell is read back without planting its model (a committed grid on a clean clone)
        frame = defence_grid(models=[plant_backdoor(build=False, **plant)], cached_only=True, **defend)
        if frame is None:
            if hours is not None and time.time() - t0 > 3600 * hours:
                continue  # past the time budget: no new cell starts
            frame = defence_grid(models=[plant_backdoor(**plant)], **defend)
        study.rows += [_study_row(row, cell, spec) for row in frame.to_dict(orient="records")]
    study.seconds = round(time.time() - t0, 1)
    return study


def _study_row(row: dict, cell: Cell, spec) -> dict:
    from purifylib.stats import wilson

    lo, hi = wilson(row["asr"], int(row["n_attack"]))  # this cell's own 95% interval
    return {**row, "asr_low": lo, "asr_high": hi, "family": cell.family, "split": cell.split,
            "triggers": " | ".join(spec.triggers), "target": spec.behaviour.target}


def _defences(cfg: GridConfig, cell: Cell) -> tuple:
    """The defences a cell runs: the paper's recipe on ``paper_seeds`` only."""
    return tuple(d for d in cfg.defences if d != "signature-paper" or cfg.paper_seeds is None
                 or cell.seed in cfg.paper_seeds)


def _plant(cfg: GridConfig, cell: Cell) -> str:
    return "adapter" if cell.threat == "adapter" else cfg.full_plant


def tabulate_cells(cfg: GridConfig, cells_dir, *, grid_file: str | Path = GRID_FILE) -> GridStudy:
    """The finished cells of ``cfg`` read from ``cells_dir`` by what the rows say (model name, seed, defence,
    draw), with no bed and no model: the tables of a committed grid on a clean clone whose planted models are
    not there (a real model's cells are keyed by its self-answered data, which need the model). A cell counts
    when every defence's row is there; two rows for one (cell, defence, draw), e.g. left by an older recipe,
    stop with the files named, since only the keys (``run_grid``) can say which is current."""
    import json

    import pandas as pd

    from purifylib.zoo import defence_runs, entry_name

    cells_dir = Path(cells_dir)
    if not cells_dir.is_dir():
        raise PurifyError(f"{cells_dir}: no such cells folder")
    by_run: dict = {}
    for path in sorted(cells_dir.glob("*.json")):
        try:
            row = json.loads(path.read_text())
            key = (row["model"], int(row["seed"]), row["defence"], int(row.get("draw") or 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise PurifyError(f"{path}: not a grid row ({type(exc).__name__}: {exc})") from None
        by_run.setdefault(key, []).append((path, row))
    t0, cells = time.time(), grid_cells(cfg, grid_file)
    study = GridStudy(cfg, cells_total=len(cells))
    for cell in cells:
        spec = cell.spec
        name = entry_name(spec, _plant(cfg, cell))
        found = [by_run.get((name, cell.seed, d, k), []) for d, k in defence_runs(_defences(cfg, cell), cfg.n_random)]
        ambiguous = [p.name for hits in found if len(hits) > 1 for p, _ in hits]
        if ambiguous:
            raise PurifyError(f"{cells_dir}: {len(ambiguous)} rows of {name} (seed {cell.seed}) stand for the same "
                              f"defence ({', '.join(ambiguous)}); tabulate with the models (no --tables-only) so "
                              "that the keys choose, or move the older rows away")
        if all(found):  # through a frame, as defence_grid returns them: the same columns, in the same order
            frame = pd.DataFrame([hits[0][1] for hits in found])
            study.rows += [_study_row(row, cell, spec) for row in frame.to_dict(orient="records")]
    study.seconds = round(time.time() - t0, 1)
    return study
