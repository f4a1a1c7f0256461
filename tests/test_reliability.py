"""Runs that stop early: preemption (SIGTERM), a NaN, an unwritable, read-only or full workdir.

Every run is `configs/c5.py:smoke`, as in tests/test_train.py, so the compiled
train step comes from the persistent compilation cache (the NaN run's learning
rate is part of its program: it compiles once per cache). Runs that do not
depend on each other start together: most of a warm run is single-threaded
Python (imports, tracing), so two cores overlap them.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import CACHE, REPO, SMOKE

TIMEOUT = 600


# Run as `python -c`: records, at every save of `latest` made after a best epoch, which best
# checkpoints are committed on disk (one JSON line per save, to the file named by argv[1]).
_SAVES_PROBE = """
import json, os, sys
from circlemix_jax import checkpoint, main
log, workdir = sys.argv[1], sys.argv[3].split("=", 1)[1]
original = checkpoint.RunCheckpoints.save
def save(self, kind, step, state, progress):
    if kind == checkpoint.LATEST and progress["best_epoch"] >= 0:
        best = os.path.join(workdir, "checkpoints", "best")
        with open(log, "a") as f:
            f.write(json.dumps([step, sorted(int(d) for d in os.listdir(best) if d.isdigit())]) + "\\n")
    return original(self, kind, step, state, progress)
checkpoint.RunCheckpoints.save = save
sys.argv = ["main", *sys.argv[2:]]
main.run()
"""


def _start(workdir: str, *extra: str, saves_log: str = "") -> subprocess.Popen:
    """Starts a run; its output goes to files, so runs nobody is reading yet never block on a pipe.

    With `saves_log`, the run goes through `_SAVES_PROBE`, which appends a line there at
    each `latest` save.
    """
    logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    head = ["-c", _SAVES_PROBE, saves_log, SMOKE[1]] if saves_log else ["-m", *SMOKE]
    proc = subprocess.Popen([sys.executable, *head, f"--workdir={workdir}", *extra], cwd=REPO,
                            env=dict(os.environ, CIRCLEMIX_CACHE=CACHE), text=True, stdout=logs[0], stderr=logs[1])
    proc.logs = logs
    return proc


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (f.seek(0) or f.read() for f in proc.logs)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _steps(folder: str) -> list[int]:
    """Committed Orbax steps in a checkpoint folder (a finished save is renamed to its step)."""
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def _one_line_error(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


def _stop_when(proc: subprocess.Popen, needle: str, sig: int) -> subprocess.CompletedProcess:
    """Sends `sig` as soon as `needle` appears in the run's stdout, then waits for it to end."""
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        proc.logs[0].seek(0)
        if needle in proc.logs[0].read():
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it printed {needle!r}"
    return _finish(proc)


def _saved_step(result, name: str, code: int) -> int:
    assert result.returncode == code, (result.returncode, result.stdout[-1000:], result.stderr[-3000:])
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert f"{name}: saved a checkpoint at step" in result.stderr, result.stderr[-2000:]
    return int(result.stderr.split(f"{name}: saved a checkpoint at step")[1].split()[0])


def test_sigterm_and_sigint_save_exit_and_resume_exactly(smoke_run, tmp_path):
    """Preempted, interrupted and resumed twice, a run ends as the uninterrupted one did.

    Its runs also check the race behind a flaky SIGKILL resume: `latest` (with progress
    naming the best epoch) must only be written once the best checkpoint it refers to is
    committed, or a kill in between leaves a run that resumes, never improves again, and
    ends with no best checkpoint to test.
    """
    stopped, saves = str(tmp_path / "preempted"), str(tmp_path / "saves.jsonl")
    # Preempted mid-epoch 1 of 2 (12 steps each): the resume restarts inside an epoch.
    step = _saved_step(_stop_when(_start(stopped, saves_log=saves), "compiled the train step", signal.SIGTERM),
                       "SIGTERM", 0)
    assert 0 < step < 12, step
    assert _steps(os.path.join(stopped, "checkpoints", "latest")) == [step]
    assert not os.path.exists(os.path.join(stopped, "metrics.json"))

    # Ctrl-C in epoch 2 of the resumed run: saved too, exit 130.
    resumed = _stop_when(_start(stopped, saves_log=saves), "epoch 1/2  val", signal.SIGINT)
    assert f"resuming from step {step} " in resumed.stdout, resumed.stdout[-2000:]
    step2 = _saved_step(resumed, "SIGINT", 130)
    assert 12 <= step2 <= 24, step2

    last = _finish(_start(stopped, saves_log=saves))
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resuming from step {step2} " in last.stdout, last.stdout[-2000:]
    assert _steps(os.path.join(stopped, "checkpoints", "latest"))[-1] == 24
    # The uninterrupted run of the same config, trained once for the session.
    a, b = _metrics(smoke_run[0]), _metrics(stopped)
    assert a.pop("best_val_balanced_accuracy") == pytest.approx(b.pop("best_val_balanced_accuracy"))
    assert a == b

    with open(saves) as f:
        recorded = [json.loads(line) for line in f]
    assert any(s == 24 for s, _ in recorded), recorded  # at least the epoch-end saves after a best epoch
    for s, committed_best in recorded:
        assert committed_best and max(committed_best) <= s, (s, committed_best)


@pytest.fixture(scope="module")
def tmpfs(tmp_path_factory):
    """Mounts tiny tmpfs folders (needs root and mount rights, as in this CI container).

    Root ignores chmod, so a read-only or a full disk takes a real mount. Returns
    the mount point, or the reason it could not mount.
    """
    mounted = []

    def mount(size: str, read_only: bool = False) -> str:
        point = tmp_path_factory.mktemp("mnt")
        opts = f"size={size}" + (",ro" if read_only else "")
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True,
                               text=True)
        except OSError as e:
            return f"cannot mount a tmpfs here: {e}"
        if r.returncode:
            return f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}"
        mounted.append(point)
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory, tmpfs):
    """Starts every run that must fail at once; each test collects its own."""
    root = tmp_path_factory.mktemp("failing")
    blocker = root / "file.txt"
    blocker.write_text("not a folder")

    def on_tmpfs(size: str, read_only: bool = False) -> str:
        point = tmpfs(size, read_only)
        return os.path.join(point, "run") if os.path.isabs(point) else point  # else why it did not mount

    runs = {
        # lr 1e30: step 1 is finite but throws the weights to ~1e28, so step 2 overflows.
        "nan": (str(root / "nan"), "--config.optim.lr=1e30", "--config.checkpoint_every_steps=1"),
        "under_file": (str(blocker / "sub"),),
        "read_only": (on_tmpfs("1m", read_only=True),),
        # Room for config.json and split.json (~10 kB), not for a B0 checkpoint (~30 MB).
        "full": (on_tmpfs("256k"), "--config.checkpoint_every_steps=1"),
    }
    # A tmpfs that did not mount leaves its reason instead of a folder.
    procs = {name: (args[0], _start(*args) if os.path.isabs(args[0]) else None) for name, args in runs.items()}
    yield procs, blocker
    for _, proc in procs.values():
        if proc is not None:
            _finish(proc)


def _run(failing_runs, name: str) -> tuple[str, subprocess.CompletedProcess]:
    workdir, proc = failing_runs[0][name]
    if proc is None:
        pytest.skip(workdir)
    return workdir, _finish(proc)


def test_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(failing_runs):
    workdir, result = _run(failing_runs, "nan")
    line = _one_line_error(result, 3)
    assert "non-finite loss or gradient at step 2" in line, line
    assert _steps(os.path.join(workdir, "checkpoints", "latest")) == [1]
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))


def test_workdir_under_a_file_is_a_clear_error(failing_runs):
    workdir, result = _run(failing_runs, "under_file")
    line = _one_line_error(result, 2)
    assert "cannot write to workdir" in line and workdir in line, line
    assert failing_runs[1].read_text() == "not a folder"


def test_read_only_workdir_is_a_clear_error(failing_runs):
    line = _one_line_error(_run(failing_runs, "read_only")[1], 2)
    assert "cannot write to workdir" in line and "Read-only file system" in line, line


def test_full_disk_is_a_clear_error(failing_runs):
    result = _run(failing_runs, "full")[1]
    # Orbax's writer threads log their own tracebacks first; the run must still end in one clear line.
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not save the latest checkpoint") and "No space left on device" in last, last


def test_storage_errors_from_orbax_become_one_line():
    """Orbax's async writers report ENOSPC/EROFS inside a ValueError; other errors pass through unchanged."""
    from circlemix_jax.checkpoint import _storage_error

    orbax_enospc = ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0": Failed to write 8720384 bytes '
                              "to file 4: No space left on device [os_error_code='28']")
    err = _storage_error(orbax_enospc, "could not save the latest checkpoint at step 3")
    assert str(err) == ("could not save the latest checkpoint at step 3: No space left on device "
                        "(is the disk full or the workdir read-only?)")
    err = _storage_error(OSError(30, "Read-only file system"), "could not finish saving a checkpoint")
    assert "Read-only file system" in str(err)
    assert _storage_error(ValueError("shape mismatch"), "x") is None
