"""The per-architecture component map: the one place that knows where a model keeps its parts.

:data:`FAMILIES` maps each supported model family to where its blocks live and which modules form
attention and the MLP; :class:`Component` is the one grammar of the canonical names
``blocks.{i}.attn.{q,k,v,o,qkv}``, ``blocks.{i}.mlp.{gate,up,down}`` and ``blocks.{i}.attn.heads``
(a layer's heads, as one scored unit): no other module builds or splits them, and no other
module spells a module path (a test checks it). The MLP *channel layout* says which slice of a
weight is channel ``j`` (one hidden neuron of the MLP): ``"row"`` for a weight whose output is the
hidden layer (gate, up: ``W[j, :]`` for ``nn.Linear``), ``"col"`` for the projection back (down:
``W[:, j]``). GPT-2's ``Conv1D`` stores weights transposed, so its layout is the other way round.
:class:`HeadGeometry` says where head ``h`` lives in q/k/v/o (grouped keys and values included).
Loading and saving checkpoints is :mod:`purifylib.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from purifylib.errors import PurifyError

@dataclass(frozen=True)
class Family:
    """Where one model family keeps its blocks, attention and MLP modules (relative to a block)."""

    blocks: str  # dotted path of the ModuleList of blocks
    attn: dict  # canonical name -> module path in a block
    mlp: dict  # canonical name -> module path in a block
    layout: dict  # canonical MLP name -> "row" | "col" (where channel j lives in .weight)
    conv1d: bool = False  # weights stored (in, out), as GPT-2's Conv1D does


_LLAMA = Family(
    blocks="model.layers",
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    layout={"gate": "row", "up": "row", "down": "col"},
)
FAMILIES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Family(
        blocks="transformer.h",
        attn={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"},
        layout={"up": "col", "down": "row"},  # Conv1D weight is (in, out)
        conv1d=True,
    ),
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        attn={"qkv": "attention.query_key_value", "o": "attention.dense"},
        mlp={"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
        layout={"up": "row", "down": "col"},
    ),
}


PARTS = ("attn", "mlp")
HEADS = "heads"  # the name of a layer's attention heads scored as one unit


class Component(NamedTuple):
    """A canonical component name, parsed: ``Component.parse("blocks.3.mlp.down") == (3, "mlp", "down")``;
    ``str(Component(3, "mlp", "down")) == "blocks.3.mlp.down"``."""

    layer: int
    part: str  # "attn" | "mlp"
    name: str  # q, k, v, o, qkv, heads | gate, up, down

    def __str__(self) -> str:
        return f"blocks.{self.layer}.{self.part}.{self.name}"

    @classmethod
    def parse(cls, text: str) -> "Component":
        bits = str(text).split(".")
        if len(bits) != 4 or bits[0] != "blocks" or not bits[1].isdigit() or bits[2] not in PARTS:
            raise PurifyError(f"'{text}' is not a component name (blocks.<layer>.attn|mlp.<name>)")
        return cls(int(bits[1]), bits[2], bits[3])

    @property
    def is_heads(self) -> bool:
        return self.part == "attn" and self.name == HEADS


def component(layer: int, part: str, name: str) -> str:
    """The canonical name of a component: ``component(3, "mlp", "down") == "blocks.3.mlp.down"``."""
    if part not in PARTS:
        raise ValueError(f"part must be 'attn' or 'mlp', got {part!r}")
    return str(Component(int(layer), part, name))


def heads_name(layer: int) -> str:
    """The name under which a layer's attention heads are scored: ``blocks.{layer}.attn.heads``."""
    return component(layer, "attn", HEADS)


def layer_of(name: str) -> int:
    return Component.parse(name).layer


def short_of(name: str) -> str:
    """The module's short name (``down`` of ``blocks.3.mlp.down``)."""
    return Component.parse(name).name


def family_of(model) -> Family:
    """The :class:`Family` of a (possibly peft-wrapped) model, or a clear error."""
    mtype = getattr(getattr(base_model(model), "config", None), "model_type", None)
    if mtype not in FAMILIES:
        raise PurifyError(f"unsupported model family '{mtype}' (supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[mtype]


def base_model(model):
    """The underlying transformers model of a peft model (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get else model


def blocks(model):
    return base_model(model).get_submodule(family_of(model).blocks)


def resolve(model, name: str):
    """The module behind a canonical component name."""
    try:
        c = Component.parse(name)
        return blocks(model)[c.layer].get_submodule(getattr(family_of(model), c.part)[c.name])
    except (PurifyError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise PurifyError(f"no component '{name}' in this model ({exc})") from None


def block_part(model, layer: int, part: str):
    """The whole attention or MLP submodule of a block (the parent of its projections)."""
    fam = family_of(model)
    path = next(iter(getattr(fam, part).values())).split(".")[0]  # e.g. "self_attn", "mlp", "attn"
    return blocks(model)[layer].get_submodule(path)


def components(model, part: str | None = None) -> list[str]:
    """Every canonical component name of ``model`` (optionally only ``"attn"`` or ``"mlp"``)."""
    fam = family_of(model)
    names = []
    for i in range(len(blocks(model))):
        for p in PARTS:
            if part in (None, p):
                names += [component(i, p, short) for short in getattr(fam, p)]
    return names


def layout(model, name: str) -> str:
    """Where channel ``j`` of an MLP component lives in its weight: ``"row"`` or ``"col"``."""
    return family_of(model).layout[short_of(name)]


def uses_conv1d(model) -> bool:
    return family_of(model).conv1d


def attention_targets(model_type: str = "llama") -> tuple:
    """The attention projections' module names, for a LoRA restricted to attention."""
    return tuple(p.rsplit(".", 1)[-1] for p in FAMILIES[model_type].attn.values())


def channel_dim(layout: str) -> int:
    """The weight dimension that indexes channels under ``layout`` (``"row"``: 0, ``"col"``: 1)."""
    return 0 if layout == "row" else 1


def channel_slice(weight, layout: str, j):
    """Channel ``j`` of a weight with the given layout (``"row"``: ``W[j]``, ``"col"``: ``W[:, j]``)."""
    return weight.select(channel_dim(layout), j)


@dataclass(frozen=True)
class HeadGeometry:
    """Where attention head ``h`` lives in the q/k/v/o weights (grouped keys and values included)."""

    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def shares_kv(self) -> bool:
        return self.n_kv != self.n_heads

    def kv_head(self, h: int) -> int:
        return h // (self.n_heads // self.n_kv)

    def rows(self, heads) -> "object":
        """Row indices of the q weight (column indices of o) of ``heads``."""
        import torch

        return torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads])

    def kv_rows(self, heads):
        """Row indices of the k/v weights the given heads read (shared rows once)."""
        return self.rows(sorted({self.kv_head(h) for h in heads}))

    def pieces(self, short: str, weight) -> list:
        """Per head, its piece of an attention projection's weight (rows of q/k/v, columns of o)."""
        hd = self.head_dim
        if short == "o":
            return [weight[:, h * hd:(h + 1) * hd] for h in range(self.n_heads)]
        if short == "q":
            return [weight[h * hd:(h + 1) * hd] for h in range(self.n_heads)]
        return [weight[self.kv_head(h) * hd:(self.kv_head(h) + 1) * hd] for h in range(self.n_heads)]


def head_geometry(model) -> HeadGeometry:
    """The attention geometry of a model with separate q/k/v/o projections (an error if fused)."""
    if set(family_of(model).attn) != {"q", "k", "v", "o"}:
        raise PurifyError("head scores need separate q/k/v/o projections (this family fuses them)")
    cfg = base_model(model).config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return HeadGeometry(n_heads, n_kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)


def lora_layers(model) -> dict:
    """``{canonical component name: peft LoRA layer}`` of a peft model (empty for a plain model)."""
    out = {}
    if not hasattr(model, "peft_config"):
        return out
    for name in components(model):
        mod = resolve(model, name)
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod
    return out


def is_adapter(model) -> bool:
    """Whether ``model`` is a peft model carrying LoRA layers (the adapter-only threat)."""
    return bool(lora_layers(model))
