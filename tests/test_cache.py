"""One cache root for every built thing (purifylib.cache)."""

from pathlib import Path

import pytest

from purifylib import cache


def test_one_root_read_when_asked_for(monkeypatch, tmp_path):
    monkeypatch.delenv("PURIFY_CACHE_DIR", raising=False)
    assert cache.root() == cache.REPO_CACHE and cache.folder("testbed") == cache.REPO_CACHE / "testbed"
    monkeypatch.setenv("PURIFY_CACHE_DIR", str(tmp_path))
    assert [cache.folder(k) for k in cache.KINDS] == [tmp_path / k for k in cache.KINDS]
    assert cache.folder("zoo", tmp_path / "given") == tmp_path / "given" / "zoo"  # an explicit root wins
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache.folder("models")


def test_no_other_module_places_a_cache():
    """Only purifylib/cache.py spells where caches live; every other module asks it."""
    import purifylib

    offenders = [f"{f.name}:{i}" for f in Path(purifylib.__file__).parent.rglob("*.py") if f.name != "cache.py"
                 for i, line in enumerate(f.read_text().splitlines(), 1)
                 if '/ "cache"' in line or "PURIFY_CACHE_DIR" in line.split("#")[0] and "environ" in line]
    assert not offenders


def test_digests_are_canonical():
    assert cache.digest({"b": 1, "a": [1, 2]}) == cache.digest({"a": [1, 2], "b": 1})
    assert len(cache.digest({"a": 1}, 16)) == 16
    assert cache.records_digest([{"instruction": "x"}]) != cache.records_digest([{"instruction": "y"}])
