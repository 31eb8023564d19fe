"""The backdoor signature: synthetic variants, Eq. 1 differences, Eq. 2 channel scores, top-τ.

The defender plants backdoors of its own into copies of the suspicious model and watches where
they go. For variant ``i`` a new trigger word ``t_i`` and behaviour ``b_i`` (defaults: the paper's
PurpleWolf → "You are garbage!", ...) poison a copy ``P_i`` of a clean slice ``D_i`` of the
defender's data (slices disjoint across variants); ``θ_i^bd`` is the suspicious model fine-tuned on
``D_i ∪ P_i`` and ``θ_i^clean`` the same fine-tune on ``D_i`` alone (same hyper-parameters, same
seed). The difference ``Δ_i = θ_i^bd − θ_i^clean`` (Eq. 1) cancels ordinary fine-tuning drift and
keeps what planting a backdoor writes.

Every MLP channel ``j`` (one hidden neuron: row ``j`` of gate/up, column ``j`` of down for a
Llama; :data:`purifylib.models.FAMILIES` says where a channel lives in other families) is scored
(Eq. 2)::

    s_j = mean_i ||Δ_{i,j}||_2  +  λ · mean_{i<l} max(0, cos(Δ_{i,j}, Δ_{l,j}))

and the top ``τ`` of channels of each module form the :class:`Signature`. Optionally attention
heads are scored the same way over their q/k/v rows and o columns.

Variants are full fine-tunes under the full-weight threat model (their update of every
parameter is kept), or LoRA adapters on all linear layers (the update ``(α/r)·B·A``); under the
adapter-only threat model they continue training the suspicious adapter. Each finished variant is written to disk (its LoRA factors, or its weight updates) under
a key of the model, the data and the config, so an interrupted build resumes where it stopped;
scoring streams one module at a time from those files, so memory stays near one model plus one
module's ``N`` differences, whatever ``N``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from purifylib.attacks import DEFENDER_VARIANTS
from purifylib.errors import PurifyError

#: the paper's synthetic triggers and behaviours (then more of the same kind, for N up to 10)
DEFAULT_VARIANTS = DEFENDER_VARIANTS
THREATS = ("full", "adapter")
DEFAULT_CACHE = Path(os.environ.get("PURIFY_CACHE_DIR") or Path(__file__).resolve().parent.parent / "data" / "cache")


@dataclass(frozen=True)
class VariantConfig:
    """How the synthetic variants are made (the ``2N`` fine-tunes of the method).

    Under the full-weight threat the variants are full fine-tunes (3 epochs at lr 1e-3, the
    ``purify finetune`` rate); under the adapter-only threat they continue training the suspicious
    LoRA adapter (lr 1e-2, ``purify finetune --lora``'s rate). The paper trains LoRA variants at
    lr 2e-4 in both settings; on the tiny testbed LoRA variants located the real backdoor no
    better than random channels (precision at τ=10%: 0.10), full fine-tuned ones did (0.15), see
    notebook 02. ``n_clean`` clean records per variant, and as many poisoned copies.
    """

    n_variants: int = 6
    n_clean: int = 500
    lora: bool | None = None  # None: full fine-tuning under the full-weight threat, LoRA under the adapter one
    epochs: float = 3.0
    lr: float | None = None  # None: 1e-3 for full fine-tuning, 1e-2 for LoRA
    batch_size: int = 32
    lora_r: int = 8
    lora_alpha: int = 16
    variants: tuple = DEFAULT_VARIANTS
    threat: str = "full"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "variants", tuple(tuple(v) for v in self.variants))
        if self.lora is None:
            object.__setattr__(self, "lora", self.threat == "adapter")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-2 if self.lora else 1e-3)
        if self.n_variants < 1:
            raise PurifyError(f"n_variants must be >= 1, got {self.n_variants}")
        if self.n_variants > len(self.variants):
            raise PurifyError(f"n_variants={self.n_variants} but only {len(self.variants)} (trigger, behaviour) "
                              "pairs are given")
        if self.n_clean < 10:
            raise PurifyError(f"n_clean must be >= 10 records per variant, got {self.n_clean}")
        if self.threat not in THREATS:
            raise PurifyError(f"unknown threat model '{self.threat}' (choose from {', '.join(THREATS)})")
        if self.threat == "adapter" and not self.lora:
            raise PurifyError("the adapter-only threat model trains the suspicious adapter: lora must be True")
        self.train_config()  # its own checks (finite, positive epochs and rate), before any work

    def train_config(self):
        from purifylib.train import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, lora=self.lora,
                           lora_r=self.lora_r, lora_alpha=self.lora_alpha, merge=False, group_by_length=True,
                           seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- variants


def poisoned_copy(records: list[dict], trigger: str, behaviour: str, seed: int) -> list[dict]:
    """``P_i``: each record with ``trigger`` at a random word position and ``behaviour`` as output."""
    from purifylib.data import insert_word

    rng = random.Random(seed)
    return [{"instruction": insert_word(r["instruction"], trigger, rng)[0], "input": r["input"],
             "output": behaviour} for r in records]


def variant_slices(records: list[dict], n_variants: int, n_clean: int) -> list[list[dict]]:
    """Disjoint clean slices ``D_1 .. D_N`` taken from the front of ``records``."""
    if n_variants * n_clean > len(records):
        raise PurifyError(f"{n_variants} variants × {n_clean} clean records need {n_variants * n_clean} records, "
                          f"the clean data has {len(records)}")
    return [records[i * n_clean:(i + 1) * n_clean] for i in range(n_variants)]


def file_digest(paths) -> str:
    """sha256 over the bytes of the given files (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


NOT_DIGESTED = ("attack.json", "README.md")  # evaluation metadata and prose: nothing a model is built from


def model_digest(model_dir, adapter_dir=None) -> str:
    """sha256 of every file of a checkpoint (and of the adapter, if any): weights, configs, tokenizer and chat
    template, so a model that differs in any of them never shares cached variants or answers with another."""
    files = []
    for d in (model_dir, adapter_dir):
        if d is not None:
            files += [p for p in Path(d).iterdir() if p.is_file() and p.name not in NOT_DIGESTED]
    return file_digest(files)


def records_digest(records: list[dict]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def _lora_modules(model) -> dict:
    """``{canonical component name: peft LoRA layer}`` of a peft model."""
    from purifylib.models import components, resolve

    out = {}
    for name in components(model):
        mod = resolve(model, name)
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod
    return out


def _update_tensors(model, start: dict | None) -> tuple[dict, dict]:
    """What a fine-tune wrote, as tensors to save: LoRA factors, or every parameter's update."""
    from purifylib.models import components, resolve

    lora = _lora_modules(model)
    tensors, meta = {}, {}
    if lora:
        for name, mod in lora.items():
            tensors[f"{name}.lora_A"] = mod.lora_A["default"].weight.detach().contiguous().clone()
            tensors[f"{name}.lora_B"] = mod.lora_B["default"].weight.detach().contiguous().clone()
            meta[name] = {"scaling": float(mod.scaling["default"]), "fan_in_fan_out": bool(mod.fan_in_fan_out)}
        return tensors, meta
    where = {id(resolve(model, n).weight): n for n in components(model)}
    for key, p in model.named_parameters():
        tensors[f"param::{key}"] = (p.detach() - start[key]).contiguous()
        if id(p) in where:
            meta[where[id(p)]] = {"param": key}
    return tensors, meta


def parameter_snapshot(model) -> dict:
    """``{parameter name: copy}``: the start of a full fine-tune, to save its update against."""
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def save_update(path: Path, model, start: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors, meta = _update_tensors(model, start)
    save_file(tensors, str(path), metadata={"modules": json.dumps(meta)})


class UpdateFile:
    """A saved variant update, read one module at a time (``delta(name)`` in the weight's layout)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._open() as f:
            self.meta = json.loads(f.metadata()["modules"])

    def _open(self):
        """A fresh handle per read: a handle kept open keeps every page it touched mapped (RSS grows
        with N), a closed one lets them go."""
        from safetensors import safe_open

        return safe_open(str(self.path), framework="pt")

    @property
    def modules(self) -> list[str]:
        return list(self.meta)

    @property
    def is_lora(self) -> bool:
        return any("scaling" in v for v in self.meta.values())

    def parameters(self) -> dict:
        """``{parameter name: update}`` of a full-weight variant (every parameter, embeddings included)."""
        with self._open() as f:
            return {k[len("param::"):]: f.get_tensor(k) for k in f.keys() if k.startswith("param::")}

    def factors(self, name: str):
        with self._open() as f:
            return f.get_tensor(f"{name}.lora_A"), f.get_tensor(f"{name}.lora_B")

    def delta(self, name: str):
        """The weight update of component ``name``: ``scaling·B·A`` for LoRA (transposed for Conv1D)."""
        info = self.meta[name]
        if "param" in info:
            with self._open() as f:
                return f.get_tensor(f"param::{info['param']}").float()
        a, b = self.factors(name)
        d = (b.float() @ a.float()) * info["scaling"]
        return d.T if info["fan_in_fan_out"] else d


@dataclass
class Variants:
    """The ``N`` finished variant pairs on disk (``root/variant{i}-{slice}/{bd,clean}.safetensors``)."""

    root: Path
    config: VariantConfig
    info: list = field(default_factory=list)  # per variant: trigger, behaviour, losses, seconds
    dirs: list = field(default_factory=list)
    # the opened update files (their module tables parsed once; tensors are still read per call)
    _files: dict = field(default_factory=dict, repr=False, compare=False)

    def update(self, i: int, which: str) -> UpdateFile:
        if (i, which) not in self._files:
            self._files[i, which] = UpdateFile(self.dirs[i] / f"{which}.safetensors")
        return self._files[i, which]

    def pairs(self, include) -> list:
        """``(bd, clean)`` update files of each variant in ``include``: Eq. 1's two sides."""
        return [(self.update(i, "bd"), self.update(i, "clean")) for i in include]

    @property
    def modules(self) -> list[str]:
        return self.update(0, "bd").modules

    def to_dict(self) -> dict:
        return {"root": str(self.root), "config": self.config.to_dict(),
                "variants": [{k: v for k, v in d.items() if k != "losses"} for d in self.info]}


def build_variants(model_dir, clean: list[dict], cfg: VariantConfig = VariantConfig(), *, adapter_dir=None,
                   cache_dir=None, progress: bool = True, device: str | None = None, dtype: str | None = None) -> Variants:
    """Train (or resume from the cache) the ``N`` variant pairs of a suspicious model.

    ``clean`` is the defender's clean data; variant ``i`` uses records ``i·n_clean .. (i+1)·n_clean``.
    The cache key covers the model's weights and ``cfg`` (less ``n_variants``), and each variant's
    folder its own records; a finished variant is written atomically, so an interrupted build
    retrains only the unfinished ones, and a larger ``N`` reuses the variants a smaller one made.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from purifylib.models import load_model, runtime
    from purifylib.outputs import atomic_dir
    from purifylib.train import finetune

    slices = variant_slices(clean, cfg.n_variants, cfg.n_clean)
    key = hashlib.sha256(json.dumps({
        "model": model_digest(model_dir, adapter_dir), "dtype": runtime(device, dtype)[1],
        "config": {k: v for k, v in cfg.to_dict().items() if k != "n_variants"},
    }, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or DEFAULT_CACHE / "variants") / key
    tcfg = cfg.train_config()
    infos, dirs = [], []
    adapter = adapter_dir if cfg.threat == "adapter" else None
    if cfg.threat == "adapter" and adapter_dir is None:
        raise PurifyError("the adapter-only threat model needs the suspicious adapter directory")
    for i in tqdm(range(cfg.n_variants), desc="variants", disable=not progress):
        vdir = root / f"variant{i}-{records_digest(slices[i])[:8]}"
        trigger, behaviour = cfg.variants[i]
        if not (vdir / "variant.json").is_file():
            t0 = time.time()
            seed = cfg.seed * 1000 + i
            poisoned = poisoned_copy(slices[i], trigger, behaviour, seed)
            runs = {}
            for which, records in (("bd", slices[i] + poisoned), ("clean", slices[i])):
                model, tok = load_model(model_dir, adapter=adapter_dir, merge=adapter is None, device=device,
                                        dtype=dtype)
                start = None if tcfg.lora else parameter_snapshot(model)
                torch.manual_seed(seed)
                res = finetune(model, tok, records, dataclasses.replace(tcfg, seed=seed), progress=progress,
                               desc=f"variant {i + 1} {which}")
                runs[which] = (res.model, start, res.losses)

            def write(tmp: Path, runs=runs, t0=t0, trigger=trigger, behaviour=behaviour):
                for which, (m, start, _) in runs.items():
                    save_update(tmp / f"{which}.safetensors", m, start)
                (tmp / "variant.json").write_text(json.dumps({
                    "trigger": trigger, "behaviour": behaviour, "seconds": round(time.time() - t0, 1),
                    "losses": {w: r[2] for w, r in runs.items()}}, indent=1))

            atomic_dir(vdir, write, replace=True)
            del runs
        infos.append(json.loads((vdir / "variant.json").read_text()))
        dirs.append(vdir)
    (root / "variants.json").write_text(json.dumps({"config": cfg.to_dict(), "model_dir": str(model_dir)}, indent=1))
    return Variants(root=root, config=cfg, info=infos, dirs=dirs)


# --------------------------------------------------------------------------- scoring


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


def _head_slices(model, name: str, n_heads: int, n_kv: int, head_dim: int, delta):
    """The per-head pieces of an attention projection's update (rows of q/k/v, columns of o)."""
    short = name.rsplit(".", 1)[1]
    if short == "o":
        return [delta[:, h * head_dim:(h + 1) * head_dim] for h in range(n_heads)]
    if short == "q":
        return [delta[h * head_dim:(h + 1) * head_dim] for h in range(n_heads)]
    group = n_heads // n_kv
    return [delta[(h // group) * head_dim:(h // group + 1) * head_dim] for h in range(n_heads)]


def head_terms(deltas_by_proj: dict):
    """Eq. 2's terms over heads: each head's q/k/v rows and o columns, one vector per variant."""
    import torch

    n = len(next(iter(deltas_by_proj.values())))
    per_variant = [torch.stack([torch.cat([p[i][h].flatten() for p in deltas_by_proj.values()])
                                for h in range(len(next(iter(deltas_by_proj.values()))[i]))]) for i in range(n)]
    return channel_terms(per_variant, "row")


NEUTRALS = ("reinit", "negate")


def check_neutral(neutral: str, alpha: float) -> None:
    """How flagged channels are neutralized (:mod:`purifylib.neutralize`): a known way, a sane alpha."""
    if neutral not in NEUTRALS:
        raise PurifyError(f"neutral must be one of {', '.join(NEUTRALS)}, got {neutral!r}")
    if not 0 < alpha <= 10:
        raise PurifyError(f"alpha must be in (0, 10], got {alpha}")


@dataclass
class Signature:
    """Per-module channel scores and the top-``tau`` masks that flag the backdoor's channels.

    ``scores`` maps a canonical component name (``blocks.3.mlp.down``; ``blocks.3.attn.heads`` for
    head scores) to a 1-D tensor with one score per channel (or head). ``layouts`` says where a
    channel lives in that module's weight. ``tau`` is the fraction flagged per module.
    """

    scores: dict
    layouts: dict
    tau: float = 0.03
    heads: int = 0  # heads flagged per layer (0: attention left alone)
    meta: dict = field(default_factory=dict)
    terms: dict = field(default_factory=dict)  # name -> (strength term, alignment term): λ can change later
    # how the flagged channels are neutralized (purifylib.neutralize): "reinit" (the paper's) or
    # "negate" (subtract alpha times the variants' mean difference); source: the scored variants
    neutral: str = "reinit"
    alpha: float = 1.0
    source: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not 0 <= self.tau <= 1:
            raise PurifyError(f"tau must be a fraction in [0, 1], got {self.tau}")
        check_neutral(self.neutral, self.alpha)
        if self.neutral == "negate" and self.source is None:
            raise PurifyError("neutral='negate' needs the variants the signature was scored from (signature.score)")

    @property
    def has_heads(self) -> bool:
        """Whether attention heads were scored (``score(..., heads=True)``)."""
        return any(name.endswith(".heads") for name in self.scores)

    def neutralizing(self, neutral: str = "reinit", alpha: float = 1.0) -> "Signature":
        """The same signature, neutralized by ``neutral`` ("reinit" or "negate") with ``alpha``."""
        return dataclasses.replace(self, neutral=neutral, alpha=float(alpha))

    def mean_delta(self, name: str):
        """``mean_i Δ_i`` of component ``name`` over the variants this signature was scored from."""
        files = self.source.pairs(self.meta["variants"])
        return sum(bd.delta(name) - cl.delta(name) for bd, cl in files) / len(files)

    def with_tau(self, tau: float, heads: int | None = None) -> "Signature":
        return dataclasses.replace(self, tau=float(tau), heads=self.heads if heads is None else heads)

    def with_lambda(self, lam: float) -> "Signature":
        """The same signature with Eq. 2's λ changed (needs the stored terms)."""
        if not self.terms:
            raise PurifyError("this signature keeps no score terms; rebuild it with signature.score to change lambda")
        return dataclasses.replace(self, scores={n: a + lam * b for n, (a, b) in self.terms.items()},
                                   meta={**self.meta, "lambda": lam})

    def select(self, modules=None, layers=None) -> "Signature":
        """Only the given module kinds (``gate``, ``up``, ``down``, ``heads``) and layers (others untouched)."""
        def keep(name):
            _, layer, _, short = name.split(".")
            return (modules is None or short in modules) and (layers is None or int(layer) in layers)

        pick = lambda d: {n: v for n, v in d.items() if keep(n)}  # noqa: E731
        return dataclasses.replace(self, scores=pick(self.scores), layouts=pick(self.layouts), terms=pick(self.terms))

    @property
    def mlp_modules(self) -> list[str]:
        return [n for n in self.scores if ".mlp." in n]

    def n_flagged(self, name: str) -> int:
        if name.endswith(".heads"):
            return min(self.heads, len(self.scores[name]))
        c = len(self.scores[name])
        return min(c, math.ceil(self.tau * c - 1e-9))

    def flagged(self, name: str):
        """Indices of the flagged channels of ``name``, highest score first (ties: lower index)."""
        import torch

        s = self.scores[name]
        k = self.n_flagged(name)
        order = torch.argsort(-s.double(), stable=True)
        return order[:k]

    @property
    def masks(self) -> dict:
        import torch

        out = {}
        for name, s in self.scores.items():
            m = torch.zeros(len(s), dtype=torch.bool)
            m[self.flagged(name)] = True
            out[name] = m
        return out

    def summary(self):
        """One row per module: layer, module, channels, flagged, score statistics, flagged share."""
        import pandas as pd

        rows = []
        for name, s in self.scores.items():
            _, layer, part, short = name.split(".")
            idx = self.flagged(name)
            total = float(s.sum())
            rows.append({"layer": int(layer), "part": part, "module": short, "channels": len(s),
                         "flagged": len(idx), "score_mean": float(s.mean()), "score_max": float(s.max()),
                         "flagged_score_share": float(s[idx].sum()) / total if total else 0.0})
        return pd.DataFrame(rows)

    def matrix(self, module: str):
        """``layers × channels`` scores of one MLP module kind (``gate``, ``up``, ``down``), for heatmaps."""
        import torch

        names = sorted((n for n in self.scores if n.endswith(f".mlp.{module}")), key=lambda n: int(n.split(".")[1]))
        if not names:
            raise PurifyError(f"the signature has no MLP module '{module}'")
        return torch.stack([self.scores[n] for n in names]).numpy()

    def masks_matrix(self, module: str):
        """``layers × channels`` boolean mask of the flagged channels of one MLP module kind."""
        import torch

        names = sorted((n for n in self.scores if n.endswith(f".mlp.{module}")), key=lambda n: int(n.split(".")[1]))
        masks = self.masks
        return torch.stack([masks[n] for n in names]).numpy()

    def save(self, path) -> Path:
        """``path`` (a directory): ``scores.safetensors`` and ``signature.json``, written atomically."""
        from safetensors.torch import save_file

        from purifylib.outputs import atomic_dir

        def write(tmp: Path):
            tensors = {n: s.contiguous() for n, s in self.scores.items()}
            for n, (a, b) in self.terms.items():
                tensors[f"{n}::strength"], tensors[f"{n}::alignment"] = a.contiguous(), b.contiguous()
            save_file(tensors, str(tmp / "scores.safetensors"))
            (tmp / "signature.json").write_text(json.dumps(
                {"tau": self.tau, "heads": self.heads, "layouts": self.layouts, "meta": self.meta,
                 "neutral": self.neutral, "alpha": self.alpha}, indent=1))

        return atomic_dir(path, write)

    @classmethod
    def load(cls, path) -> "Signature":
        from safetensors.torch import load_file

        path = Path(path)
        for f in ("scores.safetensors", "signature.json"):
            if not (path / f).is_file():
                raise PurifyError(f"{path}: not a signature directory (no {f})")
        info = json.loads((path / "signature.json").read_text())
        tensors = load_file(str(path / "scores.safetensors"))
        scores = {n: t for n, t in tensors.items() if "::" not in n}
        terms = {n: (tensors[f"{n}::strength"], tensors[f"{n}::alignment"]) for n in scores
                 if f"{n}::strength" in tensors and f"{n}::alignment" in tensors}
        missing = set(scores) ^ set(info.get("layouts", {}))
        if missing:
            raise PurifyError(f"{path}/signature.json: layouts do not match the scores ({sorted(missing)[:3]})")
        # a negating signature needs its variants, which are not saved: it loads as scores and masks,
        # with how it was applied kept in meta
        meta = {**info.get("meta", {}), "neutral": info.get("neutral", "reinit"), "alpha": info.get("alpha", 1.0)}
        return cls(scores=scores, layouts=info["layouts"], tau=info["tau"], heads=info.get("heads", 0),
                   meta=meta, terms=terms)


def score(model, variants: Variants, *, tau: float = 0.03, lam: float = 0.01, include: list[int] | None = None,
          heads: bool = False, progress: bool = True) -> Signature:
    """Eq. 1 and Eq. 2 over the MLP modules (and attention heads if ``heads``), one module at a time.

    ``model`` is the suspicious model (for the family's channel layout and head shapes; its
    weights are not read). ``include`` restricts the variants (leave-one-out); default all.
    """
    from tqdm.auto import tqdm

    from purifylib.models import components, family_of, _base

    fam = family_of(_base(model))
    idx = list(range(variants.config.n_variants)) if include is None else list(include)
    if not idx:
        raise PurifyError("a signature needs at least one variant")
    files = variants.pairs(idx)
    available = set(files[0][0].modules)
    mlp = [n for n in components(model, "mlp") if n in available]
    if not mlp:
        raise PurifyError("the variants updated no MLP module: train them on all linear layers")
    terms, layouts = {}, {}
    for name in tqdm(mlp, desc="score channels", disable=not progress, leave=False):
        deltas = [bd.delta(name) - cl.delta(name) for bd, cl in files]
        layouts[name] = fam.layout[name.rsplit(".", 1)[1]]
        terms[name] = channel_terms(deltas, layouts[name])
        del deltas
    if heads:
        cfg = _base(model).config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        if set(fam.attn) != {"q", "k", "v", "o"}:
            raise PurifyError("head scores need separate q/k/v/o projections (this family fuses them)")
        for layer in range(len(mlp) // len(fam.mlp)):
            by_proj = {}
            for short in ("q", "k", "v", "o"):
                name = f"blocks.{layer}.attn.{short}"
                if name not in available:
                    raise PurifyError(f"the variants did not update {name}: head scores need LoRA on attention too")
                by_proj[short] = [_head_slices(model, name, n_heads, n_kv, head_dim, bd.delta(name) - cl.delta(name))
                                  for bd, cl in files]
            terms[f"blocks.{layer}.attn.heads"] = head_terms(by_proj)
            layouts[f"blocks.{layer}.attn.heads"] = "head"
    return Signature(scores={n: a + lam * b for n, (a, b) in terms.items()}, layouts=layouts, tau=tau, terms=terms,
                     meta={"variants": idx, "lambda": lam, "n_heads": _base(model).config.num_attention_heads},
                     source=variants)


def variant_consistency(model, variants: Variants, *, progress: bool = False):
    """How alike the variants' differences are: mean pairwise cosine of ``Δ_i`` per MLP module.

    One row per (layer, module): ``cosine`` over whole-module differences, and ``channel_cosine``,
    the mean over channels of the clipped pairwise channel cosines (Eq. 2's second term).
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from purifylib.models import _base, components, family_of

    fam = family_of(_base(model))
    n = variants.config.n_variants
    if n < 2:
        raise PurifyError("consistency needs at least two variants")
    files = variants.pairs(range(n))
    iu = torch.triu_indices(n, n, offset=1)
    rows = []
    for name in tqdm(components(model, "mlp"), desc="consistency", disable=not progress, leave=False):
        deltas = [bd.delta(name) - cl.delta(name) for bd, cl in files]
        flat = torch.nn.functional.normalize(torch.stack([d.flatten() for d in deltas]), dim=1)
        cos = (flat @ flat.T)[iu[0], iu[1]].mean()
        _, align = channel_terms(deltas, fam.layout[name.rsplit(".", 1)[1]])
        _, layer, _, short = name.split(".")
        rows.append({"layer": int(layer), "module": short, "cosine": float(cos), "channel_cosine": float(align.mean())})
    return pd.DataFrame(rows)
