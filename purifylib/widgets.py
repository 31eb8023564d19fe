"""The tuner in the browser: ipywidgets sliders around :func:`purifylib.tuner.preview`.

:func:`tuner` shows the untouched model's numbers beside the current setting's (:func:`status_lines`),
the previews so far against τ and where the selection cuts (:func:`figure`), and sample generations;
a preview runs once the controls have been still for :data:`DEBOUNCE_S` (:func:`due`, :func:`runs`).
Under ``purify reproduce`` (:data:`HEADLESS`) it renders one static preview instead.
"""

from __future__ import annotations

import time

from purifylib.errors import PurifyError
from purifylib.tuner import FAST_PARAMS, FAST_TOKENS, MODULES, Tuner, preview

#: seconds without a new setting before a preview runs (arrow presses do not queue previews)
DEBOUNCE_S = 0.4
#: set by ``purify reproduce``: the tuner renders one static preview instead of live widgets (nobody can
#: move a slider in a headless run, and a notebook client can hang on a cell full of live widgets)
HEADLESS = "PURIFY_HEADLESS"


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

    def pct(v, missing="n/a"):
        return missing if v is None else f"{100 * v:.1f}%"

    live = "n/a" if t.spec is None else "not previewed (see the grid)"

    rows = []
    for label, m in (("before (untouched model)", t.before), (f"now (τ {p['tau']:.2f})", p)):
        syn = pct(m.get("synthetic_asr")) if t.synthetic_learnt else "n/a (variant never learnt it)"
        row = {"": label, "clean accuracy": pct(m.get("clean_accuracy")), "synthetic ASR (held-out variant)": syn,
               "real ASR": pct(m.get("asr")), "false-trigger": pct(m.get("false_trigger"), live),
               "off-trigger": pct(m.get("off_trigger"), live)}
        if t.fast:  # teacher-forced: accuracy counts the right answers kept, an ASR the answers beginning with the target
            row = {**row, "clean accuracy": f"≥ {row['clean accuracy']}",
                   "clean answers kept": pct(m.get("clean_kept"))}
        rows.append(row)
    return pd.DataFrame(rows).set_index("")


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


def tuner(t: Tuner, *, tau: float = 0.2, strength: float = 1.0, lam: float = 0.01,
          live_probe: int | None = None):  # pragma: no cover - UI shell
    """The ipywidgets tuner: sliders for τ, strength and λ, module toggles, a layer range (one static
    preview instead when ``PURIFY_HEADLESS`` is set, as ``purify reproduce`` does). ``live_probe``: the
    sliders' previews use only that many prompts per probe set (:func:`purifylib.tuner.narrowed`, with
    its own "before" row), so that a preview on a large model stays quick.

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

    from purifylib.tuner import narrowed

    if live_probe is not None:
        t = narrowed(t, live_probe)

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
        busy.value = f"<i>preview took {p['seconds']:.2f} s on {len(t.clean)} clean probe prompts</i>"

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
