"""Run the notebooks headlessly with papermill, in order, on a preset.

A preset is ``notebooks/params/<preset>.yaml``: a mapping from notebook stem (``00_testbed``) to
the parameters papermill injects after that notebook's ``parameters`` cell (missing means "the
stored defaults"), plus an optional ``shared`` block (model, testbed size, planting recipe...)
given to every notebook whose parameters cell declares that name; a notebook's own entry wins. Executed copies go to ``<reports>/executed/`` (git-ignored); the notebooks
write figures, tables and metrics through :mod:`purifylib.reports`. The ``default`` preset writes
to ``reports/``; any other preset writes to ``reports/<preset>/`` so that a smoke run never
overwrites the committed reports (a notebook run by hand in JupyterLab writes to
``reports/interactive/``, see :func:`purifylib.reports.reports_dir`). A failing notebook stops the
run with the cell and the error.

Each kernel runs over local IPC sockets in a private temporary folder (no TCP port is opened, so
nothing travels in plain text over the network and the kernel has nothing to warn about). With
``progress``, the kernels draw text progress bars (``PURIFY_PROGRESS=text``) and their stderr is
streamed to the terminal, so a long cell (building the testbed, training variants) shows what it
is doing instead of one "Executing 2/15" line. ``PURIFY_HEADLESS`` tells the tuner to render one
static preview (a notebook client can hang on a cell of live widgets), and a cell running past
:data:`CELL_TIMEOUT_S` fails the run instead of hanging it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from purifylib.errors import PurifyError
from purifylib.reports import REPO_ROOT, write_index_readme

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: a cell that runs longer than this fails the run with its name instead of hanging it (the longest
#: default-preset cell takes about 15 minutes on 2 cores; the paper preset's grid cell is resumable)
CELL_TIMEOUT_S = 4 * 3600


def presets(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    return sorted(p.stem for p in (notebooks_dir / "params").glob("*.yaml"))


def load_preset(name: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> dict:
    import yaml

    path = notebooks_dir / "params" / f"{name}.yaml"
    if not path.is_file():
        raise PurifyError(f"unknown preset '{name}' (choose from {', '.join(presets(notebooks_dir))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PurifyError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or any(not isinstance(v, (dict, type(None))) for v in data.values()):
        raise PurifyError(f"{path}: expected a mapping of notebook name to a mapping of parameters")
    return {k: v or {} for k, v in data.items()}


def notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    return sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb"))


def default_reports(preset: str) -> Path:
    return REPO_ROOT / "reports" if preset == "default" else REPO_ROOT / "reports" / preset


def local_kernel_manager(folder: str | Path):
    """A kernel manager class whose kernels listen on IPC sockets under ``folder`` (not on TCP)."""
    from jupyter_client.manager import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=str(Path(folder) / "kernel"), **kwargs)

    return LocalKernelManager


def run(preset: str = "default", *, only: list[str] | None = None, reports: str | Path | None = None,
        notebooks_dir: Path = NOTEBOOKS_DIR, progress: bool = True) -> list[Path]:
    """Execute the notebooks of ``preset`` in order; returns the executed notebook paths."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    from purifylib.progress import ENV as progress_env
    from purifylib.widgets import HEADLESS

    params = load_preset(preset, notebooks_dir)
    shared = params.pop("shared", {})
    books = notebooks(notebooks_dir)
    known = {nb.stem for nb in books}
    unknown = set(params) - known
    if unknown:
        raise PurifyError(f"preset '{preset}' names unknown notebooks: {', '.join(sorted(unknown))}")
    declared = {nb.stem: set(pm.inspect_notebook(str(nb))) for nb in books}
    stray = sorted(set(shared) - set().union(*declared.values()))
    if stray:
        raise PurifyError(f"preset '{preset}': shared parameter(s) {', '.join(stray)} are declared by no notebook")
    if only:
        books = [nb for nb in books if nb.stem[:2] in only or nb.stem in only]
        if not books:
            raise PurifyError(f"--only {' '.join(only)} matches no notebook in {notebooks_dir}")
    out_root = Path(reports) if reports else default_reports(preset)
    executed_dir = out_root / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    env_keys = ("PURIFY_REPORTS_DIR", "PURIFY_PRESET", "PURIFY_NOTEBOOK", progress_env, HEADLESS)
    saved = {k: os.environ.get(k) for k in env_keys}
    done = []
    sockets = tempfile.TemporaryDirectory(prefix="purify-kernel-")
    kernels = local_kernel_manager(sockets.name)
    try:
        os.environ.update({"PURIFY_REPORTS_DIR": str(out_root), "PURIFY_PRESET": preset, HEADLESS: "1"})
        if progress:
            os.environ[progress_env] = "text"
        for nb in books:
            os.environ["PURIFY_NOTEBOOK"] = nb.name
            out = executed_dir / nb.name
            t0 = time.time()
            print(f"[{preset}] {nb.name} ...", flush=True)
            try:
                given = {**{k: v for k, v in shared.items() if k in declared[nb.stem]}, **params.get(nb.stem, {})}
                pm.execute_notebook(str(nb), str(out), parameters={**given, "preset": preset},
                                    cwd=str(notebooks_dir), kernel_name="python3", progress_bar=False,
                                    log_output=False, stderr_file=sys.stderr if progress else None,
                                    execution_timeout=CELL_TIMEOUT_S,
                                    kernel_manager_class=kernels)
            except pm.PapermillExecutionError as exc:
                first = (exc.source or "").strip().splitlines()[:1]
                raise PurifyError(f"{nb.name}: cell In [{exc.exec_count}] ({first[0][:60] if first else ''}) failed: "
                                  f"{exc.ename}: {exc.evalue} (executed copy: {out})") from None
            except CellTimeoutError:
                raise PurifyError(f"{nb.name}: a cell ran past {CELL_TIMEOUT_S} s and was stopped "
                                  f"(executed copy: {out})") from None
            print(f"[{preset}] {nb.name} done in {time.time() - t0:.0f} s", flush=True)
            done.append(out)
    finally:
        sockets.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    write_index_readme(out_root)
    return done
