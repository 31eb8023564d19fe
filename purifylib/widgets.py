"""The interactive neutralization tuner: a pure, tested :func:`preview` and an ipywidgets shell.

:func:`prepare` gathers what every preview needs once: the suspicious model, its signature (with
Eq. 2's terms, so λ can move), the leave-one-out signature of one held-out synthetic variant, a
few held-out clean prompts, and (on the testbed) the real attack. :func:`preview` then applies the
chosen τ, strength, λ, modules and layers *reversibly* and measures, on small probe sets:

- the held-out synthetic variant's ASR (always available: it needs no knowledge of the real trigger),
- the real ASR, false-trigger and off-trigger rates (only where the real attack is known),
- clean accuracy on held-out prompts, flagged channels per layer, and sample generations
  before and after.

The model is left exactly as it was after every call. :func:`tuner` wraps it in sliders.
:func:`grid` sweeps τ × strength, with and without repair, for static (papermill) outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from purifylib.errors import PurifyError

MODULES = ("gate", "up", "down")


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


def prepare(model, tokenizer, signature, variants, clean: list[dict], *, how=None, spec=None,
            held_out: int | None = None, n_probe: int = 32, n_samples: int = 3, seed: int = 0,
            match: str = "exact") -> Tuner:
    """Build a :class:`Tuner` (scores the leave-one-out signature and the 'before' samples once).

    ``how`` is the neutralization the sliders start from (a purification's; default the paper's);
    ``match`` says how ``clean``'s answers are checked (:data:`purifylib.evaluate.MATCHES`)."""
    from purifylib.evaluate import attack_prompts, generate
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
    t = Tuner(model=model, tokenizer=tokenizer, signature=signature, loo_signature=loo, variants=variants,
              how=how or Neutralization(), held_out=k, clean=clean, spec=spec, n_samples=n_samples, seed=seed, prompts=prompts, match=match)
    t.samples_before = generate(model, tokenizer, _sample_prompts(t))
    return t


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
            heads: int | None = None, layers=None) -> dict:
    """Apply the settings reversibly and measure; the model is restored before returning.

    Returns a dict: ``synthetic_asr``, ``clean_accuracy``, ``asr`` / ``false_trigger`` /
    ``off_trigger`` (``None`` without a real attack), ``flagged`` (a DataFrame: layer, module,
    flagged), ``samples`` (a DataFrame: prompt, before, after) and ``seconds``.
    """
    import pandas as pd

    from purifylib.evaluate import accuracy, generate
    from purifylib.evaluate import rate as shown
    from purifylib.neutralize import neutralized
    from purifylib.variants import carrying

    t0 = time.time()
    base = t.how.replace(seed=t.seed)
    sig, how = configure(t.signature, base, tau=tau, lam=lam, strength=strength, modules=modules, heads=heads,
                         layers=layers)
    loo, _ = configure(t.loo_signature, base, tau=tau, lam=lam, modules=modules, heads=heads, layers=layers)
    out = {"tau": tau, "strength": strength, "lam": lam, "asr": None, "false_trigger": None, "off_trigger": None}
    with neutralized(t.model, sig, how, variants=t.variants):
        clean_out = generate(t.model, t.tokenizer, t.prompts["clean"])
        out["clean_accuracy"] = accuracy(clean_out, t.prompts["clean"], t.match)
        if t.spec is not None:
            target = t.spec.behaviour.target
            trig_out = generate(t.model, t.tokenizer, t.prompts["triggered"])
            in_base = {id(r) for r in t.prompts["base"]}
            out["asr"] = shown(target, trig_out)
            out["false_trigger"] = shown(target, [o for o, r in zip(clean_out, t.prompts["clean"]) if id(r) in in_base])
            out["off_trigger"] = shown(target, generate(t.model, t.tokenizer, t.prompts["off"]))
            after = trig_out[:t.n_samples]
        else:
            after = generate(t.model, t.tokenizer, _sample_prompts(t))
    behaviour = t.variants.config.plant(t.held_out).behaviour
    with carrying(t.model, t.variants, t.held_out), neutralized(t.model, loo, how, variants=t.variants):
        out["synthetic_asr"] = shown(behaviour, generate(t.model, t.tokenizer, t.prompts["synthetic"]))
    summary = how.summary(sig)
    out["flagged"] = summary[["layer", "module", "flagged"]] if len(summary) else pd.DataFrame(
        columns=["layer", "module", "flagged"])
    out["samples"] = pd.DataFrame({"prompt": [r["instruction"] for r in _sample_prompts(t)],
                                   "before": t.samples_before, "after": after})
    out["seconds"] = time.time() - t0
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
        p = preview(t, tau=tau, strength=s, lam=lam)
        rows.append({"tau": tau, "strength": s, "repaired": False,
                     **{k: p[k] for k in ("asr", "synthetic_asr", "clean_accuracy", "off_trigger")}})
        if repair_records is not None:
            if reload is None or repair_cfg is None:
                raise PurifyError("a grid with repair needs reload= and repair_cfg=")
            model, tok = reload()
            sig, how = configure(t.signature, t.how.replace(seed=t.seed), tau=tau, lam=lam, strength=s)
            model = neutralize_and_repair(model, tok, sig, how, variants=t.variants, repair_records=repair_records,
                                          repair_cfg=repair_cfg)
            q = preview(dataclasses.replace(t, model=model, tokenizer=tok), tau=tau, strength=0.0, lam=lam)
            rows.append({"tau": tau, "strength": s, "repaired": True,
                         **{k: q[k] for k in ("asr", "clean_accuracy", "off_trigger")},
                         "synthetic_asr": None})
    return pd.DataFrame(rows)


def tuner(t: Tuner, *, tau: float = 0.2, strength: float = 1.0, lam: float = 0.01):  # pragma: no cover - UI shell
    """The ipywidgets tuner: sliders for τ, strength and λ, module toggles, a layer range."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    from purifylib.models import layer_of

    n_layers = 1 + max(layer_of(n) for n in t.signature.scores)
    top = 1.0 if t.how.way == "negate" else 0.6  # negation can reach every channel
    s_tau = w.FloatSlider(value=tau, min=0.0, max=top, step=0.01, description="τ", continuous_update=False)
    s_str = w.FloatSlider(value=strength, min=0.0, max=1.0, step=0.05, description="strength", continuous_update=False)
    s_lam = w.FloatLogSlider(value=lam, base=10, min=-4, max=1, description="λ", continuous_update=False)
    toggles = {m: w.ToggleButton(value=True, description=m) for m in MODULES}
    heads = w.IntSlider(value=t.how.heads, min=0, max=t.signature.meta.get("n_heads", 4), description="heads",
                        disabled=not t.signature.has_heads, continuous_update=False)
    layers = w.IntRangeSlider(value=(0, n_layers - 1), min=0, max=n_layers - 1, description="layers",
                              continuous_update=False)
    out = w.Output()

    def update(_=None):
        with out:
            out.clear_output(wait=True)
            mods = [m for m, b in toggles.items() if b.value]
            try:
                p = preview(t, tau=s_tau.value, strength=s_str.value, lam=s_lam.value, modules=mods,
                            heads=heads.value, layers=range(layers.value[0], layers.value[1] + 1))
            except PurifyError as exc:
                print(f"error: {exc}")
                return
            fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            print(f"synthetic ASR {fmt(p['synthetic_asr'])} | real ASR {fmt(p['asr'])} | false-trigger "
                  f"{fmt(p['false_trigger'])} | off-trigger {fmt(p['off_trigger'])} | clean accuracy "
                  f"{fmt(p['clean_accuracy'])} | {p['seconds']:.2f} s")
            fig, ax = plt.subplots(figsize=(6, 2.4))
            if len(p["flagged"]):
                p["flagged"].pivot_table(index="layer", columns="module", values="flagged").plot.bar(ax=ax)
            ax.set_ylabel("flagged channels")
            plt.show()
            display(p["samples"])

    for widget in (s_tau, s_str, s_lam, heads, layers, *toggles.values()):
        widget.observe(update, names="value")
    update()
    return w.VBox([w.HBox([s_tau, s_str, s_lam]), w.HBox([*toggles.values(), heads, layers]), out])
