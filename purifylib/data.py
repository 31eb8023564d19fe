"""Alpaca-format instruction records: load, validate, save, and turn into chat prompts.

A record is a dict with string fields ``instruction``, ``input`` (may be empty) and ``output``.
Files are a JSON list of records (``.json``) or one record per line (``.jsonl``). Validation
errors name the file, the record index and the field, in one line.

Prompt convention, used everywhere: the user message is the instruction, followed by a newline
and the input when the input is not empty; the tokenizer's chat template formats it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from purifylib.errors import PurifyError

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


def load_records(path: str | os.PathLike, need_output: bool = True) -> list[Record]:
    """Load and validate records from a ``.json`` list or a ``.jsonl`` file (see :func:`validate_record`)."""
    path = Path(path)
    if not path.is_file():
        raise PurifyError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        raw = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PurifyError(f"{path}: line {lineno}: invalid JSON ({exc.msg})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PurifyError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
        if not isinstance(raw, list):
            raise PurifyError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if not raw:
        raise PurifyError(f"{path}: no records")
    return [validate_record(rec, f"{path}: record {i}", need_output) for i, rec in enumerate(raw)]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
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
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(rec)}], tokenize=False, add_generation_prompt=True
    )
