"""``purify report OUT``: one readable page for a ``purify run`` output folder.

It reads ``OUT/purify_report.json`` (nothing else: no model is loaded) and writes, into ``OUT`` or
``to``, a self-contained ``report.html`` (its figure inlined, no network) and ``report.md`` (its
figure beside it as ``report-signature.png``): the verdict line, the rule's notes, before/after
metrics on the defender's held-out data, the τ rule's trials and leave-one-family-out folds, the
signature per layer, sample generations before and after, timings and cost, and the config.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from purifylib.errors import PurifyError

REPORT_JSON = "purify_report.json"
FIGURE = "report-signature.png"


def load_report(folder: str | Path) -> dict:
    """``folder/purify_report.json``, or a one-line error that says what is wrong with it."""
    from purifylib.data import read_text

    path = Path(folder) / REPORT_JSON
    if not Path(folder).is_dir():
        raise PurifyError(f"{folder}: not a folder (give the --out folder of a purify run)")
    if not path.is_file():
        raise PurifyError(f"{folder}: no {REPORT_JSON} (not the output folder of a purify run)")
    try:
        report = json.loads(read_text(path, "run report"))
    except json.JSONDecodeError as exc:
        raise PurifyError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(report, dict):
        raise PurifyError(f"{path}: expected a JSON object")
    for key in ("tau", "config", "metrics"):
        if key not in report:
            raise PurifyError(f"{path}: field '{key}' is missing (not written by purify run?)")
    if not {"suspicious", "purified"} <= set(report["metrics"] or {}):
        raise PurifyError(f"{path}: field 'metrics' needs 'suspicious' and 'purified'")
    return report


# --------------------------------------------------------------------------- content, as tables


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def headline(report: dict) -> str:
    """One sentence: what the run chose and what it cost on the held-out data."""
    s, p = report["metrics"]["suspicious"], report["metrics"]["purified"]
    way = (report.get("neutralization") or {}).get("way", report["config"].get("neutral", ""))
    return (f"tau {report['tau']:g} ({way}): held-out accuracy {_num(s.get('accuracy'))} -> "
            f"{_num(p.get('accuracy'))}, perplexity {_num(s.get('perplexity'))} -> {_num(p.get('perplexity'))}")


def metrics_rows(report: dict) -> list[list[str]]:
    s, p = report["metrics"]["suspicious"], report["metrics"]["purified"]
    keys = [k for k in s if isinstance(s.get(k), (int, float)) and k in p]
    return [[k.replace("_", " "), _num(s[k], 4), _num(p[k], 4)] for k in keys]


def fragility_rows(report: dict) -> list[list[str]]:
    """The property that chose the recipe (absent from reports written before it was measured)."""
    f = report.get("fragility") or {}
    if f.get("perplexity_factor") is None:
        return []
    return [[f"held-out perplexity x, {f['tau']:.0%} random MLP channels re-initialised", _num(f["perplexity_factor"])],
            ["threshold (fragile_ppl; above it: the pretrained recipe)", f"{f['threshold']:g}"],
            ["recipe that ran", f["recipe"]]]


def trial_rows(report: dict) -> list[list[str]]:
    rows = []
    for t in report.get("tau_trials") or []:
        bound = (f">= {_num(t.get('accuracy_floor'))}" if t.get("utility") == "accuracy"
                 else f"<= {_num(t.get('perplexity_ceiling'))}")
        rows.append([f"{t['tau']:g}", _num(t.get("accuracy")), _num(t.get("perplexity")),
                     f"{t.get('utility', '')} {bound}", "yes" if t.get("holds") else "no"])
    return rows


def fold_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Held-out variants' ASR (rows: variant, columns: τ; τ 0 is before any neutralization)."""
    folds = report.get("loo_folds") or []
    taus = sorted({f["tau"] for f in folds})
    by = {}
    for f in folds:
        by.setdefault((f["fold"], f.get("family", ""), f.get("trigger", "")), {})[f["tau"]] = f["asr"]
    header = ["variant", "family", "trigger"] + [("before" if t == 0 else f"tau {t:g}") for t in taus]
    rows = [[str(k), fam, trig] + [_pct(v.get(t)) if t in v else "-" for t in taus]
            for (k, fam, trig), v in sorted(by.items())]
    return header, rows


def signature_rows(report: dict) -> list[list[str]]:
    """Per layer: channels flagged and the share of the signature's score they hold, summed over modules."""
    per = {}
    for r in report.get("signature") or []:
        d = per.setdefault(r["layer"], {"channels": 0, "flagged": 0, "modules": 0})
        d["channels"] += r["channels"]
        d["flagged"] += r["flagged"]
    return [[str(layer), str(d["flagged"]), str(d["channels"])] for layer, d in sorted(per.items())]


def config_rows(report: dict) -> list[list[str]]:
    rows = []
    for k, v in report["config"].items():
        if isinstance(v, dict):
            rows += [[f"{k}.{kk}", _short(vv)] for kk, vv in v.items()]
        else:
            rows.append([k, _short(v)])
    return rows


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 160 else text[:157] + "..."


def cost_rows(report: dict) -> list[list[str]]:
    rows = [[k.replace("_", " "), f"{v:g} s"] for k, v in (report.get("timings") or {}).items()
            if isinstance(v, (int, float))]
    cost = report.get("cost") or {}
    if cost:
        rows += [["fine-tunes (2N + repairs)", str(cost.get("fine_tunes"))],
                 ["the paper's 2N + 1", str(cost.get("paper_fine_tunes"))],
                 ["fine-tune equivalents (time)", str(cost.get("fine_tune_equivalents"))]]
    return rows


# --------------------------------------------------------------------------- the figure


def signature_figure(report: dict):
    """Per layer and MLP module: the share of the module's score in its flagged channels (bars), or
    ``None`` when the report carries no signature summary."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in report.get("signature") or [] if r.get("part", "mlp") == "mlp"]
    if not rows:
        return None
    modules = sorted({r["module"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) * len(modules) + 2), 3.2))
    width = 0.8 / len(modules)
    for j, mod in enumerate(modules):
        share = {r["layer"]: r["flagged_score_share"] for r in rows if r["module"] == mod}
        ax.bar([i + j * width for i in range(len(layers))], [100 * share.get(layer, 0.0) for layer in layers],
               width=width, label=f"{mod} projection")
    ax.axhline(100 * report["tau"], color="0.3", ls="--", lw=1, label="random channels (expected share)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("score in flagged channels (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Where the signature points at tau {report['tau']:g}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- HTML and markdown


def _sections(report: dict):
    """(title, header, rows) for every table of the page, in order."""
    samples = report.get("samples") or []
    fh, fr = fold_table(report)
    inputs = report.get("inputs") or {}
    return [
        ("Inputs", ["input", "value"], [[k, _short(v)] for k, v in inputs.items()]),
        ("Recipe: trained from scratch or pretrained", ["measured", "value"], fragility_rows(report)),
        ("Held-out metrics, before and after", ["metric", "suspicious", "purified"], metrics_rows(report)),
        ("The tau rule: each trial (neutralize, repair, measure)", ["tau", "accuracy", "perplexity", "bound", "holds"],
         trial_rows(report)),
        ("Leave-one-family-out: held-out variants' ASR", fh, fr),
        ("Signature per layer (channels flagged at the chosen tau)", ["layer", "flagged", "channels"],
         signature_rows(report)),
        ("Sample generations on held-out prompts", ["prompt", "reference", "suspicious", "purified"],
         [[(s.get("instruction", "") + (" " + s["input"] if s.get("input") else "")), s.get("reference", ""),
           s.get("suspicious", ""), s.get("purified", "")] for s in samples]),
        ("Timings and cost", ["stage", "value"], cost_rows(report)),
        ("Config", ["setting", "value"], config_rows(report)),
        ("Versions", ["package", "version"], [[k, str(v)] for k, v in (report.get("versions") or {}).items()]),
    ]


def _html_table(header, rows) -> str:
    if not rows:
        return "<p class='empty'>(none in this run)</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header, rows) -> str:
    import pandas as pd

    from purifylib.reports import to_markdown

    return to_markdown(pd.DataFrame(rows, columns=header)) if rows else "(none in this run)\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}.note{background:#fff6e0;border-left:4px solid #e0a000;
padding:6px 10px;margin:6px 0}.empty{color:#777}img{max-width:100%}h1{font-size:22px}h2{font-size:18px;margin-top:1.5em}"""


def render_html(report: dict, png: bytes | None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>purify run report</title>"
             f"<style>{CSS}</style></head><body>", "<h1>purify run report</h1>",
             f"<p><b>{html.escape(headline(report))}</b></p>"]
    parts += [f"<div class='note'>{html.escape(n)}</div>" for n in report.get("notes") or []]
    for title, header, rows in _sections(report):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if title.startswith("Signature") and png:
            parts.append(f"<img alt='signature per layer' src='data:image/png;base64,"
                         f"{base64.b64encode(png).decode()}'>")
        parts.append(_html_table(header, rows))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(report: dict, figure_name: str | None) -> str:
    parts = ["# purify run report\n", f"**{headline(report)}**\n"]
    parts += [f"> {n}\n" for n in report.get("notes") or []]
    for title, header, rows in _sections(report):
        parts.append(f"## {title}\n")
        if title.startswith("Signature") and figure_name:
            parts.append(f"![signature per layer]({figure_name})\n")
        parts.append(_md_table(header, rows))
    return "\n".join(parts)


def write_report(folder: str | Path, to: str | Path | None = None) -> list[Path]:
    """Render ``folder``'s run report into ``to`` (default: ``folder``); returns the paths written."""
    from purifylib.data import atomic_write_text

    report = load_report(folder)
    out = Path(to or folder)
    fig = signature_figure(report)
    png = _png(fig) if fig is not None else None
    html_text, md_text = render_html(report, png), render_markdown(report, FIGURE if png else None)
    paths = []
    if png:
        atomic_write_text(out / FIGURE, png)
        paths.append(out / FIGURE)
    atomic_write_text(out / "report.md", md_text)
    atomic_write_text(out / "report.html", html_text)
    return paths + [out / "report.md", out / "report.html"]
