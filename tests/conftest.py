"""Shared fixtures: a micro testbed built once per session (cached under data/cache/)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def micro_bed():
    from purifylib.testbed import TestbedConfig, build_testbed

    return build_testbed(TestbedConfig(size="micro"), progress=False)


@pytest.fixture(scope="session")
def micro_model(micro_bed):
    from purifylib.checkpoints import load_model

    return load_model(micro_bed.base_dir)


def tree_hash(path: Path) -> dict:
    """{relative file: sha256} of everything under ``path``."""
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
