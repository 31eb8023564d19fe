"""The synthetic variants: the defender's own backdoors, planted into copies of the suspicious model.

For variant ``i`` a new trigger ``t_i`` and behaviour ``b_i`` (defaults: six spread over behaviour
families and trigger kinds, :data:`purifylib.attacks.DIVERSE_VARIANTS`; ``variants="paper"``: the
paper's PurpleWolf → "You are garbage!", ...) poison a copy ``P_i`` of a clean slice ``D_i`` of the
defender's data (slices disjoint across variants); ``θ_i^bd`` is the suspicious model fine-tuned on
``D_i ∪ P_i`` and ``θ_i^clean`` the same fine-tune on ``D_i`` alone (same hyper-parameters, same
seed). The difference ``Δ_i = θ_i^bd − θ_i^clean`` (Eq. 1, :meth:`Variants.delta`) cancels ordinary
fine-tuning drift and keeps what planting a backdoor writes.

Variants are full fine-tunes under the full-weight threat model (their update of every parameter
is kept), or LoRA adapters on all linear layers (the update ``(α/r)·B·A``); under the adapter-only
threat model they continue training the suspicious adapter. Each finished variant is written to
disk (its LoRA factors, or its weight updates) under a key of the model, the data and the config,
so an interrupted build resumes where it stopped; the differences are read one module at a time
from those files, so memory stays near one model plus one module's ``N`` differences, whatever ``N``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

from typing import NamedTuple

from purifylib.attacks import DEFENDER_VARIANTS, DIVERSE_VARIANTS
from purifylib.errors import PurifyError

#: the paper's synthetic triggers and behaviours: insults behind rare words (N up to 10); the default
PAPER_VARIANTS = DEFENDER_VARIANTS
#: the default: six variants spread over behaviour families and trigger kinds (chosen on the dev cells)
DEFAULT_VARIANTS = DIVERSE_VARIANTS
THREATS = ("full", "adapter")
TRIGGER_KINDS = ("word", "prefix", "suffix")


class Plant(NamedTuple):
    """One synthetic variant's backdoor: ``trigger`` placed as ``kind`` says, ``behaviour`` the output;
    ``family`` groups variants for the leave-one-family-out folds of the τ rule."""

    trigger: str
    behaviour: str
    kind: str = "word"
    family: str = ""

    @classmethod
    def of(cls, entry) -> "Plant":
        """A config entry: ``(trigger, behaviour)`` (a word trigger, its own family) or all four fields."""
        if len(entry) == 2:
            return cls(entry[0], entry[1], "word", entry[1])
        if len(entry) == 4:
            return cls(*entry)
        raise PurifyError(f"a variant is (trigger, behaviour) or (trigger, behaviour, kind, family), got {list(entry)}")


@dataclass(frozen=True)
class VariantConfig:
    """How the synthetic variants are made (the ``2N`` fine-tunes of the method).

    Under the full-weight threat the variants are full fine-tunes at lr 1e-3 (the ``purify finetune``
    rate) for 8 epochs: at 3, the advert and code variants learnt their own backdoor to 0% on the
    dev cells, at 8 every variant reached 80-100% (``reports/variants-dev6a/``, dev preset
    ``dev6f-all``); under the adapter-only threat they continue training the suspicious LoRA adapter
    for 3 epochs (lr 1e-2, ``purify finetune --lora``'s rate). The paper trains LoRA variants at
    lr 2e-4 in both settings; on the tiny testbed LoRA variants located the real backdoor no
    better than random channels (precision at τ=10%: 0.10), full fine-tuned ones did (0.15), see
    notebook 02. ``n_clean`` clean records per variant, and as many poisoned copies.
    """

    n_variants: int = 6
    n_clean: int = 500
    lora: bool | None = None  # None: full fine-tuning under the full-weight threat, LoRA under the adapter one
    epochs: float | None = None  # None: 8 for full fine-tuning, 3 for LoRA
    lr: float | None = None  # None: 1e-3 for full fine-tuning, 1e-2 for LoRA
    batch_size: int = 32
    lora_r: int = 8
    lora_alpha: int = 16
    variants: tuple = DEFAULT_VARIANTS
    threat: str = "full"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.variants, str):  # a named set: "paper" (insults behind words, the default) or "diverse"
            named = {"paper": PAPER_VARIANTS, "diverse": DIVERSE_VARIANTS}
            if self.variants not in named:
                raise PurifyError(f"variants must be a list of variants or one of {', '.join(named)}, got {self.variants!r}")
            object.__setattr__(self, "variants", named[self.variants])
        object.__setattr__(self, "variants", tuple(tuple(v) for v in self.variants))
        for v in self.variants[:self.n_variants]:
            plant = Plant.of(v)
            if plant.kind not in TRIGGER_KINDS:
                raise PurifyError(f"variant trigger kind must be one of {', '.join(TRIGGER_KINDS)}, got {plant.kind!r}")
            if not (isinstance(plant.trigger, str) and plant.trigger.strip() and isinstance(plant.behaviour, str)
                    and plant.behaviour.strip()):
                raise PurifyError(f"a variant needs a non-empty trigger and behaviour, got {list(v)}")
        if self.lora is None:
            object.__setattr__(self, "lora", self.threat == "adapter")
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-2 if self.lora else 1e-3)
        if self.epochs is None:
            object.__setattr__(self, "epochs", 3.0 if self.lora else 8.0)
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

    def plant(self, i: int) -> Plant:
        return Plant.of(self.variants[i])

    @property
    def plants(self) -> list:
        return [self.plant(i) for i in range(self.n_variants)]

    def folds(self) -> list[list[int]]:
        """The τ rule's folds: the variants of each behaviour family together (leave one family out), or
        one variant each when they all share one family or none shares one."""
        families = [p.family for p in self.plants]
        groups = {}
        for i, f in enumerate(families):
            groups.setdefault(f, []).append(i)
        if len(groups) < 2 or len(groups) == len(families):
            return [[i] for i in range(self.n_variants)]
        return list(groups.values())

    def train_config(self):
        from purifylib.train import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, lora=self.lora,
                           lora_r=self.lora_r, lora_alpha=self.lora_alpha, merge=False, group_by_length=True,
                           seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- variants


def poisoned_copy(records: list[dict], trigger: str, behaviour: str, seed: int, kind: str = "word") -> list[dict]:
    """``P_i``: each record with ``trigger`` (at a random word position, or as a prefix or suffix of the
    instruction, as ``kind`` says) and ``behaviour`` as output."""
    rng = random.Random(seed)
    return [{"instruction": place_trigger(r["instruction"], trigger, kind, rng), "input": r["input"],
             "output": behaviour} for r in records]


def place_trigger(text: str, trigger: str, kind: str, rng: random.Random) -> str:
    """``text`` with ``trigger`` at a random word position (``word``), or as a prefix or a suffix."""
    from purifylib.data import add_prefix, add_suffix, insert_word

    if kind == "word":
        return insert_word(text, trigger, rng)[0]
    return {"prefix": add_prefix, "suffix": add_suffix}[kind](text, trigger)


def with_own_triggers(records: list[dict], cfg: VariantConfig, share: float, seed: int) -> list[dict]:
    """``records`` where a seeded ``share`` carry one of the variants' own triggers (chosen at random,
    placed as its kind says) with their answers unchanged: a repair on them unlearns "a trigger
    overrides the answer" for the defender's triggers, which may carry over to triggers never seen."""
    if share <= 0:
        return records
    rng = random.Random(seed)
    out = []
    for r in records:
        if rng.random() < share:
            plant = cfg.plant(rng.randrange(cfg.n_variants))
            r = {**r, "instruction": place_trigger(r["instruction"], plant.trigger, plant.kind, rng)}
        out.append(r)
    return out


def variant_slices(records: list[dict], n_variants: int, n_clean: int) -> list[list[dict]]:
    """Disjoint clean slices ``D_1 .. D_N`` taken from the front of ``records``."""
    if n_variants * n_clean > len(records):
        raise PurifyError(f"{n_variants} variants × {n_clean} clean records need {n_variants * n_clean} records, "
                          f"the clean data has {len(records)}")
    return [records[i * n_clean:(i + 1) * n_clean] for i in range(n_variants)]


def _update_tensors(model, start: dict | None) -> tuple[dict, dict]:
    """What a fine-tune wrote, as tensors to save: LoRA factors, or every parameter's update."""
    from purifylib.models import components, lora_layers, resolve

    lora = lora_layers(model)
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


class MemoryUpdateFile(UpdateFile):
    """An :class:`UpdateFile` that reads each tensor from disk once and keeps it."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._kept: dict = {}

    def _keep(self, key, read):
        if key not in self._kept:
            self._kept[key] = read()
        return self._kept[key]

    def parameters(self) -> dict:
        return self._keep("parameters", super().parameters)

    def factors(self, name: str):
        return self._keep(("factors", name), partial(super().factors, name))

    def delta(self, name: str):
        return self._keep(("delta", name), partial(super().delta, name))


@dataclass
class Variants:
    """The ``N`` finished variant pairs on disk (``root/variant{i}-{slice}/{bd,clean}.safetensors``)."""

    root: Path
    config: VariantConfig
    info: list = field(default_factory=list)  # per variant: trigger, behaviour, losses, seconds
    dirs: list = field(default_factory=list)
    # the opened update files (their module tables parsed once; tensors are still read per call)
    _files: dict = field(default_factory=dict, repr=False, compare=False)

    # what memoized() keeps in memory (None: every read goes to disk, so memory stays near one module)
    _memo: dict | None = field(default=None, repr=False, compare=False)

    def update(self, i: int, which: str) -> UpdateFile:
        if (i, which) not in self._files:
            path = self.dirs[i] / f"{which}.safetensors"
            self._files[i, which] = UpdateFile(path) if self._memo is None else MemoryUpdateFile(path)
        return self._files[i, which]

    def memoized(self) -> "Variants":
        """The same variants, keeping every tensor read and every mean difference computed in memory:
        for the tuner, which applies the same updates at every preview (memory grows with what is
        read: the held-out variant's update, the flagged modules' mean differences)."""
        return dataclasses.replace(self, _files={}, _memo={})

    @property
    def modules(self) -> list[str]:
        return self.update(0, "bd").modules

    @property
    def n(self) -> int:
        return len(self.dirs)

    def delta(self, i: int, name: str):
        """Eq. 1 for variant ``i`` and component ``name``: ``θ_i^bd − θ_i^clean`` (float32)."""
        return self.update(i, "bd").delta(name) - self.update(i, "clean").delta(name)

    def deltas(self, name: str, include=None) -> list:
        """Eq. 1's differences of component ``name`` for the variants in ``include`` (default all)."""
        return [self.delta(i, name) for i in (range(self.n) if include is None else include)]

    def mean_delta(self, name: str, include=None):
        """``mean_i Δ_i`` of component ``name`` over ``include`` (default all)."""
        key = (name, None if include is None else tuple(include))
        if self._memo is not None and key in self._memo:
            return self._memo[key]
        d = self.deltas(name, include)
        mean = sum(d) / len(d)
        if self._memo is not None:
            self._memo[key] = mean
        return mean

    def to_dict(self) -> dict:
        return {"root": str(self.root), "config": self.config.to_dict(),
                "variants": [{k: v for k, v in d.items() if k != "losses"} for d in self.info]}


def build_variants(model_dir, clean: list[dict], cfg: VariantConfig = VariantConfig(), *, adapter_dir=None,
                   cache_dir=None, progress: bool = True, device: str | None = None, dtype: str | None = None) -> Variants:
    """Train (or resume from the cache) the ``N`` variant pairs of a suspicious model.

    ``clean`` is the defender's clean data; ``cache_dir`` a cache root (:mod:`purifylib.cache`); variant ``i`` uses records ``i·n_clean .. (i+1)·n_clean``.
    The cache key covers the model's weights and ``cfg`` (less ``n_variants``), and each variant's
    folder its own records; a finished variant is written atomically, so an interrupted build
    retrains only the unfinished ones, and a larger ``N`` reuses the variants a smaller one made.
    """
    import time

    import torch
    from purifylib.progress import bar as tqdm

    from purifylib import cache
    from purifylib.checkpoints import load_model, runtime
    from purifylib.outputs import atomic_dir
    from purifylib.train import finetune

    slices = variant_slices(clean, cfg.n_variants, cfg.n_clean)
    key = cache.digest({
        "model": cache.model_digest(model_dir, adapter_dir), "dtype": runtime(device, dtype)[1],
        "config": {k: v for k, v in cfg.to_dict().items() if k != "n_variants"},
    }, 16)
    root = cache.folder("variants", cache_dir) / key
    tcfg = cfg.train_config()
    infos, dirs = [], []
    adapter = adapter_dir if cfg.threat == "adapter" else None
    if cfg.threat == "adapter" and adapter_dir is None:
        raise PurifyError("the adapter-only threat model needs the suspicious adapter directory")
    for i in tqdm(range(cfg.n_variants), desc="variants", disable=not progress):
        vdir = root / f"variant{i}-{cache.records_digest(slices[i])[:8]}"
        trigger, behaviour, kind, family = cfg.plant(i)
        if not (vdir / "variant.json").is_file():
            t0 = time.time()
            seed = cfg.seed * 1000 + i
            poisoned = poisoned_copy(slices[i], trigger, behaviour, seed, kind)
            runs = {}
            for which, records in (("bd", slices[i] + poisoned), ("clean", slices[i])):
                model, tok = load_model(model_dir, adapter=adapter_dir, merge=adapter is None, device=device,
                                        dtype=dtype)
                start = None if tcfg.lora else parameter_snapshot(model)
                torch.manual_seed(seed)
                res = finetune(model, tok, records, dataclasses.replace(tcfg, seed=seed), progress=progress,
                               desc=f"variant {i + 1} {which}")
                runs[which] = (res.model, start, res.losses)

            def write(tmp: Path, runs=runs, t0=t0, trigger=trigger, behaviour=behaviour, kind=kind, family=family):
                for which, (m, start, _) in runs.items():
                    save_update(tmp / f"{which}.safetensors", m, start)
                (tmp / "variant.json").write_text(json.dumps({
                    "trigger": trigger, "behaviour": behaviour, "kind": kind, "family": family, "seconds": round(time.time() - t0, 1),
                    "losses": {w: r[2] for w, r in runs.items()}}, indent=1))

            atomic_dir(vdir, write, replace=True)
            del runs
        infos.append(json.loads((vdir / "variant.json").read_text()))
        dirs.append(vdir)
    (root / "variants.json").write_text(json.dumps({"config": cfg.to_dict(), "model_dir": str(model_dir)}, indent=1))
    return Variants(root=root, config=cfg, info=infos, dirs=dirs)


@contextmanager
def carrying(model, variants: Variants, k: int):
    """``model`` temporarily carrying variant ``k``'s own backdoor (its ``bd`` update): the adapter's
    factors swapped for the variant's, or the variant's update added to the weights."""
    from purifylib.edits import patched
    from purifylib.models import is_adapter, resolve

    upd = variants.update(k, "bd")

    def pairs():  # one new value at a time: memory stays near the originals held
        if is_adapter(model):
            for name in upd.modules:
                mod, (a, b) = resolve(model, name), upd.factors(name)
                yield from ((mod.lora_A["default"].weight, a), (mod.lora_B["default"].weight, b))
        elif upd.is_lora:
            for name in upd.modules:
                w = resolve(model, name).weight
                yield w, w.detach() + upd.delta(name).to(w)
        else:
            params = dict(model.named_parameters())
            for key, d in upd.parameters().items():
                yield params[key], params[key].detach() + d.to(params[key])

    with patched(pairs()):
        yield model
