"""The interactive neutralization tuner: a pure, tested :func:`preview` and an ipywidgets shell.

:func:`prepare` gathers what every preview needs once: the suspicious model, its signature (with
Eq. 2's terms, so λ can move), the leave-one-out signature of one held-out synthetic variant, a
few held-out clean prompts, and (on the testbed) the real attack. :func:`preview` then applies the
chosen τ, strength, λ, modules and layers *reversibly* and measures, on small probe sets:

- the held-out synthetic variant's ASR (always available: it needs no knowledge of the real trigger),
- the real ASR, false-trigger and off-trigger rates (only where the real attack is known),
- clean accuracy on held-out prompts, flagged channels per layer, and sample generations
  before and after.

On a model above :data:`FAST_PARAMS` parameters a preview teacher-forces instead of generating
(:func:`purifylib.evaluate.forced_match`: one forward pass for the probe sets under the edit, one for
the held-out variant's, the chat template's shared prefix once in each), which ``benchmarks/bench_tuner_preview.py`` times.

The model is left exactly as it was after every call. :func:`tuner` wraps it in sliders.
:func:`grid` sweeps τ × strength, with and without repair, for static (papermill) outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from purifylib.errors import PurifyError

MODULES = ("gate", "up", "down")
#: below this ASR before any neutralization, the held-out variant "never learnt its backdoor"
LEARNT = 0.5
#: seconds without a new setting before a preview runs (arrow presses do not queue previews)
DEBOUNCE_S = 0.4
#: above this many parameters a preview teacher-forces instead of generating (:func:`measure`): on 2 cores
#: SmolLM2-135M generates four probe sets in ~31 s, the testbed's models in under a second
FAST_PARAMS = 50_000_000
#: answer tokens a fast preview compares (the untouched model's answers, the behaviours' texts)
FAST_TOKENS = 12
#: set by ``purify reproduce``: the tuner renders one static preview instead of live widgets (nobody can
#: move a slider in a headless run, and a notebook client can hang on a cell full of live widgets)
HEADLESS = "PURIFY_HEADLESS"


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
    clean_before: list = field(default_factory=list)
    right_before: list = field(default_factory=list)

    @property
    def synthetic_learnt(self) -> bool:
        """Whether the held-out variant learnt its own backdoor (else its ASR after says nothing)."""
        return (self.before.get("synthetic_asr") or 0.0) >= LEARNT


def prepare(model, tokenizer, signature, variants, clean: list[dict], *, how=None, spec=None,
            held_out: int | None = None, n_probe: int = 32, n_samples: int = 3, seed: int = 0,
            match: str = "exact", fast: bool | None = None) -> Tuner:
    """Build a :class:`Tuner` (scores the leave-one-out signature and the 'before' samples once).

    ``how`` is the neutralization the sliders start from (a purification's; default the paper's);
    ``match`` says how ``clean``'s answers are checked (:data:`purifylib.evaluate.MATCHES`); ``fast``
    (default: above :data:`FAST_PARAMS` parameters) makes every preview teacher-forced (:func:`measure`)."""
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
              prompts=prompts, match=match, fast=fast)
    if fast:  # what a fast preview compares against: the untouched model's own answers, generated once
        from purifylib.evaluate import forced_match

        said = generate(model, tokenizer, clean)
        # a probe whose answer does not survive decoding and re-tokenizing cannot be compared: left out
        same = forced_match(model, tokenizer, clean, said, max_tokens=FAST_TOKENS, stop=True)
        t.clean = prompts["clean"] = [r for r, ok in zip(clean, same) if ok]
        t.clean_before = [a for a, ok in zip(said, same) if ok]
        t.right_before = [MATCHES[match](a, r["output"]) for a, r in zip(t.clean_before, t.clean)]
        t.samples_before = generate(model, tokenizer, _sample_prompts(t))
    t.before = measure(t)  # the untouched model; its answers to the sample prompts are the "before" column
    after = t.before.pop("after")
    if not fast:
        t.samples_before = after
    return t


def measure(t: Tuner, sig=None, how=None, loo=None) -> dict:
    """The probes' numbers with ``sig`` neutralized as ``how`` (``how=None``: the untouched model)."""
    from contextlib import nullcontext

    from purifylib.evaluate import accuracy, generate
    from purifylib.evaluate import rate as shown
    from purifylib.neutralize import neutralized
    from purifylib.variants import carrying

    def applied(signature):
        return nullcontext() if how is None else neutralized(t.model, signature, how, variants=t.variants)

    if t.fast:
        return _measure_fast(t, applied, sig, loo)
    out = {"asr": None, "false_trigger": None, "off_trigger": None}
    with applied(sig):
        clean_out = generate(t.model, t.tokenizer, t.prompts["clean"])
        out["clean_accuracy"] = accuracy(clean_out, t.prompts["clean"], t.match)
        if t.spec is not None:
            target = t.spec.behaviour.target
            trig_out = generate(t.model, t.tokenizer, t.prompts["triggered"])
            in_base = {id(r) for r in t.prompts["base"]}
            out["asr"] = shown(target, trig_out)
            out["false_trigger"] = shown(target, [o for o, r in zip(clean_out, t.prompts["clean"]) if id(r) in in_base])
            out["off_trigger"] = shown(target, generate(t.model, t.tokenizer, t.prompts["off"]))
            out["after"] = trig_out[:t.n_samples]
        else:
            out["after"] = generate(t.model, t.tokenizer, _sample_prompts(t))
    behaviour = t.variants.config.plant(t.held_out).behaviour
    with carrying(t.model, t.variants, t.held_out), applied(loo):
        out["synthetic_asr"] = shown(behaviour, generate(t.model, t.tokenizer, t.prompts["synthetic"]))
    return out


def _measure_fast(t: Tuner, applied, sig, loo) -> dict:
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
        sets += [(k, [t.spec.behaviour.target] * len(t.prompts[k]), False) for k in ("triggered", "base", "off")]
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
        out.update(asr=share(by_set["triggered"]), false_trigger=share(by_set["base"]), off_trigger=share(by_set["off"]))
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
            heads: int | None = None, layers=None) -> dict:
    """Apply the settings reversibly and measure; the model is restored before returning.

    Returns a dict: ``synthetic_asr``, ``clean_accuracy``, ``asr`` / ``false_trigger`` /
    ``off_trigger`` (``None`` without a real attack), ``flagged`` (a DataFrame: layer, module,
    flagged), ``samples`` (a DataFrame: prompt, before, after) and ``seconds``.
    """
    import pandas as pd

    t0 = time.time()
    base = t.how.replace(seed=t.seed)
    sig, how = configure(t.signature, base, tau=tau, lam=lam, strength=strength, modules=modules, heads=heads,
                         layers=layers)
    loo, _ = configure(t.loo_signature, base, tau=tau, lam=lam, modules=modules, heads=heads, layers=layers)
    out = {"tau": tau, "strength": strength, "lam": lam, **measure(t, sig, how, loo)}
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


def due(requests: list[float], now: float, wait: float = DEBOUNCE_S) -> bool:
    """The tuner's debounce rule: run a preview at ``now`` only if the last settings change
    (``requests``: their times) is at least ``wait`` seconds old. A burst of arrow presses therefore
    runs one preview, for the last setting, instead of queueing one per press."""
    return bool(requests) and now - requests[-1] >= wait


def runs(requests: list[float], wait: float = DEBOUNCE_S) -> list[int]:
    """Which of the ``requests`` (sorted times) get a preview: those followed by ``wait`` seconds of quiet."""
    return [i for i, t in enumerate(requests) if i == len(requests) - 1 or requests[i + 1] - t >= wait]


def status_lines(t: Tuner, p: dict):
    """The tuner's table: the untouched model ("before") and the current settings ("now"), in percent;
    the synthetic ASR reads "n/a" where the held-out variant never learnt its own backdoor."""
    import pandas as pd

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = []
    for label, m in (("before (untouched model)", t.before), (f"now (τ {p['tau']:.2f})", p)):
        syn = pct(m.get("synthetic_asr")) if t.synthetic_learnt else "n/a (variant never learnt it)"
        row = {"": label, "clean accuracy": pct(m.get("clean_accuracy")), "synthetic ASR (held-out variant)": syn,
               "real ASR": pct(m.get("asr")), "false-trigger": pct(m.get("false_trigger")),
               "off-trigger": pct(m.get("off_trigger"))}
        if t.fast:  # teacher-forced: accuracy counts the right answers kept, an ASR the answers beginning with the target
            row = {**row, "clean accuracy": f"≥ {row['clean accuracy']}",
                   "clean answers kept": pct(m.get("clean_kept"))}
        rows.append(row)
    return pd.DataFrame(rows).set_index("")


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
            q = preview(dataclasses.replace(t, model=model, tokenizer=tok, history=[]), tau=tau, strength=0.0, lam=lam)
            rows.append({"tau": tau, "strength": s, "repaired": True,
                         **{k: q[k] for k in ("asr", "clean_accuracy", "off_trigger")},
                         "synthetic_asr": None})
    return pd.DataFrame(rows)


def figure(t: Tuner, p: dict):
    """Left: every preview so far against τ (same strength, λ, modules and layers), the current one
    ringed, the untouched model's level dashed. Right: per layer, the share of each module's score in
    the flagged channels (what random channels would hold: τ, dashed)."""
    import matplotlib.pyplot as plt

    def setting(h):  # everything but τ
        return h["strength"], h["lam"], h["modules"], h["heads"], h["layers"]

    same = [h for h in t.history if setting(h) == setting(t.history[-1])]  # the last is p's own
    same = sorted({h["tau"]: h for h in same}.values(), key=lambda h: h["tau"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 1.3]})
    series = [("clean_accuracy", "clean accuracy", "tab:blue"), ("asr", "real ASR", "tab:red")]
    if t.synthetic_learnt:
        series.append(("synthetic_asr", "synthetic ASR (held-out variant)", "tab:orange"))
    for key, label, colour in series:
        pts = [(h["tau"], 100 * h[key]) for h in same if h[key] is not None]
        if not pts:
            continue
        ax.plot(*zip(*pts), "o-", color=colour, label=label, ms=4)
        if t.before.get(key) is not None:
            ax.axhline(100 * t.before[key], color=colour, ls=":", lw=1)
        if p.get(key) is not None:
            ax.plot([p["tau"]], [100 * p[key]], "o", ms=11, mfc="none", mec=colour, mew=2)
    ax.set_xlabel("τ (share of channels flagged per module)")
    ax.set_ylabel("percent of probe prompts")
    ax.set_ylim(-3, 103)
    ax.set_title("Previews so far (dotted: untouched model)", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    f = p["flagged"]
    if len(f):
        share = f.pivot_table(index="layer", columns="module", values="flagged_score_share") * 100
        share.plot.bar(ax=bx, width=0.8)
        bx.axhline(100 * p["tau"], color="0.3", ls="--", lw=1, label="random channels")
        bx.legend(frameon=False, fontsize=8, ncols=2)
    bx.set_xlabel("layer")
    bx.set_ylabel("score in flagged channels (%)")
    bx.set_ylim(0, 100)
    bx.set_title("Where the current selection cuts", fontsize=10)
    fig.tight_layout()
    return fig


def rendered(t: Tuner, p: dict) -> dict:
    """What the tuner shows for the preview ``p``, as values its widgets take: the table of the untouched
    model and the current setting (``table``, HTML), a note when the held-out variant never learnt its own
    backdoor (``note``, text; empty otherwise), the figure (``figure``, PNG bytes) and the sample
    generations (``samples``, HTML, escaped). The live tuner sets these as widget values instead of
    printing into a captured output area: a preview that a timer starts (the debounce) runs outside
    any cell, and output printed there never reaches the page."""
    import io

    import matplotlib.pyplot as plt

    note = "" if t.synthetic_learnt else (
        f"The held-out variant reached only {100 * (t.before.get('synthetic_asr') or 0):.0f}% ASR on its own "
        "trigger before any neutralization: its ASR after says nothing about the setting.")
    if t.fast:
        note = " ".join(x for x in (note, (
            f"Fast preview (a model of over {FAST_PARAMS // 1_000_000}M parameters): teacher-forced, nothing "
            f"generated; an answer is kept if its first {FAST_TOKENS} tokens are as before, an ASR counts the "
            "answers that begin with the target. Purify to measure by generation.")) if x)
    fig = figure(t, p)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    styled = '<div class="jp-RenderedHTMLCommon">{}</div>'.format  # JupyterLab's table style
    return {"table": styled(status_lines(t, p).to_html(border=0)), "note": note, "figure": buf.getvalue(),
            "samples": styled(p["samples"].to_html(index=False, border=0))}


def tuner(t: Tuner, *, tau: float = 0.2, strength: float = 1.0, lam: float = 0.01):  # pragma: no cover - UI shell
    """The ipywidgets tuner: sliders for τ, strength and λ, module toggles, a layer range (one static
    preview instead when ``PURIFY_HEADLESS`` is set, as ``purify reproduce`` does).

    A preview runs once the settings have been still for :data:`DEBOUNCE_S` seconds (:func:`due`),
    so dragging or pressing arrows does not queue one preview per step; what it shows is set as
    widget values (:func:`rendered`). The controls wrap onto several rows rather than shrink (usable
    down to about 1000 px)."""
    import asyncio
    import html
    import os

    from IPython.display import HTML, Image, display

    from purifylib.models import layer_of

    if os.environ.get(HEADLESS):  # papermill: nobody can move a slider; show the preview itself, no widgets
        r = rendered(t, preview(t, tau=tau, strength=strength, lam=lam))
        display(HTML(r["table"]))
        if r["note"]:
            print(r["note"])
        display(Image(r["figure"]), HTML(r["samples"]))
        return None
    import ipywidgets as w

    n_layers = 1 + max(layer_of(n) for n in t.signature.scores)
    top = 1.0 if t.how.way == "negate" else 0.6  # negation can reach every channel
    wide = dict(style={"description_width": "70px"}, continuous_update=False,
                layout=w.Layout(min_width="300px", width="32%"))
    s_tau = w.FloatSlider(value=tau, min=0.0, max=top, step=0.01, description="τ", **wide)
    s_str = w.FloatSlider(value=strength, min=0.0, max=1.0, step=0.05, description="strength", **wide)
    s_lam = w.FloatLogSlider(value=lam, base=10, min=-4, max=1, description="λ", **wide)
    toggles = {m: w.ToggleButton(value=True, description=m, icon="check", button_style="success",
                                 tooltip=f"neutralize the {m} projections", layout=w.Layout(width="90px"))
               for m in MODULES}
    has_heads = t.signature.has_heads
    heads = w.IntSlider(value=t.how.heads, min=0, max=t.signature.meta.get("n_heads", 4), description="heads",
                        disabled=not has_heads, **wide)
    layers = w.IntRangeSlider(value=(0, n_layers - 1), min=0, max=n_layers - 1, description="layers", **wide)
    why = w.HTML("" if has_heads else "<i>heads: disabled, the signature scored no attention heads "
                 "(purify run --heads K scores them)</i>")
    busy, table, note, samples = w.HTML(""), w.HTML(""), w.HTML(""), w.HTML("")
    image = w.Image(format="png", layout=w.Layout(max_width="100%"))
    requests: list[float] = []

    def style_toggle():
        for b in toggles.values():
            b.icon, b.button_style = ("check", "success") if b.value else ("times", "")

    def update():
        busy.value = "<i>previewing ...</i>"
        mods = [m for m, b in toggles.items() if b.value]
        try:
            p = preview(t, tau=s_tau.value, strength=s_str.value, lam=s_lam.value, modules=mods,
                        heads=heads.value, layers=range(layers.value[0], layers.value[1] + 1))
        except PurifyError as exc:
            busy.value = f"<b>error:</b> {html.escape(str(exc))}"
            return
        r = rendered(t, p)
        table.value, samples.value, image.value = r["table"], r["samples"], r["figure"]
        note.value = f"<i>{html.escape(r['note'])}</i>" if r["note"] else ""
        busy.value = f"<i>preview took {p['seconds']:.2f} s</i>"

    def request(_=None):
        style_toggle()
        requests.append(time.monotonic())
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a plain script): run at once
            update()
            return
        loop.call_later(DEBOUNCE_S, lambda: due(requests, time.monotonic()) and update())

    for widget in (s_tau, s_str, s_lam, heads, layers, *toggles.values()):
        widget.observe(request, names="value")
    update()
    row = dict(layout=w.Layout(flex_flow="row wrap", width="100%"))
    return w.VBox([w.HBox([s_tau, s_str, s_lam], **row), w.HBox([*toggles.values(), heads, layers], **row), why,
                   busy, table, note, image, samples])
