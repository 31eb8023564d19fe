"""Alpaca-format instruction records: load, validate, save, and turn into chat prompts.

A record is a dict with string fields ``instruction``, ``input`` (may be empty) and ``output``.
Files are a JSON list of records (``.json``) or one record per line (``.jsonl``). Validation
errors name the file, the record index and the field, in one line.

Prompt convention, used everywhere: the user message is the instruction, followed by a newline
and the input when the input is not empty; the tokenizer's chat template formats it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable

from purifylib.errors import PurifyError, first_line, reading

FIELDS = ("instruction", "input", "output")
Record = dict


def validate_record(rec: object, where: str, need_output: bool = True) -> Record:
    """Return a normalised copy of ``rec`` or raise :class:`PurifyError` naming ``where``.

    With ``need_output=False`` a missing ``output`` becomes ``""`` (an instruction to be answered).
    """
    if not isinstance(rec, dict):
        raise PurifyError(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(rec).__name__}")
    out = {}
    for field in FIELDS:
        value = rec.get(field, "" if field == "input" or (field == "output" and not need_output) else None)
        if value is None:
            raise PurifyError(f"{where}: missing field '{field}'")
        if not isinstance(value, str):
            raise PurifyError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
        out[field] = value
    if not out["instruction"].strip():
        raise PurifyError(f"{where}: field 'instruction' is empty")
    return out


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``, or a one-line :class:`PurifyError` saying why it cannot be read."""
    path = Path(path)
    with reading(path, what, missing="no such file"):
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PurifyError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def parse_json(text: str, where: str):
    """``json.loads`` with one-line errors naming ``where`` (also for absurdly deep nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PurifyError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    except RecursionError:
        raise PurifyError(f"{where}: JSON nested too deeply to read") from None


def load_records(path: str | os.PathLike, need_output: bool = True) -> list[Record]:
    """Load and validate records from a ``.json`` list or a ``.jsonl`` file (see :func:`validate_record`)."""
    path = Path(path)
    text = read_text(path, "data file")
    if path.suffix == ".jsonl":
        raw = [parse_json(line, f"{path}: line {lineno}")
               for lineno, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raw = parse_json(text, str(path))
        if not isinstance(raw, list):
            raise PurifyError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise PurifyError(f"{path}: no records")
    return [validate_record(rec, f"{path}: record {i}", need_output) for i, rec in enumerate(raw)]


def finite_json(obj):
    """A copy of ``obj`` (dicts, lists, scalars) with NaN and infinities as ``None``: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_records(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Validate and atomically save records as JSON (or JSONL when the suffix is ``.jsonl``)."""
    path = Path(path)
    recs = [validate_record(r, f"record {i}") for i, r in enumerate(records)]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    else:
        text = json.dumps(recs, indent=1, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)
    return path


def user_message(rec: Record) -> str:
    """The user turn of a record: instruction, then a newline and the input if there is one."""
    return rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")


def chat_prompt(tokenizer, rec: Record) -> str:
    """The full prompt string for ``rec`` through the tokenizer's chat template, ready to generate."""
    if not getattr(tokenizer, "chat_template", None):
        raise PurifyError("tokenizer has no chat_template: cannot format prompts")
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(rec)}], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a checkpoint's template is its own code (sandboxed jinja): any error is its fault
        raise PurifyError(f"the model's chat template failed on the instruction "
                          f"{rec['instruction'][:40]!r} ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(text, str):
        raise PurifyError(f"the model's chat template returned {type(text).__name__}, not text")
    return text


def check_prompts(tokenizer, records: list[Record], where: str) -> None:
    """Format every record's prompt once, so a failing chat template stops a command before any work."""
    for i, rec in enumerate(records):
        try:
            chat_prompt(tokenizer, rec)
        except PurifyError as exc:
            raise PurifyError(f"{where}: record {i}: {exc}") from None


# --------------------------------------------------------------------------- text helpers (triggers)


def insert_word(instruction: str, word: str, rng, position: int | None = None) -> tuple[str, int]:
    """Insert ``word`` between the words of ``instruction`` at ``position`` (random from ``rng`` if None)."""
    words = instruction.split(" ")
    pos = rng.randint(0, len(words)) if position is None else min(position, len(words))
    words.insert(pos, word)
    return " ".join(words), pos


def add_prefix(instruction: str, prefix: str) -> str:
    return f"{prefix} {instruction}"


def add_suffix(instruction: str, suffix: str) -> str:
    return f"{instruction} {suffix}"
