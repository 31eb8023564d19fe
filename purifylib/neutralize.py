"""How a signature's top channels are neutralized: a frozen :class:`Neutralization`, applied by one
scoped context manager (:func:`neutralized`), or kept (:func:`apply`).

A :class:`Neutralization` says *how*: ``tau`` (the share of each MLP module's channels flagged,
top by the signature's score), ``heads`` (attention heads flagged per layer; 0: none), ``way``,
``alpha`` and ``strength``. Each flagged channel moves a fraction ``strength`` of the way from
its current value to a neutral value: ``w ← w + s·(neutral − w)``. ``s = 1`` is the paper's method.

- **Full weights**, ``way="reinit"`` (the paper's): the neutral value is a fresh Xavier-uniform
  initialisation of the module's weight (seeded per module), sliced at the flagged channels: rows
  of gate/up, columns of down (the family's channel layout). Flagged attention heads re-initialise
  the head's q rows, its k/v rows when heads do not share keys and values, and its o columns.
- **Full weights**, ``"negate"``: the neutral value is the channel minus ``alpha`` times the mean
  of the variants' differences ``Δ_i`` there (the variants the signature was scored from, so a
  leave-one-out signature negates only the others'); a flagged head's shared key/value rows are
  negated too. Re-initialising a pretrained model's busiest channels breaks it (SmolLM2-135M: 5%
  of MLP channels, random or flagged, multiply perplexity by 7-9); subtracting what planting a
  backdoor writes leaves the rest of each channel alone.
- **Adapter-only** (a peft model): the neutral value is zero, for the flagged rows of ``lora_B``
  where a channel is an output of the module (gate, up, q, k, v) and the flagged columns of
  ``lora_A`` where it is an input (down, o). Zeroing them removes exactly those channels' part of
  the adapter's update.

:class:`Neutralizer` holds the original slices in a :class:`purifylib.edits.WeightEdit` (the one
restore engine), so ``set_strength`` can be called any number of times (the interactive tuner)
and ``restore`` puts the model back bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass

from purifylib.errors import PurifyError

WAYS = ("reinit", "negate")
PAPER_TAU = 0.03  # the paper's share of channels per module


@dataclass(frozen=True)
class Neutralization:
    """How to neutralize a signature's top channels (see the module's text)."""

    tau: float = PAPER_TAU
    heads: int = 0
    way: str = "reinit"
    alpha: float = 1.0
    strength: float = 1.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "tau", float(self.tau))
        if not (math.isfinite(self.tau) and 0 <= self.tau <= 1):
            raise PurifyError(f"tau must be a fraction in [0, 1], got {self.tau}")
        if self.way not in WAYS:
            raise PurifyError(f"the neutralization way must be one of {', '.join(WAYS)}, got {self.way!r}")
        if not 0 < self.alpha <= 10:
            raise PurifyError(f"alpha must be in (0, 10], got {self.alpha}")
        if not 0 <= self.strength <= 1:
            raise PurifyError(f"strength must be in [0, 1], got {self.strength}")
        if int(self.heads) != self.heads or self.heads < 0:
            raise PurifyError(f"heads must be a whole number >= 0, got {self.heads}")

    def replace(self, **changes) -> "Neutralization":
        return dataclasses.replace(self, **changes)

    def flagged(self, signature, name: str):
        """Indices of ``name``'s channels (or heads) this neutralization edits."""
        return signature.flagged(name, self.tau, self.heads)

    def masks(self, signature) -> dict:
        return signature.masks(self.tau, self.heads)

    def summary(self, signature):
        return signature.summary(self.tau, self.heads)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Neutralization":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PurifyError(f"unknown neutralization field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _xavier(weight, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    fresh = torch.empty(weight.shape, dtype=torch.float32)
    torch.nn.init.xavier_uniform_(fresh, generator=g)
    return fresh.to(dtype=weight.dtype, device=weight.device)


class Neutralizer:
    """``how`` prepared on ``model`` for ``signature`` (``variants``: the scored variants, which
    ``way="negate"`` subtracts); call :meth:`set_strength`, :meth:`restore`."""

    def __init__(self, model, signature, how: Neutralization = Neutralization(), *, variants=None):
        from purifylib.edits import WeightEdit
        from purifylib.models import Component, channel_dim, head_geometry, is_adapter, resolve

        self.model, self.signature, self.how, self.variants = model, signature, how, variants
        self.adapter = is_adapter(model)
        if self.adapter and how.way == "negate":
            raise PurifyError("neutral='negate' edits full weights; under the adapter-only threat use 'reinit' "
                              "(it zeroes the flagged adapter rows)")
        if how.way == "negate" and variants is None:
            raise PurifyError("neutral='negate' needs the variants the signature was scored from")
        self.strength = 0.0
        self.edit = WeightEdit()
        self.slots = []  # (handle, neutral value of the held slice)
        for k, name in enumerate(sorted(signature.scores)):
            idx = how.flagged(signature, name)
            if len(idx) == 0:
                continue
            seed = how.seed * 100003 + k
            c = Component.parse(name)
            if c.is_heads:
                self._add_heads(c.layer, idx.tolist(), head_geometry(model), seed)
            else:
                self._add_component(resolve(model, name), name, channel_dim(signature.layouts[name]), idx, seed)

    def _add_component(self, mod, name, dim, idx, seed):
        """Hold the flagged slices of one component (its weight, or the adapter factor that carries them)."""
        import torch

        if self.adapter:
            from purifylib.models import uses_conv1d

            if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                raise PurifyError(f"{name}: the adapter has no LoRA weights on this module")
            # a channel that is an input of the module (down, o) lives in lora_A's columns, an output
            # (gate, up, q, k, v) in lora_B's rows, whatever the base weight's storage order
            is_input = (dim == 1) != uses_conv1d(self.model)
            tensor = mod.lora_A["default"].weight if is_input else mod.lora_B["default"].weight
            dim = 1 if is_input else 0
            idx = torch.as_tensor(idx, dtype=torch.long, device=tensor.device)
            h = self.edit.hold(tensor, dim, idx)
            self.slots.append((h, torch.zeros_like(self.edit.original(h))))
            return
        weight = mod.weight
        idx = torch.as_tensor(idx, dtype=torch.long, device=weight.device)
        h = self.edit.hold(weight, dim, idx)
        if self.how.way == "reinit":
            neutral = _xavier(weight, seed).index_select(dim, idx)
        else:  # only the flagged slices are computed (the tuner re-applies this at every preview)
            delta = self.variants.mean_delta(name, self.signature.variants).to(device=weight.device)
            neutral = (self.edit.original(h).float() - self.how.alpha * delta.index_select(dim, idx)).to(weight.dtype)
        self.slots.append((h, neutral))

    def _add_heads(self, layer: int, heads: list, geometry, seed: int):
        from purifylib.models import component, resolve

        rows = geometry.rows(heads)
        # the key/value heads the flagged heads read: re-initialising a shared one would hit every head
        # of its group, so reinit leaves them (the head's q and o carry it); negation only subtracts
        # the variants' update there, so it edits them
        kv_rows = geometry.kv_rows(heads) if geometry.shares_kv else rows
        for j, short in enumerate(("q", "k", "v", "o")):
            if short in ("k", "v") and geometry.shares_kv and self.how.way == "reinit":
                continue
            name = component(layer, "attn", short)
            self._add_component(resolve(self.model, name), name, 1 if short == "o" else 0,
                                kv_rows if short in ("k", "v") else rows, seed + j)

    @property
    def n_channels(self) -> int:
        """Flagged channel slices (rows or columns) this neutralizer edits."""
        return self.edit.slices

    def set_strength(self, strength: float) -> None:
        """Move every flagged slice ``strength`` of the way to its neutral value (0: original)."""
        if not 0 <= strength <= 1:
            raise PurifyError(f"strength must be in [0, 1], got {strength}")
        for h, neutral in self.slots:
            orig = self.edit.original(h)
            self.edit.write(h, orig if strength == 0 else orig + strength * (neutral - orig))
        self.strength = float(strength)

    def restore(self) -> None:
        self.edit.restore()
        self.strength = 0.0


def apply(model, signature, how: Neutralization = Neutralization(), *, variants=None) -> Neutralizer:
    """Neutralize ``model`` in place as ``how`` says; the returned object can restore it."""
    n = Neutralizer(model, signature, how, variants=variants)
    n.set_strength(how.strength)
    return n


@contextmanager
def neutralized(model, signature, how: Neutralization = Neutralization(), *, variants=None):
    """``with neutralized(model, sig, how): ...``: the model is neutralized inside, restored after."""
    n = Neutralizer(model, signature, how, variants=variants)
    try:
        n.set_strength(how.strength)
        yield model
    finally:
        n.restore()


def neutralize_and_repair(model, tokenizer, signature=None, how: Neutralization = Neutralization(), *,
                          variants=None, repair_records: list[dict] | None = None, repair_cfg=None,
                          teacher: dict | None = None, progress: bool = False, desc: str = "repair"):
    """The one edit every defended model goes through: ``signature``'s top channels neutralized as
    ``how`` says (``None``: none), then the repair fine-tune on ``repair_records`` with
    ``repair_cfg`` (``None``: none), distilled from ``teacher`` if given (``finetune``'s ``teacher``,
    ``teacher_records`` and ``distill``). ``purify``'s τ rule, the baselines, the settings table, the
    effect of N and the tuner's repaired grid all call it. Returns the model (the repair's)."""
    if signature is not None:
        apply(model, signature, how, variants=variants)
    if repair_cfg is not None:
        from purifylib.train import finetune

        model = finetune(model, tokenizer, repair_records, repair_cfg, progress=progress, desc=desc,
                         **(teacher or {})).model
    return model
