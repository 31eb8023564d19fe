"""Sanity checks: where does a backdoor live? Weight-update and activation ablations.

**Weight-update ablation** (analysis mode, where the pre-poisoning weights are known, as on the
testbed): with ΔW = W_suspicious − W_base per module, *reverting* ΔW in a set of components sets
their weights back to the base weights. The paper's first finding (Table 1): reverting ΔW_attn
everywhere leaves the backdoor working, reverting ΔW_mlp everywhere removes it, reverting ΔW_mlp
in k consecutive blocks removes it only for large enough k, and shuffling the MLP updates across
blocks (W_i = W_base,i + ΔW_π(i)) leaves it working: the association is written redundantly
across MLP layers.

**Activation ablation**: replace the output of one layer's attention or MLP by zeros, or by its
mean over clean prompts (a vector of shape ``(hidden,)``, averaged over prompts and positions),
and see whether the behaviour survives.

Every ablation here is a context manager that restores the model bit for bit in ``finally``.
:func:`patched_weights` (through :mod:`purifylib.edits`, the one restore engine for weight edits)
and :func:`patched_outputs` are the two generic engines; the rest are named shortcuts that build
their arguments.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from purifylib.errors import PurifyError
from purifylib.models import Component, block_part, blocks, component, components, layer_of, resolve


# --------------------------------------------------------------------------- engines


@contextmanager
def patched_weights(model, new: dict):
    """Temporarily set ``{canonical component name: weight tensor}``; restore exactly on exit."""
    from purifylib.edits import patched

    pairs = []
    for name, w in new.items():
        weight = resolve(model, name).weight
        if weight.shape != w.shape:
            raise PurifyError(f"{name}: new weight has shape {tuple(w.shape)}, expected {tuple(weight.shape)}")
        pairs.append((weight, w))
    with patched(pairs):
        yield model


@contextmanager
def patched_outputs(model, patches: dict):
    """Temporarily replace outputs: ``{(layer, "attn"|"mlp"): fn(tensor) -> tensor}`` via hooks."""
    handles = []

    def make_hook(fn):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            return fn(output)
        return hook

    try:
        for (layer, part), fn in patches.items():
            handles.append(block_part(model, layer, part).register_forward_hook(make_hook(fn)))
        yield model
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- weight-update shortcuts


def base_weights(base_model) -> dict:
    """``{component name: weight}`` of every attention and MLP component of the base model."""
    return {n: resolve(base_model, n).weight.detach().clone() for n in components(base_model)}


def _select(model, part: str, layers) -> list[str]:
    keep = set(range(len(blocks(model)))) if layers is None else set(layers)
    return [n for n in components(model, part) if layer_of(n) in keep]


def revert(model, base: dict, *, attn_layers=(), mlp_layers=()):
    """Revert ΔW to the base weights in the given layers (``None`` means every layer)."""
    names = _select(model, "attn", attn_layers) if attn_layers is None or attn_layers else []
    names += _select(model, "mlp", mlp_layers) if mlp_layers is None or mlp_layers else []
    return patched_weights(model, {n: base[n] for n in names})


def revert_mlp_window(model, base: dict, start: int, k: int, *, with_attn: bool = False):
    """Revert ΔW_mlp in blocks ``start .. start+k-1`` (and ΔW_attn everywhere if ``with_attn``)."""
    n_layers = len(blocks(model))
    if not (0 <= start and k >= 1 and start + k <= n_layers):
        raise PurifyError(f"window start={start} k={k} does not fit {n_layers} layers")
    return revert(model, base, attn_layers=None if with_attn else (), mlp_layers=range(start, start + k))


def shuffle_mlp(model, base: dict, seed: int = 0):
    """Move each block's MLP update to another block: W_i = W_base,i + ΔW_π(i), π a seeded derangement."""
    n_layers = len(blocks(model))
    rng = random.Random(seed)
    perm = list(range(n_layers))
    while n_layers > 1 and any(p == i for i, p in enumerate(perm)):
        rng.shuffle(perm)
    new = {}
    for n in components(model, "mlp"):
        layer, _, short = Component.parse(n)
        src = component(perm[layer], "mlp", short)
        new[n] = base[n] + (resolve(model, src).weight.detach() - base[src])
    return patched_weights(model, new)


# --------------------------------------------------------------------------- activation shortcuts


def mean_outputs(model, tokenizer, records: list[dict], *, batch_size: int = 64) -> dict:
    """``{(layer, part): mean output vector (hidden,)}`` over the prompts' non-pad tokens."""
    from purifylib.evaluate import prompt_batches

    sums, count = {}, 0
    mask_holder = {}

    def make_hook(key):
        def hook(_m, _i, output):
            out = output[0] if isinstance(output, tuple) else output
            m = mask_holder["mask"].unsqueeze(-1).to(out.dtype)
            sums[key] = sums.get(key, 0) + (out.detach() * m).sum(dim=(0, 1))
        return hook

    handles = [block_part(model, i, p).register_forward_hook(make_hook((i, p)))
               for i in range(len(blocks(model))) for p in ("attn", "mlp")]
    try:
        for enc in prompt_batches(model, tokenizer, records, batch_size=batch_size):
            mask_holder["mask"] = enc["attention_mask"]
            model(**enc)
            count += int(enc["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return {k: v / count for k, v in sums.items()}


def ablate_output(model, layer: int, part: str, *, mode: str = "zero", means: dict | None = None):
    """Zero- or mean-ablate the output of one layer's ``"attn"`` or ``"mlp"``."""
    if mode == "zero":
        return patched_outputs(model, {(layer, part): lambda t: t * 0})
    if mode == "mean":
        if means is None:
            raise PurifyError("mean ablation needs the clean means (see mean_outputs)")
        vec = means[(layer, part)]
        return patched_outputs(model, {(layer, part): lambda t: vec.to(t.dtype).expand_as(t).clone()})
    raise PurifyError(f"unknown ablation mode '{mode}' (choose from zero, mean)")


# --------------------------------------------------------------------------- studies


@dataclass
class AblationRow:
    condition: str
    asr: float
    clean_accuracy: float | None = None
    layers: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AblationResult:
    """One row per ablation condition (rates in [0, 1])."""

    rows: list

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rows])

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows]}


class Probe:
    """Measures ASR (and optionally clean accuracy) of one model on fixed prompts, fast.

    Built once per suspicious model: the triggered prompts of its attack and the clean records.
    ``probe()`` is called inside each ablation context.
    """

    def __init__(self, model, tokenizer, records: list[dict], spec, *, seed: int = 0, max_new_tokens: int | None = None,
                 match: str = "exact"):
        from purifylib.evaluate import attack_prompts

        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.clean, self.match = records, match
        _, self.triggered, _ = attack_prompts(records, spec, seed)
        target_len = len(tokenizer(spec.behaviour.target, add_special_tokens=False)["input_ids"])
        self.max_new_tokens = max_new_tokens or target_len + 2

    def asr(self) -> float:
        from purifylib.evaluate import generate

        outs = generate(self.model, self.tokenizer, self.triggered, max_new_tokens=self.max_new_tokens)
        return sum(self.spec.behaviour.shown_in(o) for o in outs) / max(len(outs), 1)

    def accuracy(self) -> float:
        from purifylib.evaluate import evaluate_clean

        return evaluate_clean(self.model, self.tokenizer, self.clean, match=self.match).accuracy

    def row(self, condition: str, layers: str = "", clean: bool = True) -> AblationRow:
        return AblationRow(condition, self.asr(), self.accuracy() if clean else None, layers)


def table1(probe: Probe, base: dict, *, ks=(1, 2, 4), seed: int = 0) -> AblationResult:
    """The paper's Table 1 with numbers: ASR and clean accuracy under each weight reversion.

    Rows: none; attention reverted (all layers); MLP reverted (all layers); for each k, MLP
    reverted in the k middle-most consecutive blocks, alone and with attention reverted too; MLP
    updates shuffled across blocks.
    """
    model = probe.model
    n = len(blocks(model))
    rows = [probe.row("none")]
    with revert(model, base, attn_layers=None):
        rows.append(probe.row("attn reverted", f"0-{n - 1}"))
    with revert(model, base, mlp_layers=None):
        rows.append(probe.row("mlp reverted", f"0-{n - 1}"))
    for k in ks:
        if k >= n:
            continue
        start = (n - k) // 2
        with revert_mlp_window(model, base, start, k):
            rows.append(probe.row(f"mlp reverted in {k} blocks", f"{start}-{start + k - 1}"))
        with revert_mlp_window(model, base, start, k, with_attn=True):
            rows.append(probe.row(f"mlp reverted in {k} blocks + attn reverted", f"{start}-{start + k - 1}"))
    with shuffle_mlp(model, base, seed):
        rows.append(probe.row("mlp updates shuffled across blocks", f"0-{n - 1}"))
    return AblationResult(rows)


def window_grid(probe: Probe, base: dict, *, with_attn: bool = False, ks=None, stride: int = 1,
                progress: bool = False):
    """ASR for MLP reversion in every window (start, k): a DataFrame with columns start, k, asr.

    Every ``k`` from 1 to the depth and every start by default; a deep model can take a few ``ks``
    and every ``stride``-th start (the full window of all blocks is always included).
    """
    import pandas as pd
    from purifylib.progress import bar as tqdm

    n = len(blocks(probe.model))
    if stride < 1:
        raise PurifyError(f"window stride must be >= 1, got {stride}")
    ks = sorted({min(int(k), n) for k in ks} | {n}) if ks else range(1, n + 1)
    cells = [(s, k) for k in ks for s in range(0, n - k + 1, stride)]
    out = []
    for s, k in tqdm(cells, desc="windows" + (" +attn" if with_attn else ""), disable=not progress, leave=False):
        with revert_mlp_window(probe.model, base, s, k, with_attn=with_attn):
            out.append({"start": s, "k": k, "with_attn": with_attn, "asr": probe.asr()})
    return pd.DataFrame(out)


def activation_sweep(probe: Probe, means: dict, *, modes=("zero", "mean"), progress: bool = False):
    """ASR with one layer's attention or MLP output ablated: columns layer, part, mode, asr."""
    import pandas as pd
    from purifylib.progress import bar as tqdm

    n = len(blocks(probe.model))
    cells = [(m, p, i) for m in modes for p in ("attn", "mlp") for i in range(n)]
    out = []
    for mode, part, layer in tqdm(cells, desc="activation ablation", disable=not progress, leave=False):
        with ablate_output(probe.model, layer, part, mode=mode, means=means):
            out.append({"layer": layer, "part": part, "mode": mode, "asr": probe.asr()})
    return pd.DataFrame(out)


def update_norms(model, base: dict):
    """‖ΔW‖_F per component (columns layer, part, name, norm): where did the attack write?"""
    import pandas as pd

    rows = []
    for n in components(model):
        layer, part, short = Component.parse(n)
        delta = resolve(model, n).weight.detach().float() - base[n].float()
        rows.append({"layer": int(layer), "part": part, "name": short, "norm": float(delta.norm()),
                     "relative": float(delta.norm() / base[n].float().norm().clamp_min(1e-12))})
    return pd.DataFrame(rows)


from purifylib.studies.findings import THRESHOLDS  # noqa: E402

#: a backdoor "persists" when ASR keeps at least this share of its unablated value,
#: and is "eliminated" when ASR falls to at most this absolute rate
PERSISTS_SHARE = THRESHOLDS["persists_share"]
ELIMINATED_ASR = THRESHOLDS["eliminated_asr"]


def min_eliminating_k(grid) -> int | None:
    """The smallest k for which reverting *every* window of k consecutive MLP blocks eliminates it."""
    for k, g in grid.groupby("k"):
        if (g["asr"] <= ELIMINATED_ASR).all():
            return int(k)
    return None


def findings(t1, grid, grid_attn) -> list[dict]:
    """Check each part of the paper's Finding 1 against one model's numbers.

    ``t1`` is :func:`table1`'s frame; ``grid``/``grid_attn`` are :func:`window_grid` frames without
    and with attention reverted. Returns ``{claim, holds, evidence}`` dicts.
    """
    asr = dict(zip(t1["condition"], t1["asr"]))
    a0 = asr["none"]
    persists = lambda v: v >= PERSISTS_SHARE * a0  # noqa: E731
    gone = lambda v: v <= ELIMINATED_ASR  # noqa: E731
    n = int(grid["k"].max())
    k_plain, k_attn = min_eliminating_k(grid), min_eliminating_k(grid_attn)
    fmt = lambda k: f"{k} of {n}" if k else f"none up to {n}"  # noqa: E731
    shuffled = asr["mlp updates shuffled across blocks"]
    return [
        {"claim": "reverting ΔW_attn in all layers leaves the backdoor working",
         "holds": persists(asr["attn reverted"]), "evidence": f"ASR {a0:.0%} → {asr['attn reverted']:.0%}"},
        {"claim": "reverting ΔW_mlp in all layers eliminates the backdoor",
         "holds": gone(asr["mlp reverted"]), "evidence": f"ASR {a0:.0%} → {asr['mlp reverted']:.0%}"},
        {"claim": "a few MLP blocks are not enough: every single-block reversion leaves it working",
         "holds": bool((grid[grid["k"] == 1]["asr"] >= PERSISTS_SHARE * a0).all()),
         "evidence": f"single-block ASR {grid[grid['k'] == 1]['asr'].min():.0%}–{grid[grid['k'] == 1]['asr'].max():.0%}"},
        {"claim": "with ΔW_attn also reverted, fewer MLP blocks suffice",
         "holds": k_attn is not None and (k_plain is None or k_attn < k_plain),
         "evidence": f"smallest k that eliminates it from any start: {fmt(k_plain)} (MLP only), {fmt(k_attn)} (+attn)"},
        {"claim": "shuffling the MLP updates across blocks leaves the backdoor working",
         "holds": persists(shuffled), "evidence": f"ASR {a0:.0%} → {shuffled:.0%}"},
    ]


@dataclass
class SanityResult:
    """Every sanity-check measurement of one suspicious model (frames with a ``model`` column)."""

    model: str
    table1: object
    grid: object
    grid_attn: object
    activation: object
    norms: object
    findings: list

    def to_frame(self):
        return self.table1

    def to_dict(self) -> dict:
        return {"model": self.model, "table1": self.table1.to_dict("records"), "findings": self.findings,
                "grid": self.grid.to_dict("records"), "grid_attn": self.grid_attn.to_dict("records"),
                "activation": self.activation.to_dict("records")}


def sanity_study(suspicious, base: dict, records: list[dict], clean_for_means: list[dict], *, ks=(1, 2, 4),
                 modes=("zero", "mean"), seed: int = 0, progress: bool = False, match: str = "exact",
                 window_ks=None, window_stride: int = 1) -> SanityResult:
    """Run Table 1, both window grids, the activation sweep and ΔW norms on one suspicious model."""
    model, tok = suspicious.load()
    probe = Probe(model, tok, records, suspicious.spec, seed=seed, match=match)
    t1 = table1(probe, base, ks=ks, seed=seed).to_frame()
    win = dict(ks=window_ks, stride=window_stride, progress=progress)
    grid = window_grid(probe, base, **win)
    grid_attn = window_grid(probe, base, with_attn=True, **win)
    act = activation_sweep(probe, mean_outputs(model, tok, clean_for_means), modes=modes, progress=progress)
    norms = update_norms(model, base)
    tag = lambda df: df.assign(model=suspicious.name)  # noqa: E731
    return SanityResult(suspicious.name, tag(t1), tag(grid), tag(grid_attn), tag(act), tag(norms),
                        findings(t1, grid, grid_attn))


# --------------------------------------------------------------------------- signature vs ground truth


def channel_update_norms(model, base: dict, names: list[str], layouts: dict) -> dict:
    """``{module: per-channel norm of the real ΔW}`` (analysis mode: the base weights are known)."""
    out = {}
    for n in names:
        d = resolve(model, n).weight.detach() - base[n]
        out[n] = d.norm(dim=1) if layouts[n] == "row" else d.norm(dim=0)
    return out


def _spearman(a, b) -> float:
    import torch

    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den else 0.0


def signature_overlap(signature, model, base: dict, *, tau: float, seed: int = 0):
    """How well the signature finds the channels the real backdoor's update wrote most.

    Per MLP module: ``precision`` = share of the flagged channels (top τ by score) that are also
    among the top τ by the real update's channel norm; ``spearman`` = rank correlation of scores
    and update norms. The ``random`` rows do the same for seeded random scores (the control).
    """
    import pandas as pd
    import torch

    sig = signature
    names = sig.mlp_modules
    truth = channel_update_norms(model, base, names, sig.layouts)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in names:
        k = sig.n_flagged(n, tau)
        top_true = set(torch.argsort(-truth[n], stable=True)[:k].tolist())
        layer, _, short = Component.parse(n)
        for source, scores in (("signature", sig.scores[n]), ("random", torch.rand(len(truth[n]), generator=g))):
            flagged = set(torch.argsort(-scores.double(), stable=True)[:k].tolist())
            rows.append({"layer": layer, "module": short, "source": source, "tau": tau,
                         "precision": len(flagged & top_true) / max(1, k), "spearman": _spearman(scores, truth[n])})
    return pd.DataFrame(rows)
