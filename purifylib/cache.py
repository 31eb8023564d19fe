"""Where built things are kept, and the digests their keys are made of.

One root for every cache: ``$PURIFY_CACHE_DIR`` if set, else ``data/cache`` of the checkout, read
when a path is asked for (so a test or a notebook can point it elsewhere). Each kind of thing has
its folder under the root: ``testbed``, ``realbed``, ``zoo``, ``variants``, ``answers``, ``grid``.
Every function that caches takes ``cache_dir``: a root, laid out the same way.

Keys are digests of what a thing is built from (a checkpoint's files, records, a config), so a
changed input never reuses a stale build.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

REPO_CACHE = Path(__file__).resolve().parent.parent / "data" / "cache"
KINDS = ("testbed", "realbed", "zoo", "variants", "answers", "grid")
NOT_DIGESTED = ("attack.json", "README.md")  # evaluation metadata and prose: nothing a model is built from


def root(cache_dir=None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$PURIFY_CACHE_DIR``, else ``data/cache``."""
    return Path(cache_dir or os.environ.get("PURIFY_CACHE_DIR") or REPO_CACHE)


def folder(kind: str, cache_dir=None) -> Path:
    """The folder of one kind of cached thing under the root (``folder("zoo")``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r} (one of {', '.join(KINDS)})")
    return root(cache_dir) / kind


def digest(obj, n: int | None = None) -> str:
    """sha256 of an object's canonical JSON (sorted keys; ``str`` for anything else), cut to ``n``."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return h[:n] if n else h


def file_digest(paths) -> str:
    """sha256 over the bytes of the given files (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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
