"""Grad-CAM: shapes and signs, the exact CAM identity on B0's head, a map that peaks where the evidence is, the CLI."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli
from fake_run import make_run, write_images
from hypothesis import given, settings, strategies as st

from circlemix_jax import explain, inference


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A binary B0 of random weights at 64 px: a 2x2 map per image."""
    return inference.load(make_run(str(tmp_path_factory.mktemp("run")), image_size=64, seed=1))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)


def test_maps_shapes_signs_and_probabilities(run, images):
    out = explain.explain_images(run, images)
    assert out["cam"].shape == (3, 2, 2)
    assert out["overlay"].shape == (3, 64, 64)
    assert (out["cam"] >= 0).all() and out["cam"].max() > 0
    assert out["overlay"].min() >= 0 and out["overlay"].max() == pytest.approx(1.0, abs=1e-6)
    # The split at the last stage reproduces the model's own output.
    np.testing.assert_allclose(out["probs"], np.asarray(inference.probabilities(run, images)), atol=1e-5)
    np.testing.assert_array_equal(out["target"], out["probs"].argmax(-1))


def test_map_is_the_exact_decomposition_of_the_centred_logit(run, images):
    """mean over positions of the map before ReLU + centred bias == the model's centred logit."""
    features, _ = explain.features_and_head(run)
    a = features(inference.normalise(run.config, images))
    head = run.variables["params"]["classifier"]
    w = np.asarray(head["kernel"]) - np.asarray(head["kernel"]).mean(axis=1, keepdims=True)
    b = np.asarray(head["bias"]) - np.asarray(head["bias"]).mean()
    z = np.asarray(inference.logits(run, images))
    z = z - z.mean(axis=1, keepdims=True)
    for t in range(2):
        raw = np.einsum("nhwc,c->nhw", np.asarray(a), w[:, t])
        np.testing.assert_allclose(raw.mean(axis=(1, 2)) + b[t], z[:, t], atol=1e-4)
        # Grad-CAM's weights are the centred column / positions, so its map is ReLU(raw) / positions.
        cam = explain.explain_images(run, images, target=t)["cam"]
        np.testing.assert_allclose(cam * 4, np.maximum(raw, 0), rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(top=st.integers(0, 6), left=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_map_peaks_where_the_logit_looks(top, left, seed):
    """A model whose class-0 logit depends on one 2x2 region only: its map is zero elsewhere and peaks there."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(0.1, 1.0, (2, 8, 8, 3)), jnp.float32)
    mask = np.zeros((1, 8, 8, 1), np.float32)
    mask[:, top:top + 2, left:left + 2] = 1.0
    kernel = jnp.asarray(np.stack([np.ones(3), -np.ones(3)], axis=1), jnp.float32)

    def head(a):
        return jnp.mean(a, axis=(1, 2)) @ kernel

    cam = np.asarray(explain.grad_cam(x * mask, head, jnp.zeros(2, jnp.int32)))
    assert cam.shape == (2, 8, 8)
    assert (cam[:, mask[0, ..., 0] == 0] == 0).all()
    for m in cam:
        r, c = np.unravel_index(m.argmax(), m.shape)
        assert top <= r < top + 2 and left <= c < left + 2
    # The other class's evidence is the opposite: nothing survives its ReLU.
    assert (np.asarray(explain.grad_cam(x * mask, head, jnp.ones(2, jnp.int32))) == 0).all()


def test_pick_takes_every_class_in_turn():
    assert explain.pick(["a", "a", "a", "b", "a", "b"], 4) == [0, 1, 3, 5]
    assert explain.pick(None, 3) == [0, 1, 2]


def test_cli_writes_the_figure_and_refuses_bad_input(tmp_path):
    workdir = make_run(str(tmp_path / "run"), image_size=32, seed=2)
    paths = write_images(str(tmp_path / "imgs"), 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in zip(paths, ["obsolescent", "normal",
                                                                                        "normal"])))
    out = tmp_path / "cam.png"
    result = run_cli("circlemix_jax.explain", f"--workdir={workdir}", f"--manifest={manifest}", f"--out={out}",
                     "--max-images=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(out) > 10_000
    assert "WARNING" in result.stdout and "smoke-test model" in result.stdout
    for args, expected in (([f"--images={tmp_path / 'imgs'}", "--max-images=0"], "--max-images must be at least 1"),
                           ([f"--images={tmp_path / 'nowhere'}"], "--images folder not found"),
                           ([f"--images={tmp_path / 'imgs'}", "--target=tuft"], "--target 'tuft' is not one")):
        bad = run_cli("circlemix_jax.explain", f"--workdir={workdir}", f"--out={out}", *args)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.strip().count("\n") == 0 and expected in bad.stderr, bad.stderr
