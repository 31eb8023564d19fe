"""The tuner's measurements, without any UI: a pure, tested :func:`preview` (the ipywidgets shell
around it is :mod:`purifylib.widgets`).

:func:`prepare` gathers what every preview needs once: the suspicious model, its signature (with
Eq. 2's terms, so λ can move), the leave-one-out signature of one held-out synthetic variant, a
few held-out clean prompts, and (on the testbed) the real attack. :func:`preview` then applies the
chosen τ, strength, λ, modules and layers *reversibly* and measures, on small probe sets:

- the held-out synthetic variant's ASR (always available: it needs no knowledge of the real trigger),
- the real ASR, false-trigger and off-trigger rates (only where the real attack is known; a fast
  preview leaves the last two to the "before" row and :func:`grid` unless ``prepare(sides=True)``),
- clean accuracy on held-out prompts, flagged channels per layer, and sample generations
  before and after.

On a model above :data:`FAST_PARAMS` parameters a preview teacher-forces instead of generating
(:func:`purifylib.evaluate.forced_match`: one forward pass for the probe sets under the edit, one for
the held-out variant's, the chat template's shared prefix once in each), which
``benchmarks/bench_tuner_preview.py`` times. A neutralization computes only its flagged slices, and
the variants' mean differences are kept in memory (:meth:`purifylib.variants.Variants.memoized`), so
a preview after the first reads nothing from disk.

The model is left exactly as it was after every call. :func:`grid` sweeps τ × strength, with and
without repair, for static (papermill) outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from purifylib.errors import PurifyError

MODULES = ("gate", "up", "down")
#: below this ASR before any neutralization, the held-out variant "never learnt its backdoor"
LEARNT = 0.5
#: above this many parameters a preview teacher-forces instead of generating (:func:`measure`): on 2 cores
#: SmolLM2-135M generates four probe sets in ~31 s, the testbed's models in under a second
FAST_PARAMS = 50_000_000
#: answer tokens a fast preview compares (the untouched model's answers, the behaviours' texts)
FAST_TOKENS = 12


@dataclass
class Tuner:
    """Everything :func:`preview` needs, prepared once."""

    model: object
    tokenizer: object
    signature: object  # all variants, with terms
    loo_signature: object  # without the held-out variant
    variants: object
    how: object  # the neutralization the sliders start from (way, alpha, heads; purifylib.neutralize)
    held_out: int  # index of the held-out synthetic variant
    clean: list  # held-out clean prompts with reference answers
    spec: object = None  # the real attack (testbed only)
    n_samples: int = 3
    seed: int = 0
    samples_before: list = field(default_factory=list)
    prompts: dict = field(default_factory=dict)
    match: str = "exact"
    before: dict = field(default_factory=dict)  # the untouched model's numbers on the same probes
    history: list = field(default_factory=list)  # the previews so far (the tuner plots them against τ)
    # teacher-forced previews (:func:`measure`); the untouched model's clean answers and which were right
    fast: bool = False
    # whether previews measure the real attack's false- and off-trigger rates (:func:`prepare`)
    sides: bool = True
    clean_before: list = field(default_factory=list)
    right_before: list = field(default_factory=list)

    @property
    def synthetic_learnt(self) -> bool:
        """Whether the held-out variant learnt its own backdoor (else its ASR after says nothing)."""
        return (self.before.get("synthetic_asr") or 0.0) >= LEARNT


def prepare(model, tokenizer, signature, variants, clean: list[dict], *, how=None, spec=None,
            held_out: int | None = None, n_probe: int = 32, n_samples: int = 3, seed: int = 0,
            match: str = "exact", fast: bool | None = None, sides: bool | None = None) -> Tuner:
    """Build a :class:`Tuner` (scores the leave-one-out signature and the 'before' samples once).

    ``how`` is the neutralization the sliders start from (a purification's; default the paper's);
    ``match`` says how ``clean``'s answers are checked (:data:`purifylib.evaluate.MATCHES`); ``fast``
    (default: above :data:`FAST_PARAMS` parameters) makes every preview teacher-forced (:func:`measure`);
    ``sides`` (default: not on a fast preview) makes every preview also measure the real attack's
    false- and off-trigger rates. A fast preview without them runs half the probe prompts: moving a
    slider only lowers those rates (the untouched model's are in the "before" row), and :func:`grid`
    measures them at every cell."""
    from purifylib.evaluate import MATCHES, attack_prompts, generate
    from purifylib.neutralize import Neutralization
    from purifylib.signature import score
    from purifylib.variants import poisoned_copy

    n = variants.config.n_variants
    if n < 2:
        raise PurifyError("the tuner needs at least two variants (one is held out)")
    if not signature.terms:
        raise PurifyError("the signature keeps no score terms (rebuild it with signature.score)")
    k = n - 1 if held_out is None else held_out
    if not 0 <= k < n:
        raise PurifyError(f"held_out must be in 0..{n - 1}, got {held_out}")
    loo = score(model, variants, include=[i for i in range(n) if i != k], heads=signature.has_heads,
                progress=False)
    clean = clean[:n_probe]
    plant = variants.config.plant(k)
    prompts = {"clean": clean, "synthetic": poisoned_copy(clean, plant.trigger, plant.behaviour, seed, plant.kind)}
    if spec is not None:
        base, trig, off = attack_prompts(clean, spec, seed)
        prompts.update(base=base, triggered=trig[:n_probe], off=off[:n_probe])
    # every preview applies the same updates: keep what it reads in memory instead of re-reading the files
    if fast is None:
        fast = sum(p.numel() for p in model.parameters()) > FAST_PARAMS
    t = Tuner(model=model, tokenizer=tokenizer, signature=signature, loo_signature=loo, variants=variants.memoized(),
              how=how or Neutralization(), held_out=k, clean=clean, spec=spec, n_samples=n_samples, seed=seed,
              prompts=prompts, match=match, fast=fast, sides=not fast if sides is None else bool(sides))
    if fast:  # what a fast preview compares against: the untouched model's own answers, generated once
        from purifylib.evaluate import forced_match

        said = generate(model, tokenizer, clean)
        # a probe whose answer does not survive decoding and re-tokenizing cannot be compared: left out
        same = forced_match(model, tokenizer, clean, said, max_tokens=FAST_TOKENS, stop=True)
        t.clean = prompts["clean"] = [r for r, ok in zip(clean, same) if ok]
        t.clean_before = [a for a, ok in zip(said, same) if ok]
        t.right_before = [MATCHES[match](a, r["output"]) for a, r in zip(t.clean_before, t.clean)]
        t.samples_before = generate(model, tokenizer, _sample_prompts(t))
    return _with_before(t)


def _with_before(t: Tuner) -> Tuner:
    """``t`` with the untouched model measured on its probes (the "before" row); a generating tuner's
    answers to the sample prompts become the samples' "before" column."""
    t.before = measure(t, sides=True)
    after = t.before.pop("after")
    if not t.fast:
        t.samples_before = after
    return t


def narrowed(t: Tuner, n_probe: int) -> Tuner:
    """``t`` on the first ``n_probe`` prompts of each probe set, with its own "before" row (one measure of
    the untouched model): the live sliders' probes, where a preview must be quick, while :func:`grid` and
    the static preview keep ``t``'s. It shares ``t``'s model, signatures and variants (``t`` itself when
    ``n_probe`` is not smaller than its probe sets)."""
    import dataclasses

    if int(n_probe) != n_probe or n_probe < 1:
        raise PurifyError(f"live probes must be a whole number >= 1, got {n_probe}")
    n = int(n_probe)
    if n >= max(len(v) for v in t.prompts.values()):
        return t
    prompts = {k: v[:n] for k, v in t.prompts.items()}
    live = dataclasses.replace(t, clean=prompts["clean"], prompts=prompts, clean_before=t.clean_before[:n],
                               right_before=t.right_before[:n], n_samples=min(t.n_samples, n),
                               samples_before=t.samples_before[:min(t.n_samples, n)], before={}, history=[])
    return _with_before(live)


def measure(t: Tuner, sig=None, how=None, loo=None, sides: bool | None = None) -> dict:
    """The probes' numbers with ``sig`` neutralized as ``how`` (``how=None``: the untouched model);
    ``sides`` (default ``t.sides``): also the real attack's false- and off-trigger rates."""
    from contextlib import nullcontext

    from purifylib.evaluate import accuracy, generate
    from purifylib.evaluate import rate as shown
    from purifylib.neutralize import neutralized
    from purifylib.variants import carrying

    def applied(signature):
        return nullcontext() if how is None else neutralized(t.model, signature, how, variants=t.variants)

    sides = t.sides if sides is None else sides
    if t.fast:
        return _measure_fast(t, applied, sig, loo, sides)
    out = {"asr": None, "false_trigger": None, "off_trigger": None}
    with applied(sig):
        clean_out = generate(t.model, t.tokenizer, t.prompts["clean"])
        out["clean_accuracy"] = accuracy(clean_out, t.prompts["clean"], t.match)
        if t.spec is not None:
            target = t.spec.behaviour.target
            trig_out = generate(t.model, t.tokenizer, t.prompts["triggered"])
            in_base = {id(r) for r in t.prompts["base"]}
            out["asr"] = shown(target, trig_out)
            if sides:
                out["false_trigger"] = shown(target, [o for o, r in zip(clean_out, t.prompts["clean"])
                                                      if id(r) in in_base])
                out["off_trigger"] = shown(target, generate(t.model, t.tokenizer, t.prompts["off"]))
            out["after"] = trig_out[:t.n_samples]
        else:
            out["after"] = generate(t.model, t.tokenizer, _sample_prompts(t))
    behaviour = t.variants.config.plant(t.held_out).behaviour
    with carrying(t.model, t.variants, t.held_out), applied(loo):
        out["synthetic_asr"] = shown(behaviour, generate(t.model, t.tokenizer, t.prompts["synthetic"]))
    return out


def _measure_fast(t: Tuner, applied, sig, loo, sides: bool) -> dict:
    """:func:`measure` by teacher forcing (:func:`purifylib.evaluate.forced_match`): one forward pass
    for the probe sets under the edit (clean, triggered, false- and off-trigger together), one for the
    held-out variant's: an answer *kept* is one whose first :data:`FAST_TOKENS` tokens greedy decoding
    still gives as the untouched model did, so clean accuracy is a floor (the right answers kept); an ASR
    is the share of triggered probes whose answer begins with the target. No samples are generated."""
    from purifylib.evaluate import forced_match
    from purifylib.variants import carrying

    def share(hits):
        return sum(hits) / max(len(hits), 1)

    out = {"asr": None, "false_trigger": None, "off_trigger": None, "after": None}
    sets = [("clean", t.clean_before, True)]  # (probe set, targets, stop after them)
    if t.spec is not None:
        sets += [(k, [t.spec.behaviour.target] * len(t.prompts[k]), False)
                 for k in (("triggered", "base", "off") if sides else ("triggered",))]
    records = [r for k, _, _ in sets for r in t.prompts[k]]
    with applied(sig):
        hits = forced_match(t.model, t.tokenizer, records, [x for _, xs, _ in sets for x in xs],
                            max_tokens=FAST_TOKENS, stop=[s for k, _, s in sets for _ in t.prompts[k]])
    by_set, at = {}, 0
    for k, _, _ in sets:
        by_set[k], at = hits[at:at + len(t.prompts[k])], at + len(t.prompts[k])
    kept = by_set["clean"]
    out["clean_kept"] = share(kept)
    out["clean_accuracy"] = sum(k and r for k, r in zip(kept, t.right_before)) / max(len(kept), 1)
    if t.spec is not None:
        out["asr"] = share(by_set["triggered"])
        if sides:
            out.update(false_trigger=share(by_set["base"]), off_trigger=share(by_set["off"]))
    behaviour = t.variants.config.plant(t.held_out).behaviour
    synthetic = t.prompts["synthetic"]
    with carrying(t.model, t.variants, t.held_out), applied(loo):
        out["synthetic_asr"] = share(forced_match(t.model, t.tokenizer, synthetic, [behaviour] * len(synthetic),
                                                  max_tokens=FAST_TOKENS))
    return out


def _sample_prompts(t: Tuner) -> list[dict]:
    return (t.prompts.get("triggered") or t.prompts["synthetic"])[:t.n_samples]


def configure(signature, how, *, tau: float, lam: float, strength: float | None = None, modules=MODULES,
              heads: int | None = None, layers=None):
    """What the sliders describe: the signature at λ, restricted to the module kinds and layer range,
    and ``how`` at τ, heads (``None``: ``how``'s, e.g. a purification's) and strength (``None``: ``how``'s)."""
    heads = how.heads if heads is None else heads
    mods = tuple(modules) + (("heads",) if heads else ())
    if not mods:
        raise PurifyError("choose at least one module (gate, up, down or heads)")
    return (signature.with_lambda(lam).select(modules=mods, layers=layers),
            how.replace(tau=tau, heads=heads, strength=how.strength if strength is None else strength))


def preview(t: Tuner, *, tau: float, strength: float = 1.0, lam: float = 0.01, modules=MODULES,
            heads: int | None = None, layers=None, sides: bool | None = None) -> dict:
    """Apply the settings reversibly and measure; the model is restored before returning.

    Returns a dict: ``synthetic_asr``, ``clean_accuracy``, ``asr`` / ``false_trigger`` /
    ``off_trigger`` (``None`` without a real attack; the last two ``None`` unless ``sides``, default
    ``t.sides``), ``flagged`` (a DataFrame: layer, module,
    flagged), ``samples`` (a DataFrame: prompt, before, after) and ``seconds``.
    """
    import pandas as pd

    t0 = time.time()
    base = t.how.replace(seed=t.seed)
    sig, how = configure(t.signature, base, tau=tau, lam=lam, strength=strength, modules=modules, heads=heads,
                         layers=layers)
    loo, _ = configure(t.loo_signature, base, tau=tau, lam=lam, modules=modules, heads=heads, layers=layers)
    out = {"tau": tau, "strength": strength, "lam": lam, **measure(t, sig, how, loo, sides)}
    after = out.pop("after") or ["(a fast preview generates nothing)"] * len(t.samples_before)
    summary = how.summary(sig)
    cols = ["layer", "module", "flagged", "flagged_score_share"]
    out["flagged"] = summary[cols] if len(summary) else pd.DataFrame(columns=cols)
    out["samples"] = pd.DataFrame({"prompt": [r["instruction"] for r in _sample_prompts(t)],
                                   "before": t.samples_before, "after": after})
    out["seconds"] = time.time() - t0
    t.history.append({k: out[k] for k in ("tau", "strength", "lam", "asr", "synthetic_asr", "clean_accuracy")}
                     | {"modules": tuple(modules), "heads": heads, "layers": None if layers is None else tuple(layers)})
    return out


def grid(t: Tuner, taus, strengths, *, repair_records: list[dict] | None = None, repair_cfg=None,
         lam: float = 0.01, reload=None, progress: bool = True):
    """ASR and clean accuracy over τ × strength (rows: tau, strength, repaired, metrics).

    Without repair each cell is a :func:`preview`. With ``repair_records`` each cell is also
    repaired: ``reload()`` must return a fresh ``(model, tokenizer)`` of the suspicious model, which
    is neutralized, fine-tuned with ``repair_cfg`` and measured on the same probes.
    """
    import dataclasses

    import pandas as pd
    from purifylib.progress import bar as tqdm

    from purifylib.neutralize import neutralize_and_repair

    rows = []
    cells = [(a, s) for a in taus for s in strengths]
    for tau, s in tqdm(cells, desc="tau x strength", disable=not progress):
        p = preview(t, tau=tau, strength=s, lam=lam, sides=True)
        rows.append({"tau": tau, "strength": s, "repaired": False,
                     **{k: p[k] for k in ("asr", "synthetic_asr", "clean_accuracy", "off_trigger")}})
        if repair_records is not None:
            if reload is None or repair_cfg is None:
                raise PurifyError("a grid with repair needs reload= and repair_cfg=")
            model, tok = reload()
            sig, how = configure(t.signature, t.how.replace(seed=t.seed), tau=tau, lam=lam, strength=s)
            model = neutralize_and_repair(model, tok, sig, how, variants=t.variants, repair_records=repair_records,
                                          repair_cfg=repair_cfg)
            q = preview(dataclasses.replace(t, model=model, tokenizer=tok, history=[]), tau=tau, strength=0.0, lam=lam,
                        sides=True)
            rows.append({"tau": tau, "strength": s, "repaired": True,
                         **{k: q[k] for k in ("asr", "clean_accuracy", "off_trigger")},
                         "synthetic_asr": None})
    return pd.DataFrame(rows)
