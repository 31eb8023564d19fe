"""A catalogue of hostile inputs and faults against the ``purify`` command line, on the micro testbed.

Each case builds its own bad input (a hostile checkpoint, a broken data file, an output path that
would harm the user's files, a fault of the machine), runs one ``purify`` command in this process,
and records what a user would see and what happened to their files:

- ``exit``: the exit status (a failing command must exit non-zero with exactly one line,
  ``purify: error: ...``, naming what is wrong);
- ``traceback``: a traceback was printed, or an exception escaped the command;
- ``unexpected``: the one line is the catch-all for errors nothing anticipated;
- ``modified``: an input (model, adapter, data file) changed;
- ``deleted``: a file the user owned disappeared;
- ``written``: a failing command left an output (or a temporary folder) behind.

Where root ignores file modes (unreadable or read-only paths) or the disk cannot really be filled,
the operating system's error is raised at the same call instead (``fault``), and said so.

Run it as a script for the table (``python tests/hostile_catalogue.py``); ``tests/test_hostile.py``
runs every case under pytest.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conftest import tree_hash  # noqa: E402


@dataclass
class World:
    """The micro testbed and a scratch folder; ``model``/``data`` are copies a case may read."""

    bed: object
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "inputs" / "model"

    @property
    def train(self) -> Path:
        return self.root / "inputs" / "train.json"

    @property
    def test(self) -> Path:
        return self.root / "inputs" / "test.json"

    @property
    def defender(self) -> Path:
        return self.root / "inputs" / "defender.json"


def make_world(root: Path) -> World:
    from purifylib.testbed import TestbedConfig, build_testbed

    bed = build_testbed(TestbedConfig(size="micro"), progress=False)
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    if not (root / "inputs" / "model").exists():
        shutil.copytree(bed.base_dir, root / "inputs" / "model")
        for name in ("train", "test", "defender"):
            shutil.copy(bed.data_dir / f"{name}.json", root / "inputs" / f"{name}.json")
    return World(bed=bed, root=root)


@dataclass
class Setup:
    """What one case runs and what it must leave alone."""

    argv: list
    inputs: list = field(default_factory=list)  # paths that must not change
    owned: list = field(default_factory=list)  # user files that must survive
    out: Path | None = None  # must not exist after a failure (unless it existed before)
    fault: object = None  # a context manager raising the machine's error at the right call
    expect: str = ""  # a piece of the one-line error ("" with ok=True: the command must succeed)
    ok: bool = False
    check: object = None  # check(world, stdout) -> str | None: a further failure message


@dataclass
class Case:
    number: int  # the item (1 data loss, 2 steering, 3 broken checkpoints, 4 tracebacks, 5 late, 6 smaller)
    name: str
    build: object  # build(world, case_dir) -> Setup
    before: str = ""  # what happened before the fix, as reported


CASES: list[Case] = []


def case(number: int, name: str, before: str = ""):
    def wrap(fn):
        CASES.append(Case(number, name, fn, before))
        return fn
    return wrap


def copy_model(world: World, d: Path, name: str = "model") -> Path:
    dst = d / name
    shutil.copytree(world.model, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def quick_finetune(world: World, out: Path, *extra) -> list:
    return ["--quiet", "finetune", "--model", str(world.model), "--data", str(world.defender), "--out", str(out),
            "--epochs", "0.05", *extra]


def evaluate(model: Path, world: World, *extra) -> list:
    return ["--quiet", "evaluate", "--model", str(model), "--data", str(world.test), *extra]


def os_error(target: str, code: int, path_part: str):
    """Make ``target`` (a dotted callable) raise the OS error ``code`` when called on a path containing ``path_part``."""
    import importlib

    mod_name, attr = target.rsplit(".", 1)
    owner = importlib.import_module(mod_name) if mod_name != "pathlib.Path" else __import__("pathlib").Path
    original = getattr(owner, attr)

    def faulty(*args, **kwargs):
        if any(path_part in str(a) for a in args):
            raise OSError(code, os.strerror(code), str(args[0]))
        return original(*args, **kwargs)

    return mock.patch.object(owner, attr, faulty)


# --------------------------------------------------------------------------- 1. data loss


@case(1, "finetune --out: a non-empty folder of the user's", "exit 0, notes.txt deleted")
def _(w, d):
    victim = d / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("x")
    return Setup(quick_finetune(w, victim), inputs=[w.model, w.defender], owned=[victim / "notes.txt"],
                 expect="not empty")


@case(1, "finetune --out: the parent of the input model", "the input model deleted")
def _(w, d):
    model = copy_model(w, d)
    return Setup(["--quiet", "finetune", "--model", str(model), "--data", str(w.defender), "--out", str(d),
                  "--epochs", "0.05"], inputs=[model, w.defender], expect="holds the input")


@case(1, "finetune --out: the input model itself", "refused")
def _(w, d):
    return Setup(quick_finetune(w, w.model), inputs=[w.model], expect="is the input")


@case(1, "finetune --out: inside the input model", "accepted")
def _(w, d):
    return Setup(quick_finetune(w, w.model / "sub"), inputs=[w.model], out=w.model / "sub", expect="inside the input")


@case(1, "finetune --out: the data file", "data file deleted")
def _(w, d):
    data = d / "train.json"
    shutil.copy(w.defender, data)
    return Setup(["--quiet", "finetune", "--model", str(w.model), "--data", str(data), "--out", str(data),
                  "--epochs", "0.05"], inputs=[data], expect="is the input")


@case(1, "finetune: a file put in --out during the run", "the file deleted at the final rename")
def _(w, d):
    import purifylib.train

    out = d / "out"
    real = purifylib.train.finetune

    def meanwhile(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "mine.txt").write_text("x")
        return real(*a, **k)

    def kept(world, stdout):
        results = list(d.glob("out.result-*"))
        return None if results and (results[0] / "model.safetensors").is_file() else "the finished model was lost"

    return Setup(quick_finetune(w, out), inputs=[w.model], owned=[out / "mine.txt"], out=out,
                 fault=mock.patch.object(purifylib.train, "finetune", meanwhile), expect="during the run",
                 check=kept)


@case(1, "run: a file put in --out during the run", "the file deleted at the final rename")
def _(w, d):
    import purifylib.purify

    out = d / "out"

    def meanwhile(*a, **k):  # stands for the purification: the user's file appears while it runs
        out.mkdir(exist_ok=True)
        (out / "mine.txt").write_text("x")
        return "result"

    def write(result, folder, inputs):
        (folder / "purify_report.json").write_text(json.dumps(inputs))

    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out", str(out)],
                 inputs=[w.model, w.defender], owned=[out / "mine.txt"], out=out,
                 fault=_stack(mock.patch.object(purifylib.purify, "purify", meanwhile),
                              mock.patch.object(purifylib.purify, "write_purified_into", write)),
                 expect="during the run",
                 check=lambda world, o: None if list(d.glob("out.result-*/purify_report.json")) else "result lost")


@case(1, "poison --out: the input data file", "input overwritten")
def _(w, d):
    data = d / "train.json"
    shutil.copy(w.train, data)
    return Setup(["poison", "--data", str(data), "--out", str(data)], inputs=[data], expect="is the input")


@case(1, "poison --out: an existing file of the user's", "overwritten")
def _(w, d):
    mine = d / "mine.json"
    mine.write_text("[]")
    return Setup(["poison", "--data", str(w.train), "--out", str(mine)], inputs=[w.train, mine], owned=[mine],
                 expect="refusing to overwrite")


@case(1, "poison: its .attack.json sidecar would overwrite a user file", "overwritten")
def _(w, d):
    side = d / "p.attack.json"
    side.write_text("{}")
    return Setup(["poison", "--data", str(w.train), "--out", str(d / "p.json")], inputs=[w.train, side],
                 out=d / "p.json", expect="refusing to overwrite")


@case(1, "run --out: inside the input model", "accepted")
def _(w, d):
    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out",
                  str(w.model / "purified")], inputs=[w.model], out=w.model / "purified", expect="inside the input")


@case(1, "run --out: the clean data file", "refused late")
def _(w, d):
    data = d / "clean.json"
    shutil.copy(w.defender, data)
    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(data), "--out", str(data)],
                 inputs=[data], expect="is the input")


@case(1, "run --out: a non-empty folder", "refused")
def _(w, d):
    (d / "o").mkdir()
    (d / "o" / "keep.txt").write_text("x")
    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out", str(d / "o")],
                 owned=[d / "o" / "keep.txt"], expect="not empty")


@case(1, "testbed --out: a non-empty folder of the user's", "refused")
def _(w, d):
    (d / "o").mkdir()
    (d / "o" / "keep.txt").write_text("x")
    return Setup(["--quiet", "testbed", "--size", "micro", "--out", str(d / "o")], owned=[d / "o" / "keep.txt"],
                 expect="not empty")


# --------------------------------------------------------------------------- 2. the checkpoint steers its evaluation


def _steering(w, d, **gen):
    """The same weights with a hostile ``generation_config.json``: evaluate must report what the plain copy does."""
    from purifylib.data import load_records
    from purifylib.evaluate import generate
    from purifylib.checkpoints import load_model

    model, tok = load_model(w.model)
    outs = generate(model, tok, load_records(w.test)[:64])
    # the model's commonest non-empty answer (ties by text, not by hash order): ASR > 0 for the plain weights
    target = min((o for o in set(outs) if o.strip()), key=lambda o: (-outs.count(o), o))
    ids = sorted(set(tok(target, add_special_tokens=False)["input_ids"]) | set(
        tok(" " + target, add_special_tokens=False)["input_ids"]))
    hostile = copy_model(w, d, "hostile")
    edit_json(hostile / "generation_config.json", **{k: (v(ids) if callable(v) else v) for k, v in gen.items()})
    argv = ["--json", "--trigger", "Zq", "--target", target]

    def same(world, stdout):
        from purifylib.cli import main

        plain = io.StringIO()
        with contextlib.redirect_stdout(plain), contextlib.redirect_stderr(io.StringIO()):
            main(evaluate(world.model, world, *argv))
        got, want = json.loads(stdout), json.loads(plain.getvalue())
        if want["asr"] == 0:
            return "the plain model's ASR is 0: the case cannot tell"
        return None if got == want else f"hostile settings changed the metrics: {got} vs {want}"

    return Setup(evaluate(hostile, w, *argv), inputs=[hostile], ok=True, check=same)


@case(2, "evaluate: bad_words_ids for the target's tokens", "ASR 0% for weights that score 94%")
def _(w, d):
    return _steering(w, d, bad_words_ids=lambda ids: [[i] for i in ids])


@case(2, "evaluate: num_beams 2, num_return_sequences 2", "predictions misaligned")
def _(w, d):
    return _steering(w, d, num_beams=2, num_return_sequences=2)


@case(2, "evaluate: penalties, forced and suppressed tokens, sampling", "")
def _(w, d):
    return _steering(w, d, repetition_penalty=5.0, no_repeat_ngram_size=1, suppress_tokens=lambda ids: ids,
                     min_new_tokens=20, do_sample=True, temperature=3.0, forced_eos_token_id=1)


@case(2, "run: the checkpoint's generation settings are not what tau probes use", "")
def _(w, d):
    from purifylib.evaluate import generate, own_generation_config

    hostile = copy_model(w, d, "hostile")
    edit_json(hostile / "generation_config.json", num_beams=3, num_return_sequences=3, max_new_tokens=1)

    def probe(world, stdout):
        from purifylib.data import load_records
        from purifylib.checkpoints import load_model

        model, tok = load_model(hostile)
        outs = generate(model, tok, load_records(world.test)[:5])
        cfg = own_generation_config(tok, 24)
        return None if len(outs) == 5 and cfg.num_beams == 1 else "generation followed the checkpoint"

    return Setup(evaluate(hostile, w, "--clean-only", "--json"), inputs=[hostile], ok=True, check=probe)


# --------------------------------------------------------------------------- 3. broken checkpoints


def _rewrite_weights(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    save_file(change(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})


@case(3, "a safetensors file with 1 of its tensors", "loads, the rest random (exit 0)")
def _(w, d):
    m = copy_model(w, d)
    _rewrite_weights(m, lambda t: dict(list(t.items())[:1]))
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="weights are missing")


@case(3, "a renamed tensor (same count, wrong name)", "")
def _(w, d):
    m = copy_model(w, d)
    _rewrite_weights(m, lambda t: {("model.bogus" if i == 0 else k): v for i, (k, v) in enumerate(t.items())})
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="weight(s) in the checkpoint")


@case(3, "all-NaN weights", "accepted; --json prints NaN")
def _(w, d):
    m = copy_model(w, d)
    _rewrite_weights(m, lambda t: {k: v.clone().fill_(float("nan")) for k, v in t.items()})
    return Setup(evaluate(m, w, "--clean-only", "--json"), inputs=[m], expect="NaN or infinite")


@case(3, "one infinite weight", "accepted")
def _(w, d):
    m = copy_model(w, d)

    def poke(t):
        k = sorted(t)[-1]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("inf")
        return t

    _rewrite_weights(m, poke)
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="NaN or infinite")


@case(3, "finite weights that overflow: --json stays JSON", "NaN printed")
def _(w, d):
    m = copy_model(w, d)
    _rewrite_weights(m, lambda t: {k: (v * 1e30 if v.dim() == 2 else v) for k, v in t.items()})

    def strict(world, stdout):
        try:
            json.loads(stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as exc:
            return f"not strict JSON: {exc}"
        return None

    return Setup(evaluate(m, w, "--clean-only", "--json"), inputs=[m], ok=True, check=strict)


@case(3, "a truncated weight file", "")
def _(w, d):
    m = copy_model(w, d)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[:len(data) // 2])
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="cannot load model")


@case(3, "a config asking for 768 GiB of weights", "stopped by the machine")
def _(w, d):
    m = copy_model(w, d)
    edit_json(m / "config.json", vocab_size=200_000, hidden_size=65536, intermediate_size=262144,
              num_hidden_layers=12, num_attention_heads=512, num_key_value_heads=512, head_dim=128)
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="weights are missing")


@case(3, "a config asking for a million layers", "")
def _(w, d):
    m = copy_model(w, d)
    edit_json(m / "config.json", num_hidden_layers=1_000_000)
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="layers")


@case(3, "a changed chat template gets its own cache key", "the same key: someone else's variants reused")
def _(w, d):
    from purifylib.cache import model_digest

    m = copy_model(w, d)
    (m / "chat_template.jinja").write_text((m / "chat_template.jinja").read_text() + " ")
    t = copy_model(w, d, "tok")
    tok = json.loads((t / "tokenizer.json").read_text())
    tok["added_tokens"] = tok.get("added_tokens", [])[:1]
    (t / "tokenizer.json").write_text(json.dumps(tok))

    def differ(world, stdout):
        keys = {model_digest(p) for p in (world.model, m, t)}
        return None if len(keys) == 3 else "a changed tokenizer or template shares the model's cache key"

    return Setup(evaluate(m, w, "--clean-only", "--json"), inputs=[m], ok=True, check=differ)


@case(3, "pickle weights only (code in __reduce__)", "refused, no code ran")
def _(w, d):
    m = copy_model(w, d)
    (m / "model.safetensors").unlink()
    marker = d / "ran.txt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (m / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="refusing to load untrusted pickle",
                 check=lambda world, out: "pickle code ran" if marker.exists() else None)


@case(3, "a pickle disguised as model.safetensors", "refused")
def _(w, d):
    m = copy_model(w, d)
    (m / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="cannot load model")


@case(3, "auto_map custom code in config.json", "refused, no code ran")
def _(w, d):
    m = copy_model(w, d)
    marker = d / "ran.txt"
    (m / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    edit_json(m / "config.json", auto_map={"AutoModelForCausalLM": "evil.Evil"}, model_type="evil")
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="cannot load model",
                 check=lambda world, out: "remote code ran" if marker.exists() else None)


# --------------------------------------------------------------------------- 4. one line, never a traceback


@case(4, "data file: invalid UTF-8", "traceback")
def _(w, d):
    bad = d / "bad.json"
    bad.write_bytes(b'[{"instruction": "\xff\xfe", "output": "x"}]')
    return Setup(evaluate(w.model, w)[:-2] + ["--data", str(bad)], inputs=[bad], expect="not UTF-8")


@case(4, "data file: JSON nested 200,000 deep", "traceback")
def _(w, d):
    bad = d / "deep.json"
    bad.write_text("[" * 200_000 + "]" * 200_000)
    return Setup(["poison", "--data", str(bad), "--out", str(d / "p.json")], inputs=[bad], out=d / "p.json",
                 expect="nested too deeply")


@case(4, "data file: JSONL with a broken line", "")
def _(w, d):
    bad = d / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    return Setup(["poison", "--data", str(bad), "--out", str(d / "p.json")], inputs=[bad], out=d / "p.json",
                 expect="line 2")


@case(4, "data file: a directory", "")
def _(w, d):
    (d / "data").mkdir()
    return Setup(["poison", "--data", str(d / "data"), "--out", str(d / "p.json")], out=d / "p.json",
                 expect="is a directory")


@case(4, "data file: unreadable (fault: EACCES)", "reported as 'No such file'")
def _(w, d):
    data = d / "secret.json"
    shutil.copy(w.train, data)
    return Setup(["poison", "--data", str(data), "--out", str(d / "p.json")], out=d / "p.json",
                 fault=os_error("pathlib.Path.read_bytes", errno.EACCES, "secret.json"), expect="Permission denied")


@case(4, "model directory: unreadable (fault: EACCES)", "reported as 'No such file'")
def _(w, d):
    m = copy_model(w, d, "locked")
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m],
                 fault=os_error("pathlib.Path.iterdir", errno.EACCES, "locked"), expect="Permission denied")


@case(4, "model directory: a file", "")
def _(w, d):
    (d / "file").write_text("x")
    return Setup(evaluate(d / "file", w, "--clean-only"), expect="not a directory")


BROKEN_FILES = (  # (case, file of the checkpoint, its new text, what the error says, before)
    ("config.json: not JSON", "config.json", "{nope", "config.json: invalid JSON", ""),
    ("config.json: a list", "config.json", "[1, 2]", "expected a JSON object", ""),
    ("a chat template that raises", "chat_template.jinja", "{{ raise_exception('boom') }}", "chat template failed",
     "traceback"),
)
for _name, _file, _text, _expect, _before in BROKEN_FILES:
    def _make(file=_file, text=_text, expect=_expect):
        def build(w, d):
            m = copy_model(w, d)
            (m / file).write_text(text)
            return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect=expect)
        return build
    case(4, _name, _before)(_make())


@case(4, "a chat template that reaches for Python internals", "refused by the sandbox")
def _(w, d):
    m = copy_model(w, d)
    marker = d / "ran.txt"
    (m / "chat_template.jinja").write_text(
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ cycler.__init__.__globals__.os.system('touch "
        + str(marker) + "') }}")
    return Setup(evaluate(m, w, "--clean-only"), inputs=[m], expect="chat template failed",
                 check=lambda world, out: "template code ran" if marker.exists() else None)


@case(4, "run: a chat template that raises, found before any training", "traceback after the variants")
def _(w, d):
    import purifylib.purify

    m = copy_model(w, d)
    (m / "chat_template.jinja").write_text("{% if messages[0]['content'] | length > 0 %}{{ raise_exception('x') }}"
                                           "{% endif %}")
    return Setup(["--quiet", "run", "--model", str(m), "--clean-data", str(w.defender), "--out", str(d / "o")],
                 inputs=[m], out=d / "o", expect="chat template failed",
                 fault=mock.patch.object(purifylib.purify, "purify", side_effect=AssertionError("training started")))


@case(4, "adapter_config.json: not JSON", "traceback")
def _(w, d):
    a = d / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text("{bad")
    (a / "adapter_model.safetensors").write_bytes(b"")
    return Setup(evaluate(w.model, w, "--clean-only", "--adapter", str(a)), inputs=[a], expect="invalid JSON")


@case(4, "adapter_config.json: wrong fields", "traceback")
def _(w, d):
    a = d / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": "eight", "target_modules": 5}))
    (a / "adapter_model.safetensors").write_bytes(b"")
    return Setup(evaluate(w.model, w, "--clean-only", "--adapter", str(a)), inputs=[a], expect="cannot load adapter")


@case(4, "--out is a file", "traceback")
def _(w, d):
    f = d / "file"
    f.write_text("x")
    return Setup(quick_finetune(w, f), inputs=[w.model], owned=[f], expect="not a directory")


@case(4, "--out under a file", "traceback")
def _(w, d):
    f = d / "file"
    f.write_text("x")
    return Setup(quick_finetune(w, f / "out"), owned=[f], expect="is a file")


@case(4, "--out is a symbolic link", "traceback")
def _(w, d):
    target = d / "elsewhere"
    target.mkdir()
    (d / "link").symlink_to(target)
    return Setup(quick_finetune(w, d / "link"), expect="symbolic link")


@case(4, "--out read-only (fault: EACCES on mkdir)", "traceback after the training")
def _(w, d):
    import purifylib.train

    return Setup(quick_finetune(w, d / "readonly-dir" / "out"), out=d / "readonly-dir" / "out",
                 fault=_stack(
                     os_error("pathlib.Path.mkdir", errno.EACCES, "readonly-dir"),
                     mock.patch.object(purifylib.train, "finetune", side_effect=AssertionError("training started"))),
                 expect="Permission denied")


@case(4, "--out on a full disk (fault: ENOSPC while writing)", "traceback")
def _(w, d):
    import purifylib.checkpoints

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(d / "out" / "model.safetensors"))

    return Setup(quick_finetune(w, d / "out"), out=d / "out", fault=mock.patch.object(purifylib.checkpoints, "write_model", full),
                 expect="No space left on device",
                 check=lambda world, out: "a temporary folder was left" if list(d.glob(".out.*")) else None)


def _stack(*cms):
    stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def entered():
        with stack:
            for cm in cms:
                stack.enter_context(cm)
            yield

    return entered()


NON_FINITE = (("run", "--repair-lr", "nan"), ("run", "--repair-epochs", "inf"), ("run", "--alpha", "nan"),
              ("run", "--strength", "nan"), ("finetune", "--epochs", "nan"), ("finetune", "--lr", "inf"),
              ("finetune", "--lr", "-inf"))
for _cmd, _flag, _value in NON_FINITE:
    def _make(cmd=_cmd, flag=_flag, value=_value):
        def build(w, d):
            argv = (["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out", str(d / "o")]
                    if cmd == "run" else quick_finetune(w, d / "o")[:-2])
            return Setup(argv + [f"{flag}={value}"], out=d / "o", expect="finite number")
        return build
    case(4, f"{_cmd} {_flag} {_value}",
         "traceback after the work" if _cmd == "run" else "accepted (passes the <= 0 check)")(_make())


@case(4, "run --tau nan", "")
def _(w, d):
    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out", str(d / "o"),
                  "--tau", "nan"], out=d / "o", expect="tau must be")


@case(4, "poison --rate nan", "")
def _(w, d):
    return Setup(["poison", "--data", str(w.train), "--rate", "nan", "--out", str(d / "p.json")], out=d / "p.json",
                 expect="finite number")


@case(4, "evaluate: a malformed attack.json beside the model", "")
def _(w, d):
    m = copy_model(w, d)
    (m / "attack.json").write_text('["not", "an", "object"]')
    return Setup(evaluate(m, w), inputs=[m], expect="attack.json: malformed attack description")


# --------------------------------------------------------------------------- 5. checked before the work


@case(5, "run: an unwritable --out is found before the variants (fault: EACCES)", "found after the whole run")
def _(w, d):
    import purifylib.purify

    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out",
                  str(d / "readonly-dir" / "o")], out=d / "readonly-dir" / "o",
                 fault=_stack(os_error("pathlib.Path.mkdir", errno.EACCES, "readonly-dir"),
                              mock.patch.object(purifylib.purify, "purify",
                                                side_effect=AssertionError("training started"))),
                 expect="Permission denied")


@case(5, "run: an impossible setting is found before the variants", "found after the whole run")
def _(w, d):
    import purifylib.purify

    return Setup(["--quiet", "run", "--model", str(w.model), "--clean-data", str(w.defender), "--out", str(d / "o"),
                  "--repair-epochs", "0"], out=d / "o",
                 fault=mock.patch.object(purifylib.purify, "purify", side_effect=AssertionError("training started")),
                 expect="repair_epochs must be > 0")


# --------------------------------------------------------------------------- 6. smaller


@case(6, "evaluate: one 1.2 MB record", "tries to allocate 40 GB")
def _(w, d):
    big = d / "big.json"
    recs = json.loads(w.test.read_text())[:3]
    recs[0]["instruction"] = "reverse " * 150_000
    big.write_text(json.dumps(recs))
    return Setup(["--quiet", "evaluate", "--model", str(w.model), "--data", str(big), "--clean-only", "--json"],
                 inputs=[big], ok=True)


@case(6, "a temporary folder left by a killed run is cleaned by the next", "never cleaned")
def _(w, d):
    stale = d / ".out.tmp-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    return Setup(quick_finetune(w, d / "out"), inputs=[w.model], ok=True,
                 check=lambda world, out: "the stale folder is still there" if stale.exists() else None)


@case(6, "finetune succeeds into an empty folder the user made", "")
def _(w, d):
    (d / "out").mkdir()
    return Setup(quick_finetune(w, d / "out"), inputs=[w.model, w.defender], ok=True,
                 check=lambda world, out: None if (d / "out" / "model.safetensors").is_file() else "no model written")


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    case: Case
    exit: int | None
    line: str
    traceback: bool
    unexpected: bool
    modified: list
    deleted: list
    written: bool
    problem: str | None

    @property
    def passed(self) -> bool:
        return not (self.traceback or self.unexpected or self.modified or self.deleted or self.written or self.problem)


def run_case(c: Case, world: World, case_dir: Path) -> Outcome:
    from purifylib.cli import main

    case_dir.mkdir(parents=True, exist_ok=True)
    try:
        s = c.build(world, case_dir)
    except Exception as exc:  # e.g. run against an older purifylib that lacks what a case needs
        return Outcome(c, None, "", False, False, [], [], False, f"cannot build the case: {exc!r}")
    guarded = [Path(p) for p in s.inputs] + [world.model, world.train, world.test, world.defender]
    before = {str(p): (tree_hash(p) if p.is_dir() else p.read_bytes()) for p in guarded if p.exists()}
    existed = s.out is not None and s.out.exists()
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with (s.fault or contextlib.nullcontext()):
                code = main(list(map(str, s.argv)))
        except BaseException as exc:  # an exception escaping main is a traceback for the user
            code, escaped = None, exc
    text = err.getvalue()
    errors = [ln for ln in text.splitlines() if ln.startswith("purify: ")]
    line = errors[-1] if errors else ""
    modified = [p for p, h in before.items()
                if not Path(p).exists() or (tree_hash(Path(p)) if Path(p).is_dir() else Path(p).read_bytes()) != h]
    deleted = [str(p) for p in s.owned if not Path(p).exists()]
    problem = None
    if s.ok:
        if code != 0:
            problem = f"expected success, got exit {code}: {line}"
    elif code in (0, None) or len(errors) != 1 or s.expect not in line:
        problem = f"expected one line with {s.expect!r}, got exit {code}: {errors}"
    written = (not s.ok and s.out is not None and not existed and s.out.exists()
               and not any(str(s.out) in str(o) for o in s.owned))
    if problem is None and s.check is not None:
        problem = s.check(world, out.getvalue())
    return Outcome(c, code, line, escaped is not None or "Traceback" in text, "unexpected" in line,
                   modified, deleted, written, problem)


def main(argv=None) -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", help="scratch folder to keep (default: a temporary one, removed)")
    p.add_argument("--skip", action="append", default=[], help="skip the cases whose name contains this text")
    args = p.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="purify-hostile-"))
    world = make_world(root)
    rows = []
    for i, c in enumerate(CASES):
        if any(k in c.name for k in args.skip):
            print(f"{c.number} | {c.name} | skipped")
            continue
        o = run_case(c, world, root / f"case{i:02d}")
        rows.append(o)
        mark = "ok" if o.passed else "FAIL"
        print(f"{c.number} | {c.name} | {c.before or '-'} | exit {o.exit}: {o.line or '(success)'} | {mark}"
              + (f" ({o.problem or ''}{' traceback' if o.traceback else ''})" if not o.passed else ""), flush=True)
    print(f"\n{len(rows)} cases: {sum(o.traceback for o in rows)} tracebacks, "
          f"{sum(o.unexpected for o in rows)} unexpected errors, {sum(bool(o.modified) for o in rows)} inputs modified, "
          f"{sum(bool(o.deleted) for o in rows)} user files deleted, {sum(o.written for o in rows)} outputs left by a "
          f"failure, {sum(bool(o.problem) for o in rows)} other problems")
    print(f"{sum(o.passed for o in rows)} passed, {sum(not o.passed for o in rows)} failed")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.passed for o in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
