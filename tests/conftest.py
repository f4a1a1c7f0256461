"""Shared pytest setup: several fake CPU devices, so data-parallel code is exercised."""
import contextlib
import fcntl
import json
import os
import subprocess
import sys

import jax
import pytest

# Must happen before any JAX computation; four devices let tests compare 1- and 4-way steps.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiling B0 dominates test time; identical programs (across tests and the CLI
# subprocesses, which use CIRCLEMIX_CACHE/xla) are compiled once.
CACHE = os.path.join(REPO, ".pytest_cache", "circlemix")
jax.config.update("jax_compilation_cache_dir", os.path.join(CACHE, "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as cli.configure_compilation_cache

SHARED_DATA = os.environ.get(
    "CIRCLEMIX_SHARED_DATA",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glomeruli-bueno"),
)


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> str:
    """A small built-in-style set (150 images, 23 subjects), generated once per session."""
    from circlemix_jax.data import synthetic

    return synthetic.generate(str(tmp_path_factory.mktemp("synth") / "set"), 150, seed=0)


@pytest.fixture(scope="session")
def shared_manifest() -> str:
    """The public glomeruli manifest from ../shared, or skip when it is absent."""
    path = os.path.join(SHARED_DATA, "manifest.csv")
    if not os.path.exists(path):
        pytest.skip(f"shared data not found at {SHARED_DATA} (set CIRCLEMIX_SHARED_DATA)")
    return path


def run_cli(*args: str, cwd: str = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m <args>` as a user would, capturing output."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("CIRCLEMIX_CACHE", CACHE)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


SMOKE = ("circlemix_jax.main", "--config=configs/c5.py:smoke")


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name: str):
    """A folder every test process of this session shares, held under an exclusive lock.

    Under pytest-xdist each worker has its own session, so a session fixture
    would run once per worker; the first worker to take the lock fills the
    folder and the others find it filled.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' temp dirs share this parent
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """One finished `configs/c5.py:smoke` run, trained once per test session (all workers).

    test_train reads its outputs and test_reliability compares interrupted runs
    against it, so the suite trains the uninterrupted reference only once.
    Returns (workdir, the completed process).
    """
    with shared_dir(tmp_path_factory, "smoke") as folder:
        workdir, log = folder / "run", folder / "result.json"
        if not log.exists():
            result = run_cli(*SMOKE, f"--workdir={workdir}")
            assert result.returncode == 0, result.stderr[-3000:]
            log.write_text(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))
        out = json.loads(log.read_text())
    return str(workdir), subprocess.CompletedProcess(SMOKE, 0, out["stdout"], out["stderr"])


SCRATCH = ("circlemix_jax.main", "--config=configs/binary.py:scratch,smoke")


@pytest.fixture(scope="session")
def scratch_run(tmp_path_factory, synthetic_manifest) -> tuple[str, str]:
    """One finished `configs/binary.py:scratch,smoke` run on the synthetic manifest, trained once per session.

    The recipe's run (EMA, logit-adjusted loss, every augmentation): test_recipe
    resumes a killed copy of it and test_hostile_inputs damages and re-runs
    private copies. Nobody may change it. Returns (workdir, the manifest it was
    trained on), the manifest being the one of the worker that trained it.
    """
    with shared_dir(tmp_path_factory, "scratch") as folder:
        record = folder / "run.json"
        if not record.exists():
            folder.mkdir(exist_ok=True)
            workdir = str(folder / "run")
            result = run_cli(*SCRATCH, f"--workdir={workdir}", f"--config.data.manifest={synthetic_manifest}",
                             timeout=1200)
            assert result.returncode == 0, result.stderr[-3000:]
            record.write_text(json.dumps({"workdir": workdir, "manifest": synthetic_manifest}))
        out = json.loads(record.read_text())
    return out["workdir"], out["manifest"]
