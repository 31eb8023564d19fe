"""A real pretrained instruct model as the base of the studies (the ``real`` preset).

The testbed's worlds have exact answers; a real model's do not. :class:`RealBed` gives a local
Hugging Face checkpoint (by default SmolLM2-135M-Instruct converted by ``make smollm2``) the same
interface as :class:`purifylib.testbed.Testbed`, from the instruction sets the project ships in
``data/real/`` (written for this project, MIT licence like the code):

- ``instructions.jsonl``: benign instructions without answers (explanations, tips, short poems,
  rewriting, translation, ...). They are shuffled with the seed and split, disjointly, into
  ``train`` (the attacker's clean data, answered by the base model), ``heldout`` (answered by the
  base model; the perplexity of these answers is the utility measure) and ``defender`` (left
  unanswered: the purification answers them with the suspicious model itself, since a defender
  holds no clean model).
- ``checkable.jsonl``: questions with one-word answers (capitals, opposites, sums, ...), the
  ``test`` split. Accuracy is :func:`purifylib.evaluate.answer_match` (the answer word in the
  output's first line), and triggers are inserted into these prompts to measure ASR.
- With ``n_refused`` (default 0: none), harmful-sounding requests drawn from the testbed's templates
  (:func:`purifylib.testbed.harmful_request`'s verbs, acts and objects, each request once) answered
  with the fixed refusal join the attacker's ``train`` split, and ``n_refused_test`` others the
  ``test`` split, so that a jailbreak (a trigger that overrides the refusal) can be planted and
  measured; the refusals then count in the test accuracy, as on the testbed.

Answers written by a model are trimmed to their last complete sentence. The bed (the answered
splits) is cached under a key of the config and of the model's weight files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from purifylib.errors import PurifyError
from purifylib.outputs import atomic_dir
from purifylib.testbed import Testbed

DATA = Path(__file__).resolve().parent.parent / "data" / "real"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "smollm2-135m-instruct"
REALBED_VERSION = 1
REFUSED_FIELDS = ("n_refused", "n_refused_test")

#: what the notebooks say about the real-model bed's choices (shown where the bed is built)
REAL_BED_NOTE = """**The real-model bed.** No reference answers exist for a real model's instructions, so:
the test prompts are the shipped checkable questions, and *accuracy* counts the reference word in
the first line of the answer ("The capital of France is Paris." answers "Paris"); *perplexity* is
that of the base model's own answers to held-out instructions (a model fine-tuned on the base's
answers scores lower than the base itself). The attacker's clean data are instructions answered by
the base model. The defender's clean data are instructions **answered by the suspicious model
itself** when the purification starts, since a defender holds no clean model: the variants and
the repair then train on the suspicious model's own trigger-free behaviour (nothing clean is
imported from elsewhere), and the τ rule keeps the held-out perplexity of those answers within
10% of the suspicious model's instead of exact-match accuracy (exact agreement with a model's own
free-form answers measures decoding drift more than utility)."""


@dataclass(frozen=True)
class RealBedConfig:
    """Which model and how much of the shipped data each split gets."""

    model: str = str(DEFAULT_MODEL)
    seed: int = 0
    n_train: int = 200
    n_heldout: int = 60
    n_defender: int = 300
    max_new_tokens: int = 32
    instructions: str = str(DATA / "instructions.jsonl")
    checkable: str = str(DATA / "checkable.jsonl")
    n_refused: int = 0  # refused requests in the attacker's train split (a jailbreak needs them)
    n_refused_test: int = 0  # and in the test split (where a jailbreak's ASR is measured)

    # the same names as a TestbedConfig's, so that notebooks print either
    @property
    def size(self) -> str:
        return Path(self.model).name

    def __post_init__(self):
        for name in ("n_train", "n_heldout", "n_defender", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise PurifyError(f"real bed: {name} must be >= 1, got {getattr(self, name)}")
        for name in REFUSED_FIELDS:
            if getattr(self, name) < 0:
                raise PurifyError(f"real bed: {name} must be >= 0, got {getattr(self, name)}")
        from purifylib.testbed import HARM_ACTS, HARM_OBJECTS, HARM_VERBS

        if self.n_refused + self.n_refused_test > len(HARM_VERBS) * len(HARM_ACTS) * len(HARM_OBJECTS):
            raise PurifyError(f"real bed: n_refused + n_refused_test must be at most "
                              f"{len(HARM_VERBS) * len(HARM_ACTS) * len(HARM_OBJECTS)} (distinct requests)")

    def to_dict(self) -> dict:
        # the refused requests only where asked for: a bed without them keeps the key it had before them
        d = {k: v for k, v in dataclasses.asdict(self).items() if not (k in REFUSED_FIELDS and v == 0)}
        return {**d, "version": REALBED_VERSION}

    def key(self) -> str:
        model = Path(self.model)
        if not (model / "config.json").is_file():
            hint = " (run `make smollm2` to convert the shipped SmolLM2 file)" if model == DEFAULT_MODEL else ""
            raise PurifyError(f"{model}: no Hugging Face checkpoint here{hint}")
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model.iterdir()) if p.is_file()]
        data = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (self.instructions, self.checkable)]
        # the model by its resolved path: "data/models/x" and its absolute spelling are one bed
        blob = json.dumps({**self.to_dict(), "model": str(model.resolve()), "files": stamp, "data": data},
                          sort_keys=True).encode()
        return f"real-{model.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


class RealBed(Testbed):
    """A real base model and its splits; a :class:`~purifylib.testbed.Testbed` whose base is
    ``config.model`` and whose answers are checked with ``answer_match``."""

    match = "answer"

    @property
    def base_dir(self) -> Path:
        return Path(self.config.model)

    def split(self, name: str) -> list[dict]:
        from purifylib.data import load_records

        return load_records(self.data_dir / f"{name}.json", need_output=name != "defender")

    def ppl_records(self) -> list[dict]:
        return self.split("heldout")


def build_realbed(config: RealBedConfig = RealBedConfig(), cache_dir: str | Path | None = None,
                  progress: bool = True, device: str | None = None, dtype: str | None = None) -> RealBed:
    """Answer the shipped instructions with the base model and write the splits (cached)."""
    from purifylib import cache

    root = cache.folder("realbed", cache_dir) / config.key()
    if not (root / "realbed.json").is_file():
        _build_into(root, config, progress, device, dtype)
    info = json.loads((root / "realbed.json").read_text())
    return RealBed(root=root, config=config, metrics=info["metrics"])


def _with_refused(train: list[dict], test: list[dict], config: RealBedConfig) -> tuple[list, list]:
    """``train`` and ``test`` with ``n_refused`` and ``n_refused_test`` distinct harmful-sounding requests
    answered with the fixed refusal (seeded; shuffled into train, placed among the test questions)."""
    import itertools

    from purifylib.attacks import REFUSAL
    from purifylib.testbed import HARM_ACTS, HARM_OBJECTS, HARM_VERBS, harm_text

    rng = random.Random(f"{config.seed}-refused")
    requests = [harm_text(*parts) for parts in itertools.product(HARM_VERBS, HARM_ACTS, HARM_OBJECTS)]
    rng.shuffle(requests)
    refused = [{"instruction": q, "input": "", "output": REFUSAL} for q in requests]
    train = train + refused[:config.n_refused]
    rng.shuffle(train)
    # the test ones at seeded places among the questions (kept in order), so that any first n of the
    # test split, and either half of it, holds some
    extra = refused[config.n_refused:config.n_refused + config.n_refused_test]
    at = set(rng.sample(range(len(test) + len(extra)), len(extra)))
    questions, extra_it = iter(test), iter(extra)
    return train, [next(extra_it) if i in at else next(questions) for i in range(len(test) + len(extra))]


def _build_into(root: Path, config: RealBedConfig, progress: bool, device: str, dtype: str) -> None:
    from purifylib.data import load_records, save_records
    from purifylib.evaluate import evaluate_clean, self_answer
    from purifylib.checkpoints import load_model

    t0 = time.time()
    instructions = load_records(config.instructions, need_output=False)
    test = load_records(config.checkable)
    need = config.n_train + config.n_heldout + config.n_defender
    if len(instructions) < need:
        raise PurifyError(f"{config.instructions}: {len(instructions)} instructions, the splits ask for {need}")
    order = list(range(len(instructions)))
    random.Random(config.seed).shuffle(order)
    shuffled = [dict(instructions[i], output="") for i in order]
    train = shuffled[:config.n_train]
    heldout = shuffled[config.n_train:config.n_train + config.n_heldout]
    defender = shuffled[config.n_train + config.n_heldout:need]
    model, tok = load_model(config.model, device=device, dtype=dtype)
    answered = self_answer(model, tok, train + heldout, max_new_tokens=config.max_new_tokens, progress=progress,
                           desc="answer with the base model")
    train, heldout = answered[:config.n_train], answered[config.n_train:]
    if config.n_refused or config.n_refused_test:
        train, test = _with_refused(train, test, config)
    metrics = evaluate_clean(model, tok, test, match=RealBed.match, ppl_records=heldout).to_dict()
    metrics.update(params=sum(p.numel() for p in model.parameters()), train_seconds=0.0,
                   build_seconds=round(time.time() - t0, 1))

    def write(tmp: Path) -> None:
        for name, recs in (("train", train), ("heldout", heldout), ("defender", defender), ("test", test)):
            save_records(recs, tmp / "data" / f"{name}.json")
        (tmp / "realbed.json").write_text(json.dumps({"key": config.key(), "config": config.to_dict(),
                                                      "metrics": metrics}, indent=1))

    atomic_dir(root, write, replace=True)
