"""Where outputs go: figures, tables and metrics under one reports directory.

The directory is, in order: the ``reports_dir`` argument, the ``PURIFY_REPORTS_DIR`` environment
variable (the runner and the tests set it), or ``reports/interactive/`` (a notebook run by hand). Every write is
atomic, and each saved artefact is listed in ``index.json`` with the notebook and preset that
made it (from ``PURIFY_NOTEBOOK`` / ``PURIFY_PRESET``, which the runner sets), so that
``reports/README.md`` can say where each figure and table came from.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from purifylib.data import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent


def reports_dir(path: str | os.PathLike | None = None) -> Path:
    """Where figures, tables and metrics go: ``path``, else ``$PURIFY_REPORTS_DIR`` (``purify
    reproduce`` sets it: ``reports/`` for the default preset, ``reports/<preset>/`` for the others),
    else ``reports/interactive/`` (git-ignored): only ``purify reproduce --preset default`` writes
    the committed reports, never a notebook run by hand."""
    return Path(path or os.environ.get("PURIFY_REPORTS_DIR") or REPO_ROOT / "reports" / "interactive")


def _index(root: Path, rel: str, kind: str, caption: str) -> None:
    idx_path = root / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.is_file() else {}
    idx[rel] = {"kind": kind, "caption": caption, "notebook": os.environ.get("PURIFY_NOTEBOOK", "interactive"),
                "preset": os.environ.get("PURIFY_PRESET", "")}
    atomic_write_text(idx_path, json.dumps(dict(sorted(idx.items())), indent=1) + "\n")


def save_figure(fig, fig_id: str, *, caption: str = "", root: str | os.PathLike | None = None) -> list[Path]:
    """Save ``fig`` as ``figures/<fig_id>.png`` and ``.pdf``; returns the paths."""
    root = reports_dir(root)
    out = root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{fig_id}.{ext}"
        # a temporary of this process's own: two runs writing one reports folder must not move each other's
        tmp = out / f".{fig_id}.tmp-{os.getpid()}.{ext}"
        try:  # fixed metadata so that reruns of the same numbers give the same files
            fig.savefig(tmp, dpi=120, bbox_inches="tight",
                        metadata={"CreationDate": None} if ext == "pdf" else {"Software": None})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)
    _index(root, f"figures/{fig_id}.png", "figure", caption)
    return paths


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(df) -> str:
    """A GitHub-flavoured markdown table of a DataFrame (index dropped)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_table(df, table_id: str, *, caption: str = "", root: str | os.PathLike | None = None) -> list[Path]:
    """Save a DataFrame as ``tables/<table_id>.csv`` and ``.md``; returns the paths."""
    root = reports_dir(root)
    out = root / "tables"
    csv, md = out / f"{table_id}.csv", out / f"{table_id}.md"
    atomic_write_text(csv, df.to_csv(index=False))
    atomic_write_text(md, (f"{caption}\n\n" if caption else "") + to_markdown(df))
    _index(root, f"tables/{table_id}.md", "table", caption)
    return [csv, md]


def record_metrics(name: str, metrics: dict, *, root: str | os.PathLike | None = None) -> Path:
    """Write ``metrics/<name>.json`` (sorted keys, so reruns diff cleanly)."""
    from purifylib.data import finite_json

    path = reports_dir(root) / "metrics" / f"{name}.json"
    atomic_write_text(path, json.dumps(finite_json(metrics), indent=1, sort_keys=True, default=str,
                                       allow_nan=False) + "\n")
    return path


def _flatten(obj, prefix: str = "") -> dict:
    """``{"a.b.0.c": leaf}`` for nested dicts and lists; a list of dicts with a ``model``/``defence``/``setting``
    name is keyed by those names rather than by position, so reordered rows still line up."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            name = "/".join(str(v[k]) for k in ("model", "defence", "setting", "draw", "seed", "tau") if k in v)
            out.update(_flatten(v, f"{prefix}{name or i}."))
        return out
    return {prefix[:-1]: obj}


def compare_metrics(old, new, *, rate_tol: float = 0.02, rel_tol: float = 0.05) -> dict:
    """What changed between two reports folders' ``metrics/*.json``.

    ``conclusions``: booleans that flipped (a target met or not, a rule that held), text (verdicts,
    notes) that differs, rates that crossed 10%; ``numbers``: other values that moved more than
    ``rate_tol`` (values in [0, 1]) or ``rel_tol`` (relative, otherwise); ``missing``: keys in only one.
    """
    old, new = Path(old), Path(new)
    changed = {"conclusions": [], "numbers": [], "missing": []}
    for path in sorted((old / "metrics").glob("*.json")):
        other = new / "metrics" / path.name
        if not other.is_file():
            changed["missing"].append(f"{path.name}: not in {new}")
            continue
        a, b = (_flatten(json.loads(p.read_text())) for p in (path, other))
        for key in sorted(set(a) | set(b)):
            where = f"{path.stem}: {key}"
            if key.startswith("config.") or key in ("seconds",) or key.endswith(("seconds", "_s")):
                continue
            if (key in a) != (key in b):
                changed["missing"].append(f"{where}: only in {'old' if key in a else 'new'}")
                continue
            x, y = a[key], b[key]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
            if not numeric:  # flags, text, lists of sentences, nulls
                if x != y:
                    text = [f"{v!r}" if not isinstance(v, list) or len(v) != 1 else f"{v[0]!r}" for v in (x, y)]
                    changed["conclusions"].append(f"{where}: {text[0]} -> {text[1]}")
            else:
                if 0 <= x <= 1 and 0 <= y <= 1:
                    if (x > 0.10) != (y > 0.10) and key.rsplit(".", 1)[-1].startswith("asr"):
                        changed["conclusions"].append(f"{where}: {x:.3f} -> {y:.3f} (crosses 10%)")
                    elif abs(x - y) > rate_tol:
                        changed["numbers"].append(f"{where}: {x:.3f} -> {y:.3f}")
                elif abs(x - y) > rel_tol * max(abs(x), abs(y), 1e-12):
                    changed["numbers"].append(f"{where}: {x:.4g} -> {y:.4g}")
    return changed


#: which claim of the paper (PAPER.md) an artefact speaks to, by the start of its file name
PAPER_CLAIMS = {
    "fig00": "threat model: the attacks and their triggers",
    "table00": "threat model: the attacks and their triggers",
    "table1_": "Finding 1 (Table 1): the backdoor lives in the MLP",
    "fig_sanity": "Finding 1 (Table 1): the backdoor lives in the MLP",
    "table02_purification": "Finding 2: purification removes the backdoor (Table 2, this method)",
    "fig02_before_after": "Finding 2: purification removes the backdoor (Table 2, this method)",
    "table02_settings": "Finding 2, step 4: τ defaults (3-8%) and the repair",
    "fig02_signature": "Finding 2, steps 2-4: Eq. 1/Eq. 2 scores and the signature",
    "fig02_flagged": "Finding 2, steps 2-4: Eq. 1/Eq. 2 scores and the signature",
    "fig02_variant": "Finding 2, Eq. 2's alignment term: the variants agree",
    "table02_ground": "Finding 2: the signature finds the backdoor's channels",
    "fig02_ground": "Finding 2: the signature finds the backdoor's channels",
    "table02_effect": "effect of N (Fig. 2)",
    "fig02_effect": "effect of N (Fig. 2)",
    "table03": "τ sweep (1% / 3% / 6%) and the strength of neutralization",
    "fig03": "τ sweep (1% / 3% / 6%) and the strength of neutralization",
    "table2_": "Table 2: ASR and utility against baselines",
    "table04": "Table 2: ASR and utility against baselines",
    "fig04": "Table 2: ASR and utility against baselines",
    "grid_": "Table 2: ASR and utility against baselines",
    "random_control": "Table 2: ASR and utility against baselines",
    "failing_cells": "Table 2: the report cells purify run leaves above 10% ASR",
}


def paper_claim(rel: str) -> str:
    name = Path(rel).name
    return next((claim for prefix, claim in PAPER_CLAIMS.items() if name.startswith(prefix)), "")


def write_index_readme(root: str | os.PathLike | None = None, *, by: str = "purify reproduce") -> Path:
    """``README.md`` in the reports directory: every figure and table with the paper claim it
    speaks to, its notebook and preset."""
    root = reports_dir(root)
    idx_path = root / "index.json"
    idx = json.loads(idx_path.read_text()) if idx_path.is_file() else {}
    lines = ["# Reports", "", f"Generated by `{by}`; do not edit by hand.", "",
             "| paper claim | file | what | notebook | preset |", "|---|---|---|---|---|"]
    rows = [(paper_claim(rel), rel, info) for rel, info in idx.items() if (root / rel).exists()]
    order = {c: i for i, c in enumerate(dict.fromkeys(PAPER_CLAIMS.values()))}
    for claim, rel, info in sorted(rows, key=lambda r: (order.get(r[0], len(order)), r[1])):
        lines.append(f"| {claim} | [{rel}]({rel}) | {_cell(info['caption'])} | {info['notebook']} | {info['preset']} |")
    grids = sorted(d.name for d in root.iterdir() if (d / "metrics" / "grid.json").is_file()) if root.is_dir() else []
    if grids:
        lines += ["", "Held-out attack grids (the paper's Table 2 on cells the method never saw, `purify grid`): "
                  + ", ".join(f"[{g}/]({g}/README.md)" for g in grids) + "."]
    others = sorted(d.name for d in root.iterdir()
                    if d.name not in grids and (d / "README.md").is_file()) if root.is_dir() else []
    if others:  # records with a page of their own (a real-model preset, a dev-cell screen, a superseded grid)
        lines += ["", "Other records: " + ", ".join(f"[{o}/]({o}/README.md)" for o in others) + "."]
    path = root / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
