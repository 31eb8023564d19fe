"""The end-to-end purification: variants → signature → τ → neutralize → repair → report.

It reads the suspicious model and the defender's clean data, nothing else. The clean data is
shuffled with the seed and split into: a held-out slice (``n_holdout`` records, at most a fifth of
the data; clean accuracy and the τ rule are measured on it, never trained on), ``N`` disjoint slices
for the variants, and the repair records (the records left after those; if fewer than ``repair_n``
are left, the variants' clean records are reused: they are the defender's own clean data).

**Choosing τ without the trigger** (``tau="auto"``, the default), in two steps:

1. *Floor, by leaving one behaviour family out.* For each τ on ``tau_grid`` (ascending) and each
   fold (the variants of one behaviour family; one variant per fold when the variants do not share
   families, as the paper's insults), the signature is built from the variants outside the fold and
   applied to ``θ_k^bd`` for each variant ``k`` in it (the suspicious model carrying variant ``k``'s
   own backdoor); variant ``k``'s trigger is placed in held-out prompts. So the floor measures how
   the signature generalises to a behaviour it never saw, which is what a real attack is. The floor
   is the smallest τ whose neutralization brings every held-out variant's ASR to at most
   ``loo_asr_max`` (the largest τ on the grid if none does; the report says so).
2. *As far above the floor as utility allows.* The real backdoor is planted harder than the
   defender's own (longer training, more data), so removing the variants' backdoors is necessary,
   not sufficient: measured on the tiny testbed, the floor alone left VPI at 52% ASR. The chosen τ
   is the largest one on the grid, at or above the floor, whose neutralized-and-repaired model keeps
   at least ``acc_keep`` (97%) of the suspicious model's held-out accuracy, found by bisection
   (a few repairs). If even the floor breaks that, the floor is kept (``prefer="removal"``, the
   default) and the report says what it costs; ``prefer="utility"`` tries smaller τ downwards
   instead, which returns a model that the rule's own floor says still carries the variants'
   backdoors.

**The repair** fine-tunes the neutralized model on the defender's clean records for two epochs; a
quarter of them (``repair_triggers``) carry one of the variants' own triggers with the answer
unchanged, so the repair also unlearns "a trigger overrides the answer". The defaults (the
variants spread over behaviour families and trigger kinds, removal first, the triggered two-epoch
repair) were chosen on the dev cells of ``data/grid.yaml`` (notebook 02, section 8).

**A model trained from scratch or a pretrained one** is told apart by a property the run measures
before it scores anything, its *fragility*: the factor by which re-initialising a random 5% of every
MLP module's channels (no repair) multiplies the perplexity of the held-out records (geometric mean
of three seeded draws). Measured (``benchmarks/bench_fragility.py``, ``reports/fragility/``): ×1.00-1.20
on the 36 tiny-testbed models in the cache (base and planted; 3 seeds each), ×3.99-6.00 on
SmolLM2-135M-Instruct (3 seeds). Above ``fragile_ppl`` (2) the paper's re-initialisation would
break the model before it removes anything, so the run takes the
pretrained recipe instead (:data:`PRETRAINED_RECIPE`: negation at α 5 of every MLP channel and
every attention head on the negation τ grid, and a repair at lr 1e-4: on the SmolLM2 dev cells it
removes both backdoors at a cost in utility that the report states), with LoRA variants
(:data:`PRETRAINED_VARIANTS`; ``pretrained_lora=False`` keeps full ones);
fragility is therefore measured before the variants are built. The report says which recipe ran and
why. ``fragile_ppl=0`` never switches.

**Utility** is held-out exact-match accuracy when the defender's data carries reference answers.
Records without an answer (``output`` empty or missing: instructions only, the usual case with a
real model) are first answered by the suspicious model itself (greedy, cached); exact match
against a model's own free-form answers mostly measures whether greedy decoding drifts, so then
(``utility="auto"``) the rule keeps the held-out perplexity of those answers within ``ppl_keep``
(×1.10) of the suspicious model's instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from purifylib.defender import HOLDOUT_SHARE, answer_missing, split_clean
from purifylib.errors import PurifyError
from purifylib.neutralize import Neutralization
from purifylib.recipe import FRAGILITY_DRAWS, FRAGILITY_TAU, PRETRAINED_RECIPE, PurifyConfig

# --------------------------------------------------------------------------- from scratch or pretrained


def fragility(model, tokenizer, records: list[dict], seed: int = 0) -> float:
    """The factor by which re-initialising a random :data:`FRAGILITY_TAU` of every MLP module's channels
    (no repair) multiplies the perplexity of ``records``: the geometric mean over :data:`FRAGILITY_DRAWS`
    seeded draws of the channels and their fresh values. The model is restored after each."""
    import torch

    from purifylib.evaluate import perplexity
    from purifylib.models import channel_dim, components, layout, resolve
    from purifylib.neutralize import neutralized
    from purifylib.signature import Signature

    names = components(model, "mlp")
    layouts = {n: layout(model, n) for n in names}
    widths = {n: resolve(model, n).weight.shape[channel_dim(layouts[n])] for n in names}
    before = perplexity(model, tokenizer, records)
    logs = []
    for draw in range(seed, seed + FRAGILITY_DRAWS):
        g = torch.Generator().manual_seed(draw)
        sig = Signature(scores={n: torch.rand(widths[n], generator=g) for n in names}, layouts=layouts)
        with neutralized(model, sig, Neutralization(tau=FRAGILITY_TAU, way="reinit", seed=draw)):
            logs.append(math.log(perplexity(model, tokenizer, records) / before))
    return math.exp(sum(logs) / len(logs))


def choose_recipe(cfg: PurifyConfig, model, tokenizer, records: list[dict], notes: list) -> tuple:
    """(config, fragility, recipe): ``cfg`` as given (``configured``), or with :data:`PRETRAINED_RECIPE`
    when re-initialisation is the way and the model is fragile (``pretrained``). Fragility is measured
    under the full-weight threat only (an adapter's neutralization zeroes the adapter's own channels);
    ``None`` otherwise."""
    if cfg.variants.threat != "full":
        return cfg, None, "configured"
    ratio = fragility(model, tokenizer, records, seed=cfg.seed)
    if cfg.neutral == "reinit" and cfg.fragile_ppl and ratio > cfg.fragile_ppl:
        from purifylib.models import head_geometry

        switched = cfg.for_pretrained(head_geometry(model).n_heads)
        notes.append(f"re-initialising a random {FRAGILITY_TAU:.0%} of the MLP channels multiplies held-out "
                     f"perplexity by {ratio:.2f} (> {cfg.fragile_ppl:g}): a pretrained model; negation instead "
                     f"(alpha {switched.alpha}, every head, repair lr {switched.repair_lr:g} for "
                     f"{switched.repair_epochs:g} epochs, floor {switched.loo_asr_max:g}"
                     + (f"; LoRA variants at lr {switched.variants.lr:g})" if cfg.pretrained_lora else ")"))
        return switched, ratio, "pretrained"
    return cfg, ratio, "configured"


# --------------------------------------------------------------------------- leave-one-out τ


def probe_asr(model, tokenizer, records: list[dict], trigger: str, behaviour: str, seed: int = 0,
              kind: str = "word") -> float:
    """Share of ``records`` (trigger placed as ``kind`` says: a random word position, a prefix, a
    suffix) whose output shows ``behaviour``."""
    from purifylib.evaluate import generate, rate, tokens_for
    from purifylib.variants import poisoned_copy

    return rate(behaviour, generate(model, tokenizer, poisoned_copy(records, trigger, behaviour, seed, kind),
                                    max_new_tokens=tokens_for(tokenizer, behaviour)))


def loo_folds(model, tokenizer, variants, folds: list, signatures: list, tau: float, probe: list[dict],
              cfg: PurifyConfig) -> list[dict]:
    """ASR of each held-out variant's backdoor after neutralizing with the signature of the variants
    outside its fold (``folds[j]``: the variants ``signatures[j]`` leaves out: one behaviour family)."""
    from purifylib.neutralize import neutralized
    from purifylib.variants import carrying

    rows = []
    for held, sig in zip(folds, signatures):
        for k in held:
            plant = variants.config.plant(k)
            with carrying(model, variants, k), neutralized(model, sig, cfg.neutralization(tau), variants=variants):
                asr = probe_asr(model, tokenizer, probe, plant.trigger, plant.behaviour, seed=cfg.seed + k,
                                kind=plant.kind)
            rows.append({"tau": tau, "fold": k, "family": plant.family, "trigger": plant.trigger, "asr": asr})
            if asr > cfg.loo_asr_max:
                return rows  # this τ already fails; the other folds need not be measured
    return rows


def learnt_variants(planted: list[float], folds: list[list[int]], learnt_asr: float, notes: list) -> list[int]:
    """The variants that count: those whose own backdoor reached ``learnt_asr`` (all when it is 0), as
    long as at least two folds keep one (else all, and ``notes`` says why)."""
    use = [k for k, a in enumerate(planted) if a >= learnt_asr]
    if len(use) == len(planted):
        return use
    if sum(any(k in use for k in f) for f in folds) < 2:
        notes.append(f"fewer than two folds have a variant that learnt its backdoor to {learnt_asr:.0%}; "
                     "every variant counts")
        return list(range(len(planted)))
    notes.append(f"{len(planted) - len(use)} of {len(planted)} variants left out (own ASR below {learnt_asr:.0%}): "
                 + ", ".join(f"variant {k} {a:.0%}" for k, a in enumerate(planted) if k not in use))
    return use


# --------------------------------------------------------------------------- the pipeline


@dataclass
class PurifyResult:
    """The purified model and everything ``purify_report.json`` holds."""

    model: object
    tokenizer: object
    signature: object
    tau: float
    config: PurifyConfig
    folds: list = field(default_factory=list)
    tau_trials: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # a few held-out prompts answered before and after
    floor: float | None = None  # the leave-one-out floor (tau="auto"), before the utility step
    variants: object = None
    split: object = None  # the defender's data as this run divided it (hold-out, variants, repair)
    fragility: float | None = None  # held-out perplexity × after re-initialising 5% random MLP channels
    recipe: str = "configured"  # "pretrained" when the fragility check switched to PRETRAINED_RECIPE

    @property
    def neutralization(self) -> Neutralization:
        """How the returned model was neutralized: the config's way at the chosen τ."""
        return self.config.neutralization(self.tau)

    def ran(self, cfg: PurifyConfig) -> PurifyConfig:
        """``cfg`` with the recipe this run used (:data:`PRETRAINED_RECIPE`'s fields and the τ grid), for
        later steps that neutralize or repair as it did."""
        return dataclasses.replace(cfg, **{k: getattr(self.config, k) for k in (*PRETRAINED_RECIPE, "tau_grid",
                                                                                   "variants")})

    def rule_summary(self) -> dict:
        """The τ rule in a few scalars (a grid row keeps them): the floor, the weakest variant's own ASR
        before neutralization, the fragility and the recipe it chose, and each trial as ``tau:holds|fails``."""
        own = [f["asr"] for f in self.folds if f["tau"] == 0.0]
        return {"tau_floor": self.floor, "variants_min_asr": min(own) if own else None, "fragility": self.fragility,
                "recipe": self.recipe,
                "trials": " ".join(f"{t['tau']:g}:{'holds' if t['holds'] else 'fails'}" for t in self.tau_trials)}

    def folds_frame(self):
        import pandas as pd

        return pd.DataFrame(self.folds)

    def to_dict(self) -> dict:
        n = self.config.variants.n_variants
        repairs = max(1, len(self.tau_trials))
        return {
            "tau": self.tau, "tau_floor": self.floor, "config": self.config.to_dict(),
            "fragility": {"perplexity_factor": self.fragility, "threshold": self.config.fragile_ppl,
                          "tau": FRAGILITY_TAU, "recipe": self.recipe},
            "neutralization": self.neutralization.to_dict(), "metrics": self.metrics, "timings": self.timings,
            "loo_folds": self.folds, "tau_trials": self.tau_trials, "notes": self.notes, "samples": self.samples,
            "cost": {"fine_tunes": 2 * n + repairs, "paper_fine_tunes": 2 * n + 1,
                     # every stage's seconds (variants as recorded when trained) over one variant fine-tune's
                     "fine_tune_equivalents": round(sum(self.timings.get(k, 0) for k in (
                         "variants_recorded", "score", "choose_tau", "neutralize_repair")) / max(
                         self.timings.get("variant_mean", 1e-9), 1e-9), 2)},
            "signature": (self.neutralization.summary(self.signature).to_dict(orient="records")
                          if self.signature is not None else None),
        }


#: held-out prompts answered by the suspicious and the purified model for the report (``purify report``)
N_SAMPLES = 4


def _answers(model, tokenizer, records: list[dict]) -> list[str]:
    from purifylib.evaluate import generate

    return generate(model, tokenizer, records, max_new_tokens=40)


def _holdout_metrics(model, tokenizer, holdout) -> dict:
    from purifylib.evaluate import evaluate_clean

    return evaluate_clean(model, tokenizer, holdout).to_dict()


def purify(model_dir, clean: list[dict], cfg: PurifyConfig = PurifyConfig(), *, adapter_dir=None, cache_dir=None,
           progress: bool = True, device: str | None = None, dtype: str | None = None, on_stage=None) -> PurifyResult:
    """Purify the suspicious model at ``model_dir`` (plus ``adapter_dir`` under the adapter-only threat).

    ``on_stage(name)``, if given, is called as each stage starts (``answer``, ``variants``,
    ``score``, ``choose_tau``, ``neutralize_repair``, ``done``): benchmarks use it to attribute memory.
    """
    from purifylib.checkpoints import load_model
    from purifylib.neutralize import neutralize_and_repair
    from purifylib.signature import score
    from purifylib.variants import build_variants, carrying

    t_start = time.time()
    timings, notes = {}, []
    stage = on_stage or (lambda name: None)
    stage("answer")
    threat = cfg.variants.threat
    if threat == "adapter" and adapter_dir is None:
        raise PurifyError("--threat adapter needs the suspicious adapter (--adapter DIR)")
    clean, n_answered = answer_missing(model_dir, clean, adapter_dir=adapter_dir, threat=threat,
                                       max_new_tokens=cfg.answer_tokens, cache_dir=cache_dir, progress=progress,
                                       device=device, dtype=dtype)
    utility = cfg.utility if cfg.utility != "auto" else ("perplexity" if n_answered else "accuracy")
    if n_answered:
        notes.append(f"{n_answered} of {len(clean)} clean records had no answer and were answered by the suspicious "
                     f"model itself; utility for the tau rule: {utility}")
    asked, asked_holdout = cfg.variants.n_clean, cfg.n_holdout
    split, cfg = split_clean(clean, cfg)
    if cfg.n_holdout < asked_holdout:
        notes.append(f"{cfg.n_holdout} records held out instead of {asked_holdout} (at most {HOLDOUT_SHARE:.0%} of the "
                     "clean data, so that the variants keep enough to learn their backdoors)")
    if cfg.variants.n_clean < asked:
        notes.append(f"{cfg.variants.n_clean} clean records per variant instead of {asked} (the clean data is small)")

    def load():
        return load_model(model_dir, adapter=adapter_dir, merge=threat == "full", device=device, dtype=dtype)

    # the recipe first: a fragile (pretrained) model also trains its variants another way
    model, tok = load()
    metrics = {"suspicious": _holdout_metrics(model, tok, split.holdout)}
    cfg, frag, recipe = choose_recipe(cfg, model, tok, split.holdout, notes)
    del model, tok  # not held while the variants train (one model in memory at a time, as before)

    t = time.time()
    stage("variants")
    variants = build_variants(model_dir, split.variants, cfg.variants, adapter_dir=adapter_dir,
                              cache_dir=cache_dir, progress=progress, device=device, dtype=dtype)
    timings["variants"] = round(time.time() - t, 1)
    timings["variants_recorded"] = round(sum(v["seconds"] for v in variants.info), 1)  # as trained, cached or not
    timings["variant_mean"] = round(timings["variants_recorded"] / (2 * len(variants.info)), 2)

    stage("score")
    model, tok = load()
    shown = split.holdout[:N_SAMPLES]
    samples = [{"instruction": r["instruction"], "input": r.get("input", ""), "reference": r.get("output", ""),
                "suspicious": a} for r, a in zip(shown, _answers(model, tok, shown))]
    n = cfg.variants.n_variants
    probe = split.holdout[:min(100, len(split.holdout))]
    folds, trials, planted, use = [], [], [], list(range(n))
    families = cfg.variants.folds()  # one behaviour family per fold (one variant when families are not shared)
    if cfg.tau == "auto" or cfg.learnt_asr > 0:
        for k in range(n):  # each variant's own backdoor before any neutralization
            plant = cfg.variants.plant(k)
            with carrying(model, variants, k):
                planted.append(probe_asr(model, tok, probe, plant.trigger, plant.behaviour, seed=cfg.seed + k,
                                         kind=plant.kind))
            folds.append({"tau": 0.0, "fold": k, "family": plant.family, "trigger": plant.trigger, "asr": planted[-1]})
        if min(planted) < 0.5:
            notes.append(f"some variants did not learn their own backdoor (ASR {min(planted):.0%} before "
                         "neutralization): the leave-one-out rule has little to go on; train the variants longer")
        use = learnt_variants(planted, families, cfg.learnt_asr, notes)
    t = time.time()
    full_sig = score(model, variants, lam=cfg.lam, heads=cfg.heads > 0, progress=progress,
                     include=None if len(use) == n else use)
    timings["score"] = round(time.time() - t, 1)

    if cfg.tau == "auto":
        from purifylib.progress import bar, stop_early

        t = time.time()
        stage("choose_tau")
        groups = [g for g in ([k for k in fold if k in use] for fold in families) if g]
        loo = [score(model, variants, lam=cfg.lam, heads=cfg.heads > 0, progress=False,
                     include=[i for i in use if i not in held]) for held in groups]
        removing = None
        taus = bar(cfg.tau_grid, desc="choose tau (leave-one-family-out)", disable=not progress)
        for tau in taus:
            rows = loo_folds(model, tok, variants, groups, loo, tau, probe, cfg)
            folds += rows
            if len(rows) == len(use) and all(r["asr"] <= cfg.loo_asr_max for r in rows):
                removing = tau
                stop_early(taus, cfg.tau_grid.index(tau) + 1)  # the floor is found: the bar ends here, as done
                break
        if removing is None:
            removing = cfg.tau_grid[-1]
            notes.append(f"no tau on the grid removed every held-out variant's backdoor; using the largest, {removing}")
        timings["choose_tau"] = round(time.time() - t, 1)
    else:
        removing = cfg.tau

    t = time.time()
    stage("neutralize_repair")
    floor = cfg.acc_keep * metrics["suspicious"]["accuracy"]
    ceiling = cfg.ppl_keep * metrics["suspicious"]["perplexity"]
    kept: dict = {}  # at most one repaired model: the one the rule would return now
    teacher = cfg.repair_teacher(load, split)  # the untouched suspicious model, if the repair distils

    def trial(tau: float, keep_if_fails: bool = False) -> bool:
        """Neutralize at ``tau``, repair, measure held-out utility against the floor (or ceiling)."""
        model, tok = load()
        model = neutralize_and_repair(model, tok, full_sig, cfg.neutralization(tau), variants=variants,
                                      repair_records=split.repair, repair_cfg=cfg.repair_config(),
                                      teacher=teacher, progress=progress, desc=f"repair (tau {tau:g})")
        m = _holdout_metrics(model, tok, split.holdout)
        holds = m["accuracy"] >= floor if utility == "accuracy" else m["perplexity"] <= ceiling
        trials.append({"tau": tau, **m, "utility": utility, "accuracy_floor": floor, "perplexity_ceiling": ceiling,
                       "holds": holds})
        if holds or keep_if_fails:
            kept.clear()
            kept[tau] = (model, tok, m)
        return holds

    if cfg.tau != "auto":
        trial(cfg.tau, keep_if_fails=True)
    elif trial(removing, keep_if_fails=True):
        # the leave-one-out τ is a floor; cut as far above it as held-out accuracy allows (bisection)
        up = [x for x in cfg.tau_grid if x > removing]
        lo, hi = -1, len(up)  # up[lo] holds (lo = -1: the floor itself), up[hi] fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(up[mid]):
                lo = mid
            else:
                hi = mid
    elif cfg.prefer == "removal":
        m = trials[-1]
        notes.append(f"tau {removing:g}, the smallest that removed every held-out variant's backdoor, costs utility: "
                     f"held-out accuracy {m['accuracy']:.3f} (bound {floor:.3f}), perplexity {m['perplexity']:.3f} "
                     f"(bound {ceiling:.3f}); kept, since a smaller tau leaves the variants' backdoors in place")
    else:
        for x in [x for x in cfg.tau_grid if x < removing][::-1]:
            notes.append(f"tau {next(iter(kept)):g}: held-out {utility} outside its bound; trying a smaller tau")
            if trial(x, keep_if_fails=True):
                break
    tau, (model, tok, metrics["purified"]) = next(iter(kept.items()))
    for row, a in zip(samples, _answers(model, tok, shown)):
        row["purified"] = a
    timings["neutralize_repair"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t_start, 1)
    stage("done")
    return PurifyResult(model=model, tokenizer=tok, signature=full_sig, tau=tau, config=cfg,
                        folds=folds, tau_trials=trials, metrics=metrics, timings=timings, notes=notes,
                        samples=samples, floor=removing if cfg.tau == "auto" else None, variants=variants,
                        split=split, fragility=frag, recipe=recipe)


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("purifylib", "torch", "transformers", "peft", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_purified_into(result: PurifyResult, folder: Path, *, inputs: dict) -> None:
    """Write the purified model (or adapter), its signature and ``purify_report.json`` into ``folder``
    (an empty folder: ``purify run`` stages it with :func:`purifylib.outputs.staged_dir`)."""
    from purifylib.data import finite_json

    report = finite_json({"inputs": inputs, **result.to_dict(), "versions": versions()})
    sub = folder / ("adapter" if result.config.variants.threat == "adapter" else "model")
    result.model.save_pretrained(sub, safe_serialization=True)
    result.tokenizer.save_pretrained(sub)
    result.signature.save(folder / "signature")
    (folder / "purify_report.json").write_text(json.dumps(report, indent=1, default=str, allow_nan=False))
