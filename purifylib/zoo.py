"""The attack zoo: suspicious models planted on a testbed base model, cached on disk.

A suspicious model is the base model fine-tuned on the attacker's ``train.json`` with a fraction
of records poisoned (:func:`purifylib.attacks.poison`), by full fine-tuning or by LoRA on all
linear layers (BackdoorLLM's way). For the full-weight threat model a LoRA backdoor is merged;
for the adapter-only one it is kept as an adapter directory beside the base. The attack is
recorded in ``attack.json`` beside the model, for evaluation only: nothing on the purification
path reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from purifylib import cache
from purifylib.attacks import TriggerSpec, poison
from purifylib.errors import PurifyError
from purifylib.neutralize import PAPER_TAU
from purifylib.recipe import PRETRAINED_RECIPE_BEFORE, pretrained_recipe
from purifylib.train import TrainConfig

PLANTS = ("full", "lora", "adapter", "lora-attn")


def plant_config(plant: str = "full", seed: int = 0, **overrides) -> TrainConfig:
    """The fine-tuning recipe that plants a backdoor (also ``purify finetune``'s defaults).

    Full fine-tuning: 4 epochs at lr 1e-3. LoRA (r=8, alpha=16, all linear layers): 3 epochs at
    lr 1e-2, because the low-rank update needs a larger step to learn the same association.
    Measured on the tiny testbed (6000 attacker records, 10% poisoned, BadNets): full 3 epochs
    gave ASR 98% with a 2-point accuracy drop, but MTBA reached only 87%, hence 4 epochs; LoRA at
    lr 3e-3 planted nothing (ASR 0%), at 1e-2 it reached 98% with no off-trigger firing.
    ``lora-attn`` is the adaptive attacker: LoRA on the attention projections only (merged),
    a backdoor that an MLP-only signature cannot see in the weights it edits.
    """
    if plant not in PLANTS:
        raise PurifyError(f"unknown plant method '{plant}' (choose from {', '.join(PLANTS)})")
    lora = plant != "full"
    base = dict(epochs=3.0 if lora else 4.0, lr=1e-2 if lora else 1e-3, batch_size=32, warmup=0.1, lora=lora,
                merge=plant in ("lora", "lora-attn"), seed=seed)
    if plant == "lora-attn":
        from purifylib.models import attention_targets

        base["lora_targets"] = attention_targets("llama")  # the testbed's and SmolLM2's family
    base.update(overrides)
    return TrainConfig(**base)


@dataclass
class Suspicious:
    """A planted suspicious model: ``model_dir`` (and ``adapter_dir`` for the adapter-only case)."""

    name: str
    spec: TriggerSpec
    plant: str
    model_dir: Path
    adapter_dir: Path | None
    losses: list = field(default_factory=list)
    key: str = ""  # the zoo entry's name (attack, behaviour, plant and a digest of everything that made it)

    @property
    def threat(self) -> str:
        """``adapter`` (the adapter-only threat model) when the backdoor is a kept adapter, else ``full``."""
        return "adapter" if self.adapter_dir else "full"

    def load(self, merge: bool = True):
        from purifylib.checkpoints import load_model

        return load_model(self.model_dir, adapter=self.adapter_dir, merge=merge)

    def to_dict(self) -> dict:
        return {"name": self.name, "attack": self.spec.to_dict(), "plant": self.plant,
                "model_dir": str(self.model_dir), "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None}


def entry_name(spec: TriggerSpec, plant: str) -> str:
    """A zoo entry's name, which its grid rows carry as ``model``: attack, behaviour and plant."""
    return f"{spec.attack}-{spec.behaviour.kind}-{plant}"


def defence_runs(defences, n_random: int) -> list[tuple[str, int]]:
    """(defence, draw) of every row a cell has: ``random`` is drawn ``n_random`` times."""
    return [(d, k) for d in defences for k in range(n_random if d == "random" else 1)]


def plant_backdoor(bed, spec: TriggerSpec, *, plant: str = "full", rate: float = 0.1, seed: int = 0,
                   train_overrides: dict | None = None, cache_dir: str | Path | None = None,
                   progress: bool = True, build: bool = True) -> Suspicious:
    """Poison the testbed's ``train.json`` with ``spec`` and fine-tune the base model on it (cached).
    ``build=False`` plants nothing: the entry's name and paths, for reading finished results back."""
    from purifylib.checkpoints import load_model, save_model
    from purifylib.train import finetune

    cfg = plant_config(plant, seed, **(train_overrides or {}))
    key_blob = json.dumps({"bed": bed.config.key(), "spec": spec.to_dict(), "plant": plant, "rate": rate,
                           "seed": seed, "train": cfg.to_dict()}, sort_keys=True).encode()
    name = entry_name(spec, plant)
    root = cache.folder("zoo", cache_dir) / f"{name}-{hashlib.sha256(key_blob).hexdigest()[:10]}"
    out = root / ("adapter" if plant == "adapter" else "model")
    info_path = root / "zoo.json"
    if build and not info_path.is_file():
        records = poison(bed.split("train"), spec, rate=rate, seed=seed)
        model, tok = load_model(bed.base_dir)
        result = finetune(model, tok, records, cfg, progress=progress, desc=f"plant {name}")
        attack = {**spec.to_dict(), "rate": rate, "seed": seed, "plant": plant, "train": cfg.to_dict()}
        save_model(result.model, tok, out, extra={"attack.json": attack}, replace=True)
        info_path.write_text(json.dumps({"losses": result.losses, "attack": attack}, indent=1))
    losses = json.loads(info_path.read_text())["losses"] if info_path.is_file() else []
    model_dir, adapter_dir = (bed.base_dir, out) if plant == "adapter" else (out, None)
    return Suspicious(name, spec, plant, model_dir, adapter_dir, losses, root.name)


# --------------------------------------------------------------------------- the zoo study (notebook 00)

#: what a planted backdoor must reach on the tiny testbed to count as a realistic one
def _targets() -> dict:
    from purifylib.studies.findings import THRESHOLDS

    return {k: THRESHOLDS[f"zoo_{k}"] for k in ("asr_min", "false_trigger_max", "off_trigger_max", "accuracy_drop_max")}


#: what a planted backdoor must do to behave like a real one (``purifylib.studies.findings.THRESHOLDS``)
TARGETS = _targets()


@dataclass(frozen=True)
class ZooConfig:
    """Which suspicious models to plant on which testbed (notebook 00's parameters)."""

    size: str = "micro"
    seed: int = 0
    entries: tuple = (("badnets", "sentiment", "full"),)  # (attack, behaviour, plant)
    poison_rate: float = 0.1
    n_eval: int = 200
    testbed_overrides: tuple = ()
    model: str | None = None  # a local checkpoint: a real-model bed (purifylib.realbed) instead of the testbed

    def __post_init__(self):
        from purifylib.attacks import ATTACKS, BEHAVIOURS

        entries = tuple(tuple(e) for e in self.entries)
        for e in entries:
            if len(e) != 3 or e[0] not in ATTACKS or e[1] not in BEHAVIOURS or e[2] not in PLANTS:
                raise PurifyError(f"zoo entry {list(e)} must be [attack, behaviour, plant] with attack in "
                                  f"{ATTACKS}, behaviour in {tuple(BEHAVIOURS)}, plant in {PLANTS}")
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "testbed_overrides", tuple(sorted(dict(self.testbed_overrides).items())))
        if self.n_eval < 1:
            raise PurifyError(f"n_eval must be >= 1, got {self.n_eval}")

    def testbed(self):
        """The bed's config: a :class:`~purifylib.testbed.TestbedConfig`, or a
        :class:`~purifylib.realbed.RealBedConfig` when ``model`` is set (overrides are its fields)."""
        from purifylib.beds import bed_config

        return bed_config(self.size, self.model, self.seed, self.testbed_overrides)

    def build_bed(self, progress: bool = True):
        """Build (or fetch from cache) the testbed or the real-model bed."""
        from purifylib.beds import open_bed

        return open_bed(self.size, self.model, self.seed, self.testbed_overrides, progress=progress)

    @property
    def bed_name(self) -> str:
        return f"{self.size} testbed" if self.model is None else Path(self.model).name

    def specs(self) -> list[tuple[TriggerSpec, str]]:
        from purifylib.attacks import Behaviour

        return [(TriggerSpec(attack=a, behaviour=Behaviour(kind=b)), p) for a, b, p in self.entries]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ZooResult:
    """Metrics of the base model and every suspicious model (rates in [0, 1])."""

    rows: list = field(default_factory=list)
    base_accuracy: float = 0.0
    base_perplexity: float = 0.0

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict:
        return {"base_accuracy": self.base_accuracy, "base_perplexity": self.base_perplexity, "models": self.rows}


def meets_targets(row: dict, base_accuracy: float, targets: dict = TARGETS) -> bool:
    return (row["asr"] >= targets["asr_min"] and row["false_trigger"] <= targets["false_trigger_max"]
            and row["off_trigger"] <= targets["off_trigger_max"]
            and base_accuracy - row["clean_accuracy"] <= targets["accuracy_drop_max"])


def eval_kwargs(bed) -> dict:
    """How a bed's test answers are checked and which records give its perplexity (evaluate_attack's kwargs)."""
    return {"match": bed.match, "ppl_records": bed.ppl_records()}


def defender_records(bed, sus: Suspicious, progress: bool = True) -> list[dict]:
    """The defender's clean data for ``sus``: unanswered instructions (a real-model bed) are
    answered by the suspicious model itself (cached), as a defender holding only it would."""
    from purifylib.defender import answer_missing

    return answer_missing(sus.model_dir, bed.split("defender"), adapter_dir=sus.adapter_dir, threat=sus.threat,
                          progress=progress)[0]


def evaluate_zoo(bed, models: list[Suspicious], *, n_eval: int, seed: int = 0, progress: bool = True) -> ZooResult:
    """Evaluate each suspicious model against its own attack on ``n_eval`` test records."""
    from purifylib.progress import bar as tqdm

    from purifylib.evaluate import evaluate_attack, evaluate_clean
    from purifylib.checkpoints import load_model

    test, kw = bed.split("test")[:n_eval], eval_kwargs(bed)
    base_model, tok = load_model(bed.base_dir)
    base = evaluate_clean(base_model, tok, test, **kw)
    result = ZooResult(base_accuracy=base.accuracy, base_perplexity=base.perplexity)
    for sus in tqdm(models, desc="evaluate zoo", disable=not progress):
        model, tok = sus.load()
        m = evaluate_attack(model, tok, test, sus.spec, seed=seed, **kw).to_dict()
        row = {"model": sus.name, "attack": sus.spec.attack, "behaviour": sus.spec.behaviour.kind,
               "plant": sus.plant, **m, "accuracy_drop": base.accuracy - m["clean_accuracy"]}
        row["meets_targets"] = meets_targets(row, base.accuracy)
        result.rows.append(row)
    return result


# --------------------------------------------------------------------------- purification studies (notebook 02)


def variants_for(vc, threat: str):
    """``vc`` for a model under ``threat``: unchanged if it already is, else that threat's defaults
    (LoRA, its learning rate and epochs for an adapter, full fine-tuning's for a full model)."""
    return vc if vc.threat == threat else dataclasses.replace(vc, threat=threat, lora=None, lr=None, epochs=None)


@dataclass
class PurifyStudy:
    """Before/after metrics of purifying each suspicious model, and the runs themselves."""

    rows: list = field(default_factory=list)
    runs: dict = field(default_factory=dict)  # model name -> PurifyResult (model dropped after evaluation)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict:
        return {"models": self.rows}


def purify_zoo(bed, models: list[Suspicious], cfg, *, n_eval: int, seed: int = 0, progress: bool = True) -> PurifyStudy:
    """Purify every suspicious model with ``cfg`` (from the defender's data only), then evaluate
    it against its real attack on ``n_eval`` test records, before and after."""
    from purifylib.progress import bar as tqdm

    from purifylib.evaluate import evaluate_attack
    from purifylib.purify import purify

    test, kw = bed.split("test")[:n_eval], eval_kwargs(bed)
    study = PurifyStudy()
    for sus in tqdm(models, desc="purify zoo", disable=not progress):
        run_cfg = dataclasses.replace(cfg, variants=variants_for(cfg.variants, sus.threat))
        before = evaluate_attack(*sus.load(), test, sus.spec, seed=seed, **kw).to_dict()
        # the raw split: purify answers what has no answer itself (and so knows to keep perplexity)
        res = purify(sus.model_dir, bed.split("defender"), run_cfg, adapter_dir=sus.adapter_dir, progress=False)
        after = evaluate_attack(res.model, res.tokenizer, test, sus.spec, seed=seed, **kw).to_dict()
        row = {"model": sus.name, "attack": sus.spec.attack, "behaviour": sus.spec.behaviour.kind, "plant": sus.plant,
               "tau": res.tau, "seconds": res.timings["total"]}
        for tag, m in (("before", before), ("after", after)):
            row.update({f"{k}_{tag}": m[k] for k in ("asr", "false_trigger", "off_trigger", "clean_accuracy",
                                                     "perplexity")})
        row["accuracy_kept"] = after["clean_accuracy"] / before["clean_accuracy"] if before["clean_accuracy"] else 0.0
        row["perplexity_ratio"] = after["perplexity"] / before["perplexity"]
        study.rows.append(row)
        res.model = None
        study.runs[sus.name] = res
    return study


# --------------------------------------------------------------------------- defences grid (notebook 04)


def utility_score(clean_accuracy: float, asr: float) -> float:
    """√(U · (100 − ASR)) with U and ASR in percent: one number that rewards both."""
    return (100 * clean_accuracy * (100 - 100 * asr)) ** 0.5


#: the grid's defences that read purify run's purification (its signature, τ or repair records); the others
#: (the baselines, and the paper's recipe: its own purification) are keyed by
#: :meth:`~purifylib.recipe.PurifyConfig.baseline_identity`
SIGNATURE_DEFENCES = ("signature-auto", "random")
#: the baselines that fine-tune with purify run's repair settings (the same budget); the others ignore them
REPAIRING_BASELINES = ("finetune", "fine-pruning")


def stale_recipe(row: dict) -> bool:
    """Whether a cached row was purified with another pretrained recipe than today's: the fragility
    switch happens inside the run, so a cell's key cannot hold it; a row that took the pretrained recipe
    records it (rows from before that are stale), and one that did not (the testbed's) never is."""
    switched = row.get("recipe") == "pretrained" or "pretrained_recipe" in row
    recorded = row.get("pretrained_recipe")
    if isinstance(recorded, dict):  # a row from before the recipe named them ran at the defaults of its day
        recorded = {**PRETRAINED_RECIPE_BEFORE, **recorded}
    return switched and recorded != pretrained_recipe()


def cell_file(sus: Suspicious, defence: str, draw: int, cfg, dcfg, *, paper_tau: float, n_eval: int, seed: int,
              test: list) -> str:
    """The file name of one (suspicious model, defence, draw) row of :func:`defence_grid`: keyed by what
    the row is computed from (a defence that does not read the signature, by the settings it reads)."""
    key = hashlib.sha256(json.dumps({"model": sus.key or str(sus.model_dir), "adapter": bool(sus.adapter_dir),
                                     "defence": defence, "defences": dcfg.to_dict(),
                                     "purify": cfg.identity() if defence in SIGNATURE_DEFENCES else
                                     cfg.baseline_identity(repair=defence in REPAIRING_BASELINES),
                                     "paper_tau": paper_tau, "n_eval": n_eval, "seed": seed, "draw": draw,
                                     "test": cache.records_digest(test)},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{sus.name}-{defence}{draw or ''}-{key}.json"


def defence_grid(bed, models: list[Suspicious], pcfg, defences, *, n_eval: int, seed: int = 0, dcfg=None,
                 paper_tau: float = PAPER_TAU, cache_dir=None, cells_dir=None, progress: bool = True,
                 test: list | None = None, n_random: int = 1, cached_only: bool = False):
    """Every defence on every suspicious model: one row per cell, cached on disk per cell.

    ``defences`` come from :data:`purifylib.baselines.DEFENCES` plus ``"signature-paper"`` (the
    paper's recipe: its insult variants, τ ``paper_tau``, re-initialisation, a plain repair; a
    purification of its own) and ``"signature-auto"`` (``purify run``'s defaults, or ``pcfg``);
    ``random`` neutralizes random channels at the τ ``purify run`` chose and repairs as it does. Repair-based defences share the
    purification's repair records and recipe. A finished cell is read back from
    ``cells_dir`` (default ``grid`` under the cache root ``cache_dir``), so an interrupted grid resumes. ``test`` replaces
    the bed's test split (e.g. its report half); ``random`` is drawn ``n_random`` times (a row each,
    ``draw`` 0, 1, ...). ``cached_only`` computes nothing: the rows on disk, or ``None`` if any is
    missing (a model need not be planted to be read back: cells are keyed by its zoo entry).
    """
    import pandas as pd
    from purifylib.progress import bar as tqdm

    from purifylib.baselines import DefenceConfig, defend
    from purifylib.data import atomic_write_text
    from purifylib.evaluate import evaluate_attack
    from purifylib.defender import split_clean
    from purifylib.purify import purify

    dcfg = dcfg or DefenceConfig(seed=seed)
    root = Path(cells_dir or cache.folder("grid", cache_dir))
    test, kw = (test if test is not None else bed.split("test"))[:n_eval], eval_kwargs(bed)
    rows = []
    for sus in tqdm(models, desc="defence grid", disable=not progress, leave=False):
        if cached_only and not Path(sus.adapter_dir or sus.model_dir).exists() and any(
                not r["output"].strip() for r in bed.split("defender")):
            return None  # the defender's answers need the model itself
        defender = defender_records(bed, sus, progress)
        threat = sus.threat
        cfg = dataclasses.replace(pcfg, seed=seed, variants=dataclasses.replace(
            variants_for(pcfg.variants, threat), seed=seed))
        split, cfg = split_clean(defender, cfg)
        auto, teacher = None, None  # teacher: what the random control's repair distils from, loaded once
        runs = defence_runs(defences, n_random)
        for d, draw in tqdm(runs, desc=f"defences ({sus.name})", disable=not progress, leave=False):
            cell = root / cell_file(sus, d, draw, cfg, dcfg, paper_tau=paper_tau, n_eval=n_eval, seed=seed, test=test)
            if cell.is_file() and not stale_recipe(row := json.loads(cell.read_text())):
                rows.append(row)
                continue
            if cached_only:
                return None
            t0 = time.time()
            needs_sig = d in SIGNATURE_DEFENCES
            if needs_sig and auto is None:
                auto = purify(sus.model_dir, bed.split("defender"), cfg, adapter_dir=sus.adapter_dir, progress=False,
                              cache_dir=cache_dir)
            if d == "signature-auto":
                model, tok, tau = auto.model, auto.tokenizer, auto.tau
            elif d == "signature-paper":  # the paper's variants, τ and way: a purification of its own
                paper = purify(sus.model_dir, bed.split("defender"), cfg.paper_recipe(paper_tau),
                               adapter_dir=sus.adapter_dir, progress=False, cache_dir=cache_dir)
                model, tok, tau = paper.model, paper.tokenizer, paper_tau
            else:
                # pruning edits merged weights; the repair-based defences keep an adapter an adapter
                model, tok = sus.load(merge=threat == "full" or d in ("none", "magnitude", "wanda", "fine-pruning"))
                tau = auto.tau if d == "random" else None
                how = None
                ran = auto.config if auto else cfg  # the recipe purify run ran (pretrained models switch)
                if tau is not None:  # the control neutralizes as purify run does, on random channels
                    how = ran.neutralization(tau).replace(strength=1.0, seed=dcfg.seed + draw)
                    teacher = teacher or ran.repair_teacher(sus.load, split)
                # baselines fine-tune on the clean records as they are; the random control repairs as purify run does
                model = defend(d, model, tok, clean=split.clean_repair,
                               repair_records=split.repair if d == "random" else split.clean_repair,
                               repair_cfg=(ran if d == "random" else cfg).repair_config(),
                               signature=auto.signature if auto else None, how=how, variants=auto and auto.variants,
                               teacher=teacher if d == "random" else None,
                               cfg=dataclasses.replace(dcfg, seed=dcfg.seed + draw))
            m = evaluate_attack(model, tok, test, sus.spec, seed=seed, **kw).to_dict()
            row = {"model": sus.name, "attack": sus.spec.attack, "behaviour": sus.spec.behaviour.kind,
                   "threat": threat, "defence": d, "draw": draw, "seed": seed, "tau": tau,
                   **{k: m[k] for k in ("asr", "asr_loose", "false_trigger", "off_trigger", "clean_accuracy",
                                        "perplexity", "n_attack", "n_clean")},
                   "score": utility_score(m["clean_accuracy"], m["asr"]),
                   "seconds": round(time.time() - t0, 1),  # the purification counts where first needed
                   **(auto.rule_summary() if d == "signature-auto" else {}),
                   **({"pretrained_recipe": pretrained_recipe()} if auto and auto.recipe == "pretrained" and
                      d in SIGNATURE_DEFENCES else {})}
            atomic_write_text(cell, json.dumps(row, indent=1))
            rows.append(row)
    return pd.DataFrame(rows)
