"""Where commands may write (purifylib.outputs): refusals, staging, commit, stale folders."""

import os

import pytest

from purifylib import PurifyError
from purifylib.outputs import atomic_dir, check_output, clean_stale, staged_dir


def test_check_output_refusals(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w.txt").write_text("x")
    (tmp_path / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    cases = [
        (dict(out=tmp_path / "in" / "o", inputs=[tmp_path / "in"]), "inside the input"),
        (dict(out=tmp_path, inputs=[tmp_path / "in"]), "holds the input"),
        (dict(out=tmp_path / "in", inputs=[tmp_path / "in"]), "is the input"),
        (dict(out=tmp_path / "in"), "not empty"),
        (dict(out=tmp_path / "f"), "not a directory"),
        (dict(out=tmp_path / "f", kind="file"), "refusing to overwrite"),
        (dict(out=tmp_path / "in", kind="file"), "is a directory"),
        (dict(out=tmp_path / "f" / "o"), "is a file"),
        (dict(out=tmp_path / "link"), "symbolic link"),
    ]
    for kw, needle in cases:
        with pytest.raises(PurifyError, match=needle):
            check_output(**kw)
    assert check_output(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert check_output(tmp_path / "in", existing_ok=True)
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_staged_dir_commits_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with staged_dir(out) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path  # made before the body runs
        (tmp / "done").write_text("x")
    assert os.listdir(out) == ["done"] and os.listdir(tmp_path) == ["out"]


def test_a_non_empty_output_is_never_replaced_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("x")
    with pytest.raises(PurifyError, match="kept in"):
        atomic_dir(out, lambda tmp: (tmp / "new").write_text("y"))
    assert os.listdir(out) == ["mine"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.result-")]
    assert len(kept) == 1 and os.listdir(kept[0]) == ["new"]
    atomic_dir(out, lambda tmp: (tmp / "new").write_text("y"), replace=True)  # caches replace their own entries
    assert os.listdir(out) == ["new"]


def test_only_dead_writers_folders_are_stale(tmp_path):
    out = tmp_path / "out"
    dead, live = tmp_path / ".out.tmp-999999999", tmp_path / f".out.tmp-{os.getppid()}"
    other = tmp_path / ".other.tmp-999999999"
    for p in (dead, live, other):
        p.mkdir()
    assert clean_stale(out) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
