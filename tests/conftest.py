"""Shared fixtures: a micro testbed built once per session (cached under data/cache/)."""

import os
import tempfile
from pathlib import Path

import pytest

# Reports written by notebooks under test (nbval included: kernels inherit this) go to a scratch
# folder, never over the committed reports/.
_SCRATCH = Path(tempfile.mkdtemp(prefix="purify-test-reports-"))
os.environ.setdefault("PURIFY_REPORTS_DIR", str(_SCRATCH))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def micro_bed():
    from purifylib.testbed import TestbedConfig, build_testbed

    return build_testbed(TestbedConfig(size="micro"), progress=False)


@pytest.fixture(scope="session")
def micro_model(micro_bed):
    from purifylib.models import load_model

    return load_model(micro_bed.base_dir)


def tree_hash(path: Path) -> dict:
    """{relative file: sha256} of everything under ``path``."""
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
