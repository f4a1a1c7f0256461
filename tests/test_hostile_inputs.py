"""What a careless or hostile user gives the CLIs: each ends in one line naming the culprit,
the documented exit code, no traceback, and (for bad input) a workdir exactly as it was.

Every run is a smoke config on the small synthetic set, so B0's programs come from the
persistent compilation cache that the other CLI tests fill.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CACHE, REPO, SCRATCH, run_cli
from PIL import Image

from circlemix_jax import config_check, data, defaults, rundir
from circlemix_jax.errors import InputError

SMOKE = "configs/binary.py:smoke"


def _rows(manifest):
    root = os.path.dirname(manifest)
    with open(manifest) as f:
        return [dict(r, path=os.path.join(root, r["path"])) for r in csv.DictReader(f)]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "subject"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _listing(folder) -> dict:
    """Every file under `folder` with its size and mtime: 'untouched' means equal listings."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns) if name in files else "dir"
    return out


def _one_line(result, code=2, *needles) -> str:
    text = result.stdout + result.stderr
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in text, text[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for n in needles:
        assert n in last, (n, last)
    return last


def _train(*args, timeout=600):
    return run_cli("circlemix_jax.main", *args, timeout=timeout)


@pytest.fixture
def existing_workdir(tmp_path):
    w = tmp_path / "run"
    w.mkdir()
    (w / "keep.txt").write_text("precious")
    return str(w)


# --- images: every split is decoded before the workdir is touched --------------------------------

def _bad_images(tmp_path, good: str) -> dict[str, str]:
    """One file of every kind that cannot be decoded, keyed by what it is."""
    bad = {}
    (tmp_path / "zero.png").write_bytes(b"")
    bad["zero"] = str(tmp_path / "zero.png")
    (tmp_path / "text.png").write_text("this is not an image\n")
    bad["text"] = str(tmp_path / "text.png")
    (tmp_path / "dir.png").mkdir()
    bad["dir"] = str(tmp_path / "dir.png")
    os.symlink(tmp_path / "loop_b.png", tmp_path / "loop_a.png")
    os.symlink(tmp_path / "loop_a.png", tmp_path / "loop_b.png")
    bad["loop"] = str(tmp_path / "loop_a.png")
    bad["missing"] = str(tmp_path / "missing.png")
    (tmp_path / "cut.png").write_bytes(open(good, "rb").read()[:120])
    bad["cut"] = str(tmp_path / "cut.png")
    # 14,000^2 one-bit pixels: a small file past twice PIL's decompression-bomb limit.
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")
    bad["bomb"] = str(tmp_path / "bomb.png")
    return bad


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-workdir", "existing-workdir"])
def test_every_undecodable_image_is_named_and_the_workdir_untouched(tmp_path, synthetic_manifest, existing_workdir,
                                                                   fresh):
    rows = _rows(synthetic_manifest)
    bad = _bad_images(tmp_path, rows[0]["path"])
    for row, path in zip(rows, bad.values()):
        row["path"] = path
    m = _write(tmp_path / "m.csv", rows)
    workdir = str(tmp_path / "new") if fresh else existing_workdir
    before = _listing(workdir)
    last = _one_line(_train(f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.manifest={m}"), 2,
                     f"{len(bad)} image(s) could not be read", "decompression-bomb")
    for path in bad.values():
        assert path in last, (path, last)
    assert os.path.exists(workdir) is not fresh and _listing(workdir) == before


def test_a_bad_test_image_stops_the_run_before_training(tmp_path, synthetic_manifest):
    rows = _rows(synthetic_manifest)
    records = data.read_manifest(synthetic_manifest, defaults.BINARY_CLASSES,
                                 defaults.get_config("binary", "smoke").data.label_map.to_dict())
    test_subject = records.subjects[data.make_split(records, 0).test[0]]
    victim = next(r for r in rows if r["subject"] == test_subject)
    victim["path"] = str(tmp_path / "gone.png")
    workdir = tmp_path / "run"
    manifest = _write(tmp_path / "m.csv", rows)
    _one_line(_train(f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.manifest={manifest}"), 2, "gone.png")
    assert not workdir.exists()


# --- config values -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("batch_size", 0, "batch_size=0"), ("batch_size", -4, "batch_size=-4"), ("batch_size", 6, "divisible"),
    ("eval_batch_size", 0, "eval_batch_size=0"), ("optim.lr", -0.1, "optim.lr=-0.1"),
    ("optim.lr", float("nan"), "optim.lr=nan"), ("num_epochs", 0, "num_epochs=0"),
    ("mix.method", "cutmx", "mix.method"), ("data.image_size", 3, "data.image_size=3"),
    ("data.workers", 0, "data.workers=0"), ("val_fraction", 0.0, "val_fraction"), ("fold", 5, "fold=5"),
    ("split_seed", -1, "split_seed=-1"), ("augment.max_crop", 40, "augment.max_crop=40"),
    ("model.dtype", "float16", "model.dtype"), ("model.padding", "valid", "model.padding"),
    ("mix.prob", 1.5, "mix.prob"), ("optim.momentum", 1.0, "optim.momentum=1.0"),
    ("data.std", (0.2, 0.0, 0.2), "data.std"), ("log_every_steps", 0, "log_every_steps=0"),
    ("eval.decision", "prior", "double-counts"), ("data.input_norm", "macenko", "data.input_norm"),
    ("model.child_head", "random", "model.child_head"), ("model.layers", "fast", "model.layers"),
])
def test_config_values_are_checked_by_name(field, value, needle):
    config = defaults.get_config("binary", "smoke,scratch")
    with config.unlocked():
        parent, _, leaf = field.rpartition(".")
        (config[parent] if parent else config)[leaf] = value
    with pytest.raises(InputError, match="config field") as e:
        config_check.check_run_config(config, num_devices=4)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("stage", ["c5", "nc2", "c3", "c2", "binary"])
@pytest.mark.parametrize("arg", ["", "smoke", "smoke,circlemix", "cutmix", "mixup"])
def test_every_shipped_config_passes_the_check(stage, arg):
    config_check.check_run_config(defaults.get_config(stage, arg), num_devices=1)


def test_a_bad_value_fails_in_the_cli_before_the_workdir(existing_workdir):
    before = _listing(existing_workdir)
    _one_line(_train(f"--config={SMOKE}", f"--workdir={existing_workdir}", "--config.eval_batch_size=0"), 2,
              "eval_batch_size=0")
    assert _listing(existing_workdir) == before


# --- config files and flags ----------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--config=configs/nope.py"], ["config file not found", "configs/nope.py"]),
    (["--config=configs/binary.py:smok"], ["configs/binary.py", "smok", "neither"]),
    ([f"--config={SMOKE}", "--config.optim.learning_rate=0.1"],
     ["optim.learning_rate", "did you mean --config.optim.lr"]),
    ([f"--config={SMOKE}", "--config.batch_size=abc"], ["batch_size", "abc"]),
    (["--workdir=/tmp/x"], ["missing --config"]),
    ([f"--config={SMOKE}", "--no_such_flag=1"], ["no_such_flag"]),
])
def test_config_file_and_flag_errors_are_one_line(tmp_path, args, needles):
    _one_line(_train(*args, timeout=120), 2, *needles)


def test_a_config_file_with_a_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=''):\n    return {\n")
    _one_line(_train(f"--config={bad}", timeout=120), 2, str(bad), "line", "syntax error")


def test_experiments_and_predict_flag_errors_are_one_line(tmp_path):
    _one_line(run_cli("circlemix_jax.experiments", "--config=configs/paper.py:smoke",
                      "--config.base.optim.lrr=1", f"--workdir={tmp_path}", timeout=120), 2, "optim.lrr", "optim.lr")
    _one_line(run_cli("circlemix_jax.predict", f"--workdir={tmp_path}", timeout=120), 2, "out")


# --- a finished run, re-run on changed data ------------------------------------------------------

def _copy(scratch_run, tmp_path):
    """A private copy of the shared finished run whose config names a private copy of its manifest."""
    workdir, manifest = scratch_run
    shutil.copytree(workdir, tmp_path / "run")
    _write(tmp_path / "m.csv", _rows(manifest))  # absolute paths: the copy lives elsewhere
    config = rundir.read_json(str(tmp_path / "run" / "config.json"), "config")
    config["data"]["manifest"] = str(tmp_path / "m.csv")
    rundir.write_json(str(tmp_path / "run" / "config.json"), config)
    return str(tmp_path / "run"), str(tmp_path / "m.csv")


def test_a_grown_manifest_is_refused_and_nothing_leaks(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    os.remove(os.path.join(workdir, "metrics.json"))  # "delete metrics.json to re-evaluate"
    rows = _rows(manifest)
    extra = [dict(r, subject=f"NEW{i % 4}") for i, r in enumerate(rows[:20])]
    for i, r in enumerate(extra):  # new files, so the paths are new rows, not duplicates
        shutil.copy(r["path"], tmp_path / f"new{i}.png")
        r["path"] = str(tmp_path / f"new{i}.png")
    _write(manifest, rows + extra)
    before = _listing(workdir)
    # The rerun must not train on the recorded split's train images and test on others: it must refuse.
    _one_line(_train(SCRATCH[1], f"--workdir={workdir}", f"--config.data.manifest={manifest}"), 2,
              "the data changed", workdir)
    assert _listing(workdir) == before


def test_changed_pixels_are_refused(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    os.remove(os.path.join(workdir, "metrics.json"))
    # Move the run's images to private copies (same rows, new folder), so one can be changed.
    rows = _rows(manifest)
    (tmp_path / "imgs").mkdir()
    for i, r in enumerate(rows):
        r["path"] = shutil.copy(r["path"], tmp_path / "imgs" / f"{i}.png")
    _write(manifest, rows)
    config = defaults.get_config("binary", "smoke")
    records = data.read_manifest(manifest, config.class_names, config.data.label_map.to_dict())
    moved = rundir.split_record(records, data.make_split(records, 0))
    old = rundir.read_json(os.path.join(workdir, "split.json"), "split")
    for name in rundir.SPLITS:
        moved[name]["pixels_sha256"] = old[name]["pixels_sha256"]
    rundir.write_json(os.path.join(workdir, "split.json"), moved)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(rows[0]["path"])  # one image's content changes
    before = _listing(workdir)
    _one_line(_train(SCRATCH[1], f"--workdir={workdir}", f"--config.data.manifest={manifest}"), 2,
              "changed since the run was made")
    assert _listing(workdir) == before


# --- damaged checkpoints -------------------------------------------------------------------------

def _damage(step_folder: str) -> None:
    """Cuts every array file of a checkpoint's state in half, as a failing disk or copy would."""
    for root, _, files in os.walk(os.path.join(step_folder, "state")):
        for f in files:
            p = os.path.join(root, f)
            size = os.path.getsize(p)
            with open(p, "r+b") as fh:
                fh.truncate(size // 2)


def _step_folders(workdir, kind):
    folder = os.path.join(workdir, "checkpoints", kind)
    return sorted((os.path.join(folder, d) for d in os.listdir(folder) if d.isdigit()),
                  key=lambda p: int(os.path.basename(p)))


def test_damaged_latest_falls_back_and_finishes(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    expected = rundir.read_json(os.path.join(workdir, "metrics.json"), "metrics")
    os.remove(os.path.join(workdir, "metrics.json"))
    latest = _step_folders(workdir, "latest")
    assert len(latest) == 2, latest  # the previous step is kept to fall back on
    _damage(latest[-1])
    result = _train(SCRATCH[1], f"--workdir={workdir}", f"--config.data.manifest={manifest}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert "is damaged" in result.stdout and latest[-1] in result.stdout, result.stdout[-3000:]
    got = rundir.read_json(os.path.join(workdir, "metrics.json"), "metrics")
    assert got["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert got["confusion_matrix"] == expected["confusion_matrix"]


def test_all_checkpoints_damaged_is_one_line_naming_the_folder(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    os.remove(os.path.join(workdir, "metrics.json"))
    for kind in ("latest", "best"):
        for folder in _step_folders(workdir, kind):
            _damage(folder)
    _one_line(_train(SCRATCH[1], f"--workdir={workdir}", f"--config.data.manifest={manifest}"), 2,
              "is damaged", os.path.join(workdir, "checkpoints"), "delete")
    assert not os.path.exists(os.path.join(workdir, rundir.LOCK))


def test_predict_on_a_damaged_best_is_one_line(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    _damage(_step_folders(workdir, "best")[-1])
    _one_line(run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--manifest={manifest}",
                      f"--out={tmp_path / 'p.csv'}"), 2, "damaged", workdir)
    assert not (tmp_path / "p.csv").exists()


def test_predict_and_explain_never_write_over_what_they_read(tmp_path, scratch_run):
    workdir, manifest = _copy(scratch_run, tmp_path)
    rows = _rows(manifest)[:4]
    mine = _write(tmp_path / "p_subjects.csv", rows)  # also where --out p.csv would put its summary
    before = _listing(tmp_path)
    outs = [(mine, "the manifest"), (tmp_path / "p.csv", "the manifest"), (rows[1]["path"], "an input image"),
            (os.path.join(workdir, "metrics.json"), "a file of the run")]
    for out, needle in outs:
        _one_line(run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--manifest={mine}", f"--out={out}"),
                  2, needle, "choose another path")
    _one_line(run_cli("circlemix_jax.explain", f"--workdir={workdir}", f"--manifest={mine}",
                      f"--out={rows[0]['path']}"), 2, "an input image")
    assert _listing(tmp_path) == before


def test_leftover_temporary_checkpoint_folders_are_cleaned(tmp_path):
    from circlemix_jax import checkpoint

    folder = tmp_path / "checkpoints" / "latest" / "12.orbax-checkpoint-tmp-1234"
    folder.mkdir(parents=True)
    (folder / "x").write_text("half")
    (tmp_path / "checkpoints" / "latest" / "10").mkdir()
    checkpoint.remove_temporaries(str(tmp_path / "checkpoints"))
    assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["10"]


# --- the workdir lock ----------------------------------------------------------------------------

def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import json
    import socket

    with rundir.locked(str(tmp_path)):
        with pytest.raises(InputError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            rundir.check_unlocked(str(tmp_path))
        with pytest.raises(InputError, match="in use"):
            with rundir.locked(str(tmp_path)):
                pass
    assert not (tmp_path / rundir.LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    rundir.check_unlocked(str(tmp_path))
    with rundir.locked(str(tmp_path)):
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()


def test_a_second_run_on_a_busy_workdir_refuses_at_once(tmp_path, synthetic_manifest):
    workdir = tmp_path / "run"
    env = dict(os.environ, CIRCLEMIX_CACHE=CACHE)
    first = subprocess.Popen([sys.executable, "-m", "circlemix_jax.main", f"--config={SMOKE}", f"--workdir={workdir}",
                              "--config.num_epochs=20"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (workdir / rundir.LOCK).exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (workdir / rundir.LOCK).exists()
        # It must refuse without waiting for the lock; the generous timeout only covers a loaded machine.
        second = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.num_epochs=20", timeout=300)
        _one_line(second, 2, f"pid {first.pid}", "in use")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert first.returncode == 0
    assert not any(".orbax-checkpoint-tmp" in p for p in _listing(workdir))


# --- signals -------------------------------------------------------------------------------------

def test_sigterm_while_starting_up_exits_zero_with_a_message(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "circlemix_jax.main", f"--config={SMOKE}", f"--workdir={workdir}"],
                            cwd=REPO, env=dict(os.environ, CIRCLEMIX_CACHE=CACHE), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # importing JAX, well before the first step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    assert "SIGTERM" in err and "rerun the same command" in err, err[-2000:]
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))


def test_checkpoints_from_before_the_ema_field_still_restore(tmp_path):
    """Runs saved before TrainState had `ema` must still predict and resume (ema=None)."""
    from typing import Any

    import jax.numpy as jnp
    from flax import struct

    from circlemix_jax import checkpoint, step

    @struct.dataclass
    class OldState:
        step: Any
        params: Any
        batch_stats: Any
        opt_state: Any

    old = OldState(jnp.array(3), {"w": jnp.arange(4.0)}, {"m": jnp.ones(2)}, {"mu": jnp.zeros(4)})
    ckpts = checkpoint.RunCheckpoints(str(tmp_path))
    ckpts.save(checkpoint.BEST, 3, old, {"epochs_done": 1})
    ckpts.wait()
    new = step.TrainState(step=old.step, params=old.params, batch_stats=old.batch_stats, opt_state=old.opt_state)
    state, progress = ckpts.restore(checkpoint.BEST, checkpoint.abstract_like(new))
    ckpts.close()
    assert state.ema is None and progress == {"epochs_done": 1}
    np.testing.assert_array_equal(state.params["w"], np.arange(4.0))


def test_print_config_shows_the_overrides_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run"
    result = _train("--config=configs/binary.py:scratch", "--config.optim.lr=0.123", f"--workdir={workdir}",
                    "--print_config", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    printed = json.loads(result.stdout.split("\n# workdir")[0])
    assert printed["optim"]["lr"] == 0.123 and printed["optim"]["schedule"] == "cosine"
    assert not workdir.exists()


def test_help_lists_stages_arguments_and_fields():
    result = _train("--help", timeout=120)
    assert result.returncode == 0
    for word in ("configs/nc2.py", "scratch", "circlemix", "data.manifest", "--print_config"):
        assert word in result.stdout, word
