"""The backdoor signature: Eq. 2 channel scores over the variants' Eq. 1 differences.

Every MLP channel ``j`` (one hidden neuron: row ``j`` of gate/up, column ``j`` of down for a
Llama; :mod:`purifylib.models` says where a channel lives in other families) is scored from the
``N`` differences ``Δ_i`` of :mod:`purifylib.variants` (Eq. 2)::

    s_j = mean_i ||Δ_{i,j}||_2  +  λ · mean_{i<l} max(0, cos(Δ_{i,j}, Δ_{l,j}))

Optionally attention heads are scored the same way over their q/k/v rows and o columns. The terms
are pure tensor functions (:func:`channel_terms`, :func:`head_terms`); :func:`score` streams them
one module at a time from the variants on disk and returns a frozen :class:`Signature` of scores
and layouts. *How* the top channels are neutralized (τ, heads, the way, α, strength) is not the
signature's: it is a :class:`purifylib.neutralize.Neutralization`; the signature only ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from purifylib.errors import PurifyError
from purifylib.models import Component, component, heads_name, layer_of

# --------------------------------------------------------------------------- Eq. 2, as tensor functions


def channel_terms(deltas: list, layout: str):
    """Eq. 2's two terms for one module: mean channel norm and mean clipped pairwise cosine."""
    import torch

    d = torch.stack([x if layout == "row" else x.T for x in deltas]).float()  # N × C × L
    norms = d.norm(dim=2)  # N × C
    n = d.shape[0]
    align = torch.zeros(d.shape[1])
    if n > 1:
        u = d / norms.clamp_min(1e-12).unsqueeze(-1)
        gram = torch.einsum("icl,jcl->cij", u, u).clamp_min(0)  # C × N × N
        iu = torch.triu_indices(n, n, offset=1)
        align = gram[:, iu[0], iu[1]].mean(dim=1)
    return norms.mean(dim=0), align


def channel_scores(deltas: list, layout: str, lam: float = 0.01):
    """Eq. 2 for one module: ``deltas`` is the ``N`` differences (same shape); one score per channel."""
    strength, align = channel_terms(deltas, layout)
    return strength + lam * align


def head_terms(deltas_by_proj: dict, geometry):
    """Eq. 2's terms over heads: ``deltas_by_proj`` maps q/k/v/o to the ``N`` differences of that
    projection; each head's q/k/v rows and o columns form one vector per variant."""
    import torch

    pieces = {short: [geometry.pieces(short, d) for d in ds] for short, ds in deltas_by_proj.items()}
    n = len(next(iter(pieces.values())))
    per_variant = [torch.stack([torch.cat([p[i][h].flatten() for p in pieces.values()])
                                for h in range(geometry.n_heads)]) for i in range(n)]
    return channel_terms(per_variant, "row")


# --------------------------------------------------------------------------- the signature


@dataclass(frozen=True, eq=False)
class Signature:
    """Per-module scores that rank the backdoor's channels (frozen: scores and layouts only).

    ``scores`` maps a canonical component name (``blocks.3.mlp.down``; ``blocks.3.attn.heads`` for
    head scores) to a 1-D tensor with one score per channel (or head). ``layouts`` says where a
    channel lives in that module's weight (``row``, ``col``, ``head``). ``terms`` keeps Eq. 2's two
    terms per module, so λ can change later; ``meta`` the variants scored (``variants``), λ and the
    model's head count.
    """

    scores: dict
    layouts: dict
    terms: dict = field(default_factory=dict)  # name -> (strength term, alignment term)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = set(self.scores) ^ set(self.layouts)
        if missing:
            raise PurifyError(f"signature layouts do not match its scores ({sorted(missing)[:3]})")

    @property
    def has_heads(self) -> bool:
        """Whether attention heads were scored (``score(..., heads=True)``)."""
        return any(Component.parse(n).is_heads for n in self.scores)

    @property
    def mlp_modules(self) -> list[str]:
        return [n for n in self.scores if Component.parse(n).part == "mlp"]

    @property
    def variants(self) -> list[int]:
        """The variants this signature was scored from (a leave-one-out signature lacks one)."""
        return list(self.meta.get("variants", []))

    def with_lambda(self, lam: float) -> "Signature":
        """The same signature with Eq. 2's λ changed (needs the stored terms)."""
        if not self.terms:
            raise PurifyError("this signature keeps no score terms; rebuild it with signature.score to change lambda")
        return dataclasses.replace(self, scores={n: a + lam * b for n, (a, b) in self.terms.items()},
                                   meta={**self.meta, "lambda": lam})

    def with_scores(self, scores: dict) -> "Signature":
        """The same modules and layouts with other scores (e.g. the random-channel control); no terms."""
        return dataclasses.replace(self, scores=dict(scores), terms={})

    def select(self, modules=None, layers=None) -> "Signature":
        """Only the given module kinds (``gate``, ``up``, ``down``, ``heads``) and layers (others untouched)."""
        def keep(name):
            c = Component.parse(name)
            return (modules is None or c.name in modules) and (layers is None or c.layer in layers)

        pick = lambda d: {n: v for n, v in d.items() if keep(n)}  # noqa: E731
        return dataclasses.replace(self, scores=pick(self.scores), layouts=pick(self.layouts), terms=pick(self.terms))

    # ranking: the top of each module (how many is the neutralization's τ, or its heads per layer)

    def n_flagged(self, name: str, tau: float, heads: int = 0) -> int:
        """How many of module ``name``'s channels the top ``tau`` is (``heads`` for a heads entry)."""
        if Component.parse(name).is_heads:
            return min(heads, len(self.scores[name]))
        c = len(self.scores[name])
        return min(c, math.ceil(tau * c - 1e-9))

    def flagged(self, name: str, tau: float, heads: int = 0):
        """Indices of the top channels of ``name``, highest score first (ties: lower index)."""
        import torch

        order = torch.argsort(-self.scores[name].double(), stable=True)
        return order[:self.n_flagged(name, tau, heads)]

    def masks(self, tau: float, heads: int = 0) -> dict:
        import torch

        out = {}
        for name, s in self.scores.items():
            m = torch.zeros(len(s), dtype=torch.bool)
            m[self.flagged(name, tau, heads)] = True
            out[name] = m
        return out

    def summary(self, tau: float, heads: int = 0):
        """One row per module: layer, module, channels, flagged at ``tau``, score statistics, flagged share."""
        import pandas as pd

        rows = []
        for name, s in self.scores.items():
            c = Component.parse(name)
            idx = self.flagged(name, tau, heads)
            total = float(s.sum())
            rows.append({"layer": c.layer, "part": c.part, "module": c.name, "channels": len(s),
                         "flagged": len(idx), "score_mean": float(s.mean()), "score_max": float(s.max()),
                         "flagged_score_share": float(s[idx].sum()) / total if total else 0.0})
        return pd.DataFrame(rows)

    def _module_names(self, module: str) -> list[str]:
        names = sorted((n for n in self.scores if Component.parse(n)[1:] == ("mlp", module)), key=layer_of)
        if not names:
            raise PurifyError(f"the signature has no MLP module '{module}'")
        return names

    def matrix(self, module: str):
        """``layers × channels`` scores of one MLP module kind (``gate``, ``up``, ``down``), for heatmaps."""
        import torch

        return torch.stack([self.scores[n] for n in self._module_names(module)]).numpy()

    def masks_matrix(self, module: str, tau: float):
        """``layers × channels`` boolean mask of the top-``tau`` channels of one MLP module kind."""
        import torch

        masks = self.masks(tau)
        return torch.stack([masks[n] for n in self._module_names(module)]).numpy()

    def save(self, path) -> Path:
        """``path`` (a directory): ``scores.safetensors`` (scores and terms) and ``signature.json``
        (layouts and meta), written atomically; :meth:`load` gives back every field."""
        from safetensors.torch import save_file

        from purifylib.outputs import atomic_dir

        def write(tmp: Path):
            tensors = {n: s.contiguous() for n, s in self.scores.items()}
            for n, (a, b) in self.terms.items():
                tensors[f"{n}::strength"], tensors[f"{n}::alignment"] = a.contiguous(), b.contiguous()
            save_file(tensors, str(tmp / "scores.safetensors"))
            (tmp / "signature.json").write_text(json.dumps({"layouts": self.layouts, "meta": self.meta}, indent=1))

        return atomic_dir(path, write)

    @classmethod
    def load(cls, path) -> "Signature":
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("scores.safetensors", "signature.json"):
            if not (path / f).is_file():
                raise PurifyError(f"{path}: not a signature directory (no {f})")
        info = json.loads((path / "signature.json").read_text())
        if not isinstance(info, dict) or not isinstance(info.get("layouts"), dict):
            raise PurifyError(f"{path}/signature.json: no 'layouts' object")
        tensors = load_file(str(path / "scores.safetensors"))
        scores = {n: t for n, t in tensors.items() if "::" not in n}
        terms = {n: (tensors[f"{n}::strength"], tensors[f"{n}::alignment"]) for n in scores
                 if f"{n}::strength" in tensors and f"{n}::alignment" in tensors}
        if set(scores) != set(info["layouts"]):
            raise PurifyError(f"{path}/signature.json: layouts do not match the scores "
                              f"({sorted(set(scores) ^ set(info['layouts']))[:3]})")
        return cls(scores=scores, layouts=info["layouts"], terms=terms, meta=info.get("meta", {}))


def score(model, variants, *, lam: float = 0.01, include: list[int] | None = None, heads: bool = False,
          progress: bool = True) -> Signature:
    """Eq. 1 and Eq. 2 over the MLP modules (and attention heads if ``heads``), one module at a time.

    ``model`` is the suspicious model (for the family's channel layout and head shapes; its
    weights are not read); ``variants`` a :class:`purifylib.variants.Variants`. ``include``
    restricts the variants (leave-one-out); default all.
    """
    from purifylib.progress import bar as tqdm

    from purifylib.models import base_model, components, head_geometry, layout

    idx = list(range(variants.config.n_variants)) if include is None else list(include)
    if not idx:
        raise PurifyError("a signature needs at least one variant")
    available = set(variants.modules)
    mlp = [n for n in components(model, "mlp") if n in available]
    if not mlp:
        raise PurifyError("the variants updated no MLP module: train them on all linear layers")
    terms, layouts = {}, {}
    for name in tqdm(mlp, desc="score channels", disable=not progress, leave=False):
        layouts[name] = layout(model, name)
        terms[name] = channel_terms(variants.deltas(name, idx), layouts[name])
    if heads:
        geometry = head_geometry(model)
        for layer in sorted({layer_of(n) for n in mlp}):
            by_proj = {}
            for short in ("q", "k", "v", "o"):
                name = component(layer, "attn", short)
                if name not in available:
                    raise PurifyError(f"the variants did not update {name}: head scores need LoRA on attention too")
                by_proj[short] = variants.deltas(name, idx)
            terms[heads_name(layer)] = head_terms(by_proj, geometry)
            layouts[heads_name(layer)] = "head"
    return Signature(scores={n: a + lam * b for n, (a, b) in terms.items()}, layouts=layouts, terms=terms,
                     meta={"variants": idx, "lambda": lam, "n_heads": base_model(model).config.num_attention_heads})


def variant_consistency(model, variants, *, progress: bool = False):
    """How alike the variants' differences are: mean pairwise cosine of ``Δ_i`` per MLP module.

    One row per (layer, module): ``cosine`` over whole-module differences, and ``channel_cosine``,
    the mean over channels of the clipped pairwise channel cosines (Eq. 2's second term).
    """
    import pandas as pd
    import torch
    from purifylib.progress import bar as tqdm

    from purifylib.models import components, layout

    n = variants.config.n_variants
    if n < 2:
        raise PurifyError("consistency needs at least two variants")
    iu = torch.triu_indices(n, n, offset=1)
    rows = []
    for name in tqdm(components(model, "mlp"), desc="consistency", disable=not progress, leave=False):
        deltas = variants.deltas(name, range(n))
        flat = torch.nn.functional.normalize(torch.stack([d.flatten() for d in deltas]), dim=1)
        cos = (flat @ flat.T)[iu[0], iu[1]].mean()
        _, align = channel_terms(deltas, layout(model, name))
        c = Component.parse(name)
        rows.append({"layer": c.layer, "module": c.name, "cosine": float(cos), "channel_cosine": float(align.mean())})
    return pd.DataFrame(rows)
