"""Apply a :class:`~purifylib.signature.Signature` to a model, with a strength, reversibly.

Each flagged channel moves a fraction ``strength`` of the way from its current value to a neutral
value: ``w ← w + s·(neutral − w)``. ``s = 1`` is the paper's method.

- **Full weights**, ``signature.neutral == "reinit"`` (the paper's): the neutral value is a fresh
  Xavier-uniform initialisation of the module's weight (seeded per module), sliced at the flagged
  channels: rows of gate/up, columns of down (the family's channel layout). Flagged attention
  heads re-initialise the head's q rows, its k/v rows when heads do not share keys and values,
  and its o columns.
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

:class:`Neutralizer` keeps the original slices, so ``set_strength`` can be called any number of
times (the interactive tuner) and ``restore`` puts the model back bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from purifylib.errors import PurifyError

INPUT_SIDE = ("down", "o")  # modules whose channel is an input (a column of an nn.Linear weight)


@dataclass
class _Slot:
    tensor: object  # the parameter edited in place
    dim: int  # 0: rows, 1: columns
    index: object  # LongTensor of flagged rows/columns
    orig: object
    neutral: object


def _is_adapter(model) -> bool:
    from purifylib.signature import _lora_modules

    return bool(_lora_modules(model)) if hasattr(model, "peft_config") else False


def _xavier(weight, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    fresh = torch.empty(weight.shape, dtype=torch.float32)
    torch.nn.init.xavier_uniform_(fresh, generator=g)
    return fresh.to(dtype=weight.dtype, device=weight.device)


class Neutralizer:
    """Prepared neutralization of ``signature`` on ``model``; call :meth:`set_strength`."""

    def __init__(self, model, signature, *, seed: int = 0):
        from purifylib.models import _base, resolve

        self.model = model
        self.signature = signature
        self.adapter = _is_adapter(model)
        if self.adapter and signature.neutral == "negate":
            raise PurifyError("neutral='negate' edits full weights; under the adapter-only threat use 'reinit' "
                              "(it zeroes the flagged adapter rows)")
        self.strength = 0.0
        self.slots: list[_Slot] = []
        cfg = _base(model).config
        for k, name in enumerate(sorted(signature.scores)):
            idx = signature.flagged(name)
            if len(idx) == 0:
                continue
            if name.endswith(".heads"):
                self._add_heads(name, idx, cfg, seed * 100003 + k)
                continue
            short = name.rsplit(".", 1)[1]
            mod = resolve(model, name)
            if self.adapter:
                self._add_adapter(mod, short, idx, name)
            else:
                dim = 0 if signature.layouts[name] == "row" else 1
                self._add(mod.weight, dim, idx, self._neutral(name, mod.weight, seed * 100003 + k))

    def _neutral(self, name, weight, seed):
        """The whole module's neutral value (sliced at the flagged channels by the caller)."""
        if self.signature.neutral == "reinit":
            return _xavier(weight, seed)
        delta = self.signature.mean_delta(name).to(device=weight.device)
        return (weight.detach().float() - self.signature.alpha * delta).to(weight.dtype)

    def _add(self, tensor, dim, idx, neutral_full):
        import torch

        idx = torch.as_tensor(idx, dtype=torch.long, device=tensor.device)
        orig = tensor.detach().index_select(dim, idx).clone()
        neutral = neutral_full.index_select(dim, idx) if neutral_full is not None else torch.zeros_like(orig)
        self.slots.append(_Slot(tensor, dim, idx, orig, neutral))

    def _add_adapter(self, mod, short, idx, name):
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            raise PurifyError(f"{name}: the adapter has no LoRA weights on this module")
        if short in INPUT_SIDE:
            self._add(mod.lora_A["default"].weight, 1, idx, None)
        else:
            self._add(mod.lora_B["default"].weight, 0, idx, None)

    def _add_heads(self, name, heads, cfg, seed):
        import torch

        from purifylib.models import resolve

        layer = int(name.split(".")[1])
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        def rows_of(hs):
            return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in hs])

        rows = rows_of(heads.tolist())
        # the key/value heads the flagged heads read: re-initialising a shared one would hit every head
        # of its group, so reinit leaves them (the head's q and o carry it); negation only subtracts
        # the variants' update there, so it edits them
        kv_rows = rows if n_kv == n_heads else rows_of(sorted({h // (n_heads // n_kv) for h in heads.tolist()}))
        for j, short in enumerate(("q", "k", "v", "o")):
            if short in ("k", "v") and n_kv != n_heads and self.signature.neutral == "reinit":
                continue
            cname = f"blocks.{layer}.attn.{short}"
            mod = resolve(self.model, cname)
            idx = kv_rows if short in ("k", "v") else rows
            if self.adapter:
                self._add_adapter(mod, short, idx, cname)
            else:
                dim = 1 if short == "o" else 0
                self._add(mod.weight, dim, idx, self._neutral(cname, mod.weight, seed + j))

    @property
    def n_channels(self) -> int:
        """Flagged channel slices (rows or columns) this neutralizer edits."""
        return sum(len(s.index) for s in self.slots)

    def set_strength(self, strength: float) -> None:
        """Move every flagged slice ``strength`` of the way to its neutral value (0: original)."""
        import torch

        if not 0 <= strength <= 1:
            raise PurifyError(f"strength must be in [0, 1], got {strength}")
        with torch.no_grad():
            for s in self.slots:
                new = s.orig if strength == 0 else s.orig + strength * (s.neutral - s.orig)
                s.tensor.index_copy_(s.dim, s.index, new)
        self.strength = float(strength)

    def restore(self) -> None:
        self.set_strength(0.0)


def apply(model, signature, *, strength: float = 1.0, seed: int = 0) -> Neutralizer:
    """Neutralize ``model`` in place at ``strength``; the returned object can restore it."""
    n = Neutralizer(model, signature, seed=seed)
    n.set_strength(strength)
    return n


@contextmanager
def neutralized(model, signature, *, strength: float = 1.0, seed: int = 0):
    """``with neutralized(model, sig): ...``: the model is neutralized inside, restored after."""
    n = Neutralizer(model, signature, seed=seed)
    try:
        n.set_strength(strength)
        yield model
    finally:
        n.restore()


def neutralize_and_repair(model, tokenizer, signature=None, *, strength: float = 1.0, seed: int = 0,
                          repair_records: list[dict] | None = None, repair_cfg=None, progress: bool = False,
                          desc: str = "repair"):
    """The one edit every defended model goes through: ``signature``'s flagged channels neutralized
    at ``strength`` (``None``: none), then the repair fine-tune on ``repair_records`` with
    ``repair_cfg`` (``None``: none). ``purify``'s τ rule, the baselines, the settings table, the
    effect of N and the tuner's repaired grid all call it. Returns the model (the repair's)."""
    if signature is not None:
        apply(model, signature, strength=strength, seed=seed)
    if repair_cfg is not None:
        from purifylib.train import finetune

        model = finetune(model, tokenizer, repair_records, repair_cfg, progress=progress, desc=desc).model
    return model
