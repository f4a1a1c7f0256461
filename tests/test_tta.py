"""Test-time augmentation: the 8 dihedral views and the eval step's mean of their logits."""

import numpy as np
import pytest
from fake_run import random_variables

from circlemix_jax import defaults, step


def _numpy_views(image: np.ndarray) -> list[np.ndarray]:
    """The dihedral group of one HWC image, written independently of `step.tta_views`."""
    views = []
    for base in (image, image[:, ::-1]):
        views += [np.rot90(base, k) for k in range(4)]
    return views


def test_views_are_the_eight_dihedral_symmetries():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 6, 6, 3)).astype(np.float32)  # random: no view equals another
    views = [np.asarray(v) for v in step.tta_views(images)]
    assert len(views) == 8
    np.testing.assert_array_equal(views[0], images)  # the identity comes first
    for i, image in enumerate(images):
        expected = {v.tobytes() for v in _numpy_views(image)}
        got = {v[i].tobytes() for v in views}
        assert len(expected) == 8 and got == expected


def test_views_need_square_images():
    with pytest.raises(ValueError, match="square"):
        step.tta_views(np.zeros((1, 4, 6, 3), np.float32))


@pytest.fixture(scope="module")
def eval_fns():
    config = defaults.get_config("binary", "smoke")
    mesh = step.make_mesh(1)
    model = step.make_model(config)
    # Random weights with fitted running statistics: views give visibly different logits
    # (Flax's init would not: the last BatchNorm of each block scales by zero).
    variables = random_variables(model, 32, seed=1)
    state = step.replicate(step.init_state(variables, step.make_optimizer(config)), mesh)
    plain = step.parallel_eval_step(config, model, mesh)
    # A second config: the step traces on its first call and reads the config then.
    tta_config = defaults.get_config("binary", "smoke")
    tta_config.eval.tta = True
    tta = step.parallel_eval_step(tta_config, model, mesh)
    return state, plain, tta


def test_tta_logits_are_the_mean_over_numpy_views(eval_fns):
    state, plain, tta = eval_fns
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 32, 32, 3), np.uint8)
    per_view = [np.asarray(plain(state, np.stack([_numpy_views(im)[v] for im in images]).copy()))
                for v in range(8)]
    got = np.asarray(tta(state, images))
    scale = np.abs(per_view).max()
    np.testing.assert_allclose(got, np.mean(per_view, axis=0), atol=1e-5 * scale)
    # The views disagree on a random network, so TTA is not the plain logits.
    assert np.abs(got - per_view[0]).max() > 1e-2 * scale
    # Averaging over the group makes the output invariant to any symmetry of the input.
    turned = np.ascontiguousarray(np.rot90(images[:, ::-1], 1, axes=(1, 2)))
    np.testing.assert_allclose(np.asarray(tta(state, turned)), got, atol=1e-5 * scale)
