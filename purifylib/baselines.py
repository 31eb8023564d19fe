"""Baseline defences, each under the same clean-data and compute budget where it applies.

- ``none``: the suspicious model as it is.
- ``finetune``: clean fine-tuning with the purification's repair recipe (same records, epochs, lr).
- ``magnitude``: unstructured magnitude pruning: in every attention and MLP weight, the fraction
  ``sparsity`` of entries with the smallest ``|W|`` is set to zero (no fine-tuning).
- ``wanda``: Wanda pruning (Sun et al., 2024): score ``|W_ij| · ||X_j||_2`` with input norms from
  clean prompts, prune the lowest ``sparsity`` of each output row (no fine-tuning).
- ``fine-pruning`` (Liu et al., 2018): remove the MLP channels least active on clean prompts
  (the fraction ``prune_fraction`` per layer, down-projection columns zeroed), then the repair.
- ``random``: as many channels per module as the signature flags, chosen at random, neutralized
  the same way, then the repair (the control for the signature).
- ``signature``: this method (neutralize the signature at τ, then the repair).

Every function takes a model and returns it (edited in place where possible). None of them reads
anything about the attack.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

from purifylib.errors import PurifyError

DEFENCES = ("none", "finetune", "magnitude", "wanda", "fine-pruning", "random", "signature")


def _linear_weights(model) -> dict:
    from purifylib.models import components, resolve

    return {n: resolve(model, n).weight for n in components(model)}


def magnitude_prune(model, sparsity: float = 0.3):
    """Zero the ``sparsity`` fraction of smallest-magnitude entries of every attention/MLP weight."""
    import torch

    if not 0 <= sparsity < 1:
        raise PurifyError(f"sparsity must be in [0, 1), got {sparsity}")
    with torch.no_grad():
        for w in _linear_weights(model).values():
            k = int(sparsity * w.numel())
            if k:
                thresh = w.abs().flatten().kthvalue(k).values
                w.masked_fill_(w.abs() <= thresh, 0.0)
    return model


def input_norms(model, tokenizer, records: list[dict], *, batch_size: int = 32) -> dict:
    """``{component: ||X_j||_2 per input feature}`` over clean prompts (Wanda's activation statistic)."""
    from purifylib.evaluate import prompt_batches
    from purifylib.models import components, resolve

    sums, handles, mask_holder = {}, [], {}

    def make_hook(name):
        def hook(_m, inputs, _out):
            x = inputs[0].detach().float() * mask_holder["mask"].unsqueeze(-1)  # padding does not count
            x = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
        return hook

    for n in components(model):
        handles.append(resolve(model, n).register_forward_hook(make_hook(n)))
    try:
        for enc in prompt_batches(model, tokenizer, records, batch_size=batch_size):
            mask_holder["mask"] = enc["attention_mask"].float()
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt() for n, v in sums.items()}


def wanda_prune(model, tokenizer, calibration: list[dict], sparsity: float = 0.3):
    """Prune each output row's lowest ``|W|·||X||`` entries (Wanda), calibrated on clean prompts."""
    import torch

    from purifylib.models import uses_conv1d

    if not 0 <= sparsity < 1:
        raise PurifyError(f"sparsity must be in [0, 1), got {sparsity}")
    if uses_conv1d(model):
        raise PurifyError("Wanda here assumes nn.Linear weights (out × in); GPT-2's Conv1D is not supported")
    norms = input_norms(model, tokenizer, calibration)
    with torch.no_grad():
        for n, w in _linear_weights(model).items():
            metric = w.abs() * norms[n].to(w).unsqueeze(0)
            k = int(sparsity * w.shape[1])
            if k:
                idx = torch.topk(metric, k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0.0)
    return model


def channel_activity(model, tokenizer, records: list[dict], *, batch_size: int = 32) -> dict:
    """``{down component: mean |activation| of each MLP channel}`` on clean prompts (its input)."""
    norms = input_norms(model, tokenizer, records, batch_size=batch_size)
    from purifylib.models import Component, family_of

    down = list(family_of(model).mlp)[-1]  # the projection back to the residual stream: its input is the channel
    return {n: v for n, v in norms.items() if Component.parse(n)[1:] == ("mlp", down)}


def fine_prune(model, tokenizer, calibration: list[dict], fraction: float = 0.2):
    """Zero the down-projection columns of the ``fraction`` least active MLP channels per layer."""
    import torch

    from purifylib.models import resolve

    if not 0 <= fraction < 1:
        raise PurifyError(f"prune fraction must be in [0, 1), got {fraction}")
    activity = channel_activity(model, tokenizer, calibration)
    with torch.no_grad():
        for n, act in activity.items():
            k = int(fraction * len(act))
            if k:
                idx = torch.argsort(act, stable=True)[:k]
                w = resolve(model, n).weight
                if w.shape[1] != len(act):
                    raise PurifyError(f"{n}: fine-pruning assumes the channel is a column of the weight")
                w[:, idx] = 0.0
    return model


def random_signature(signature, seed: int = 0):
    """A signature with the same modules but seeded random scores (the control: at the same τ it
    flags as many channels per module, chosen at random)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return signature.with_scores({n: torch.rand(len(v), generator=g) for n, v in signature.scores.items()})


@dataclass(frozen=True)
class DefenceConfig:
    """Settings of the baselines (the purification's repair is passed in separately)."""

    sparsity: float = 0.3  # magnitude and Wanda
    prune_fraction: float = 0.2  # fine-pruning, per layer
    n_calibration: int = 128  # clean prompts for Wanda and fine-pruning statistics
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def defend(defence: str, model, tokenizer, *, clean: list[dict], repair_records: list[dict] | None = None,
           repair_cfg=None, signature=None, how=None, variants=None, teacher: dict | None = None,
           cfg: DefenceConfig = DefenceConfig()):
    """Apply one defence to ``model`` and return it. ``clean`` supplies calibration prompts;
    ``signature`` and ``how`` (a :class:`~purifylib.neutralize.Neutralization`) the signature
    defences (``variants``: the scored variants, for ``how.way == "negate"``; ``teacher``: what the
    repair distils from, :meth:`~purifylib.recipe.PurifyConfig.repair_teacher`); the random control
    draws its scores with ``cfg.seed``."""
    from purifylib.neutralize import neutralize_and_repair

    if defence not in DEFENCES:
        raise PurifyError(f"unknown defence '{defence}' (choose from {', '.join(DEFENCES)})")
    needs_repair = defence in ("finetune", "fine-pruning", "random", "signature")
    if needs_repair and (repair_records is None or repair_cfg is None):
        raise PurifyError(f"defence '{defence}' needs repair records and a repair config")
    if defence in ("random", "signature") and (signature is None or how is None):
        raise PurifyError(f"defence '{defence}' needs a signature and a neutralization (tau)")
    calibration = clean[:cfg.n_calibration]
    if defence == "magnitude":
        magnitude_prune(model, cfg.sparsity)
    elif defence == "wanda":
        wanda_prune(model, tokenizer, calibration, cfg.sparsity)
    elif defence == "fine-pruning":
        fine_prune(model, tokenizer, calibration, cfg.prune_fraction)
    sig = None
    if defence in ("random", "signature"):
        sig = random_signature(signature, cfg.seed) if defence == "random" else signature
    return neutralize_and_repair(model, tokenizer, sig, how, variants=variants, repair_records=repair_records,
                                 repair_cfg=repair_cfg if needs_repair else None, teacher=teacher if needs_repair else None)
