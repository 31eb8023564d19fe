"""The one way to a bed: the synthetic testbed or a real checkpoint, by the same call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from purifylib.errors import PurifyError


def bed_config(size: str = "tiny", model: str | None = None, seed: int = 0, overrides=()):
    """A bed's config: the testbed of ``size``, or a real checkpoint ``model`` (overrides are then
    :class:`~purifylib.realbed.RealBedConfig` fields; a relative path is tried from the repository)."""
    from purifylib.testbed import TestbedConfig

    overrides = tuple(sorted(dict(overrides).items()))
    if model is None:
        return TestbedConfig(size=size, seed=seed, overrides=overrides)
    from purifylib.realbed import RealBedConfig

    known = {f.name for f in dataclasses.fields(RealBedConfig)} - {"model", "seed"}
    bad = sorted(set(dict(overrides)) - known)
    if bad:
        raise PurifyError(f"unknown real-bed override(s) {', '.join(bad)} (choose from {', '.join(sorted(known))})")
    path = Path(model)
    if not path.is_absolute() and not path.exists():  # a preset's path is relative to the repository
        from purifylib.reports import REPO_ROOT

        path = REPO_ROOT / path
    return RealBedConfig(model=str(path), seed=seed, **dict(overrides))


def open_bed(size: str = "tiny", model: str | None = None, seed: int = 0, overrides=(), *,
             cache_dir: str | Path | None = None, progress: bool = True):
    """The one way to a bed, testbed or real checkpoint alike (built, or read from its cache): it
    carries its splits (``split``), how answers are checked (``match``) and its perplexity records
    (``ppl_records``), so callers never branch on which kind it is."""
    config = bed_config(size, model, seed, overrides)
    if model is None:
        from purifylib.testbed import build_testbed

        return build_testbed(config, cache_dir=cache_dir, progress=progress)
    from purifylib.realbed import build_realbed

    return build_realbed(config, cache_dir=cache_dir, progress=progress)
