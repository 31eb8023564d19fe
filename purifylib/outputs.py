"""Where a command may write, and how: nothing the user owns is ever deleted or overwritten.

- :func:`check_output` refuses, before any work starts, an output path that is a symbolic link,
  an existing file or non-empty directory, an input (or inside one, or holding one), or whose
  parent cannot be written.
- :func:`staged_dir` writes an output directory through a temporary sibling folder that is made
  *before* the work (so an unwritable place fails in seconds, not after hours of training) and
  renamed into place at the end. If something appeared at the output path meanwhile, it is left
  alone and the finished result is kept beside it under a name the error gives.
- Temporary folders left by a killed run (``.NAME.tmp-PID`` whose process is gone) are removed
  when the next run writes the same output.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from purifylib.errors import PurifyError


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(out, *, inputs=(), kind: str = "dir", existing_ok: bool = False) -> Path:
    """Raise :class:`PurifyError` if writing ``out`` (a ``"dir"`` or a ``"file"``) could harm the user's files.

    ``inputs`` are the paths the command reads (files or directories; ``None`` entries are skipped).
    ``existing_ok`` accepts an existing non-empty directory (a command that resumes or reuses it).
    """
    out = Path(out)
    if out.is_symlink():
        raise PurifyError(f"{out}: output path is a symbolic link; give the real path")
    real = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        if real == src:
            raise PurifyError(f"{out}: output path is the input {inp}; choose another output")
        if _inside(real, src):
            raise PurifyError(f"{out}: output path is inside the input directory {inp}; choose another output")
        if _inside(src, real):
            raise PurifyError(f"{out}: output path holds the input {inp}; choose another output")
    if out.exists():
        if kind == "file":
            what = "a directory" if out.is_dir() else "an existing file"
            raise PurifyError(f"{out}: output file is {what}; refusing to overwrite it (choose a new path)")
        if not out.is_dir():
            raise PurifyError(f"{out}: output path exists and is not a directory")
        if not existing_ok and any(out.iterdir()):
            raise PurifyError(f"{out}: output directory exists and is not empty (choose a new path)")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PurifyError(f"{out}: cannot create it: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PurifyError(f"{out}: cannot write into {parent} (permission denied)")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove ``out``'s temporary siblings whose writing process no longer runs; return them."""
    gone = []
    if not out.parent.is_dir():
        return gone
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def _mkdir(path: Path, out: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise PurifyError(f"{out}: cannot write there ({exc.strerror or exc})") from None


def _commit(tmp: Path, out: Path, replace: bool) -> None:
    if out.is_symlink():
        raise PurifyError(f"{out}: output path became a symbolic link")
    if replace and out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
        return
    try:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder the user made for the output
        os.rename(tmp, out)  # never replaces a non-empty directory
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        kept = out.with_name(f"{out.name}.result-{os.getpid()}")
        tmp.rename(kept)
        raise PurifyError(f"{out}: something was written there during the run and was left alone; the finished "
                          f"output is kept in {kept}") from None


@contextmanager
def staged_dir(out, *, replace: bool = False):
    """Yield a fresh temporary folder beside ``out``; on success rename it to ``out``.

    The folder exists before the body runs, so an unwritable place fails first. On any error the
    temporary folder is removed and ``out`` is untouched. ``replace=True`` (caches only) swaps an
    existing ``out`` for the new one; otherwise a non-empty ``out`` is never replaced.
    """
    out = Path(out)
    clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    _mkdir(tmp, out)
    try:
        yield tmp
        _commit(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_dir(out, write, *, replace: bool = False) -> Path:
    """Call ``write(tmp_dir)`` on an existing empty temporary folder, then move it to ``out``.

    Nothing half-written; see :func:`staged_dir` for ``replace``.
    """
    with staged_dir(out, replace=replace) as tmp:
        write(tmp)
    return Path(out)
