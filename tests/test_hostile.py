"""Every case of the hostile-input catalogue (tests/hostile_catalogue.py): one line and a non-zero exit for
each bad input, no traceback, no input modified, no user file deleted, nothing left by a failure."""

import pytest

from hostile_catalogue import CASES, make_world, run_case


@pytest.fixture(scope="module")
def world(tmp_path_factory, micro_bed):
    return make_world(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.number}-{c.name}" for c in CASES])
def test_hostile_case(case, world, tmp_path):
    o = run_case(case, world, tmp_path / "case")
    assert not o.traceback, f"traceback (exit {o.exit}): {o.line}"
    assert not o.unexpected, o.line
    assert not o.modified, f"inputs modified: {o.modified}"
    assert not o.deleted, f"user files deleted: {o.deleted}"
    assert not o.written, "a failing command left its output behind"
    assert o.problem is None, o.problem


@pytest.mark.slow
def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(world, tmp_path):
    """A real SIGKILL in the middle of a fine-tune, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "purifylib.cli", "--quiet", "finetune", "--model", str(world.model), "--data",
           str(world.defender), "--out", str(out)]
    proc = subprocess.Popen(cmd + ["--epochs", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert list(tmp_path.glob(".out.tmp-*")), "the run never made its temporary folder"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists() and list(tmp_path.glob(".out.tmp-*"))
    done = subprocess.run(cmd + ["--epochs", "0.05"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".out.*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a renamed tensor (same count, wrong name)", "all-NaN weights",
                                  "a chat template that raises", "data file: JSON nested 200,000 deep"])
def test_a_real_terminal_sees_one_line(name, world, tmp_path):
    """In a process of its own (no captured streams), stderr holds the one error line and nothing else."""
    import subprocess
    import sys

    case = next(c for c in CASES if c.name == name)
    setup = case.build(world, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "purifylib.cli", *map(str, setup.argv)], capture_output=True,
                          text=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and setup.expect in lines[0], proc.stderr
