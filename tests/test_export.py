"""jax.export artefact: written, loaded with JAX alone, equal to predict's probabilities at any batch size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from fake_run import make_run, write_images

import circlemix_jax
from circlemix_jax import export, predict
from circlemix_jax.data import pipeline


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    workdir = make_run(str(root / "run"), image_size=32, seed=3)
    paths = write_images(str(root / "imgs"), 5)
    out = root / "artefact"
    result = run_cli("circlemix_jax.export", f"--workdir={workdir}", f"--out={out}", "--platforms=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smoke-test model" in result.stdout
    return workdir, paths, str(out)


def test_artefact_matches_predict_at_other_batch_sizes(exported_run):
    workdir, paths, out = exported_run
    _, expected = predict.predict_probs(workdir, paths, {}, workers=1)
    model = export.load(out)
    images = pipeline.decode_all(paths, 32, 1)
    got = np.concatenate([model(images[:2]), model(images[2:])])  # batch sizes 2 and 3: the batch is symbolic
    assert got.shape == (5, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(expected - 0.5).max() > 1e-3  # random weights still give images different probabilities
    np.testing.assert_allclose(circlemix_jax.load_run(workdir)(images), expected, atol=1e-4)


def test_metadata(exported_run):
    _, _, out = exported_run
    with open(os.path.join(out, "model.json")) as f:
        meta = json.load(f)
    assert meta["class_names"] == ["non_sclerotic", "global_sclerosis"]
    assert meta["image_size"] == 32 and meta["platforms"] == ["cpu"]
    assert meta["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["provenance"]["stage"] == "binary" and meta["provenance"]["data"] == "synthetic"
    assert meta["provenance"]["test_balanced_accuracy"] == 0.5


def test_load_needs_no_project_model_code(exported_run):
    """A fresh interpreter loads and calls the artefact without importing flax or the model."""
    _, _, out = exported_run
    code = ("import sys, numpy as np; from circlemix_jax import export; m = export.load(sys.argv[1]); "
            "p = m(np.zeros((3, 32, 32, 3), np.uint8)); "
            "bad = [k for k in sys.modules if k.startswith('flax') or k in ('circlemix_jax.models', "
            "'circlemix_jax.inference', 'circlemix_jax.step')]; "
            "assert not bad, bad; print(p.shape)")
    result = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(3, 2)"


def test_wrong_images_and_bad_flags(exported_run, tmp_path):
    _, _, out = exported_run
    model = export.load(out)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        model(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model(np.zeros((2, 32, 32, 3), np.float32))
    bad = run_cli("circlemix_jax.export", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 2 and bad.stderr.startswith("error: run folder") and bad.stderr.count("\n") == 1
