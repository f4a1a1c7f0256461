"""Models for tests without training: random B0 variables, and finished-looking run folders.

A run folder holds config.json, a best checkpoint of random weights and
metrics.json, for tests of what reads a run (explain, export, predict's
provenance): training one would cost minutes of compiling the train step.
"""

import json
import os

import jax
import numpy as np

from circlemix_jax import checkpoint, defaults, inference, step as steplib


def random_variables(model, image_size: int, seed: int = 0, calibration: np.ndarray | None = None) -> dict:
    """Random B0-shaped variables with running statistics that fit them, without compiling `model.init`.

    Compiling B0's init takes tens of seconds on a small CPU (an eager init
    longer), and tests of what reads or steps a model need random weights of
    the right shapes, not Flax's initialisers. Kernels are normal with variance
    1/fan-in (fan-in = every axis but the last), biases 0, BatchNorm scales 1.
    The running statistics are one random batch's own moments (a train-mode
    pass with momentum 0), so eval-mode logits have a sane scale and depend on
    the input, as a trained model's do.

    Args:
      model: the Flax module.
      image_size: input side.
      seed: seeds the weights and the default calibration batch.
      calibration: a batch in the model's input scale whose moments become the
        running statistics; by default 8 standard-normal images.
    """
    x = calibration if calibration is not None else (
        np.random.default_rng(seed).standard_normal((8, image_size, image_size, 3)).astype(np.float32))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (rng.standard_normal(leaf.shape) / np.sqrt(int(np.prod(leaf.shape[:-1])))).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    _, stats = jax.jit(lambda v, x: model.clone(bn_momentum=0.0).apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}))(variables, x)
    return {"params": variables["params"], **jax.device_get(stats)}


def make_run(workdir: str, stage: str = "binary", arg: str = "smoke", image_size: int = 32, seed: int = 0,
             balanced_accuracy: float | None = 0.5, **fields) -> str:
    """Writes a run folder whose best checkpoint holds randomly initialised weights.

    The BatchNorm running statistics are another batch's moments, far from
    (0, 1), so a test that forgot them (or used its own batch's statistics)
    would see other logits.

    Args:
      workdir: the folder to write.
      stage, arg: as `defaults.get_config`.
      image_size: the run's image size.
      seed: init seed.
      balanced_accuracy: the test score in metrics.json; None writes no metrics.json (an unfinished run).
      **fields: top-level config fields to set, e.g. num_epochs=8.

    Returns:
      `workdir`.
    """
    config = defaults.get_config(stage, arg)
    with config.unlocked():
        config.data.image_size = image_size
        for k, v in fields.items():
            config[k] = v
    model = steplib.make_model(config)
    # Calibrated on random images as the run would see them, so its logits have a trained model's scale.
    pixels = np.random.default_rng(seed).integers(0, 256, (8, image_size, image_size, 3), np.uint8)
    calibration = np.asarray(inference.normalise(config, pixels))
    state = steplib.init_state(random_variables(model, image_size, seed, calibration), steplib.make_optimizer(config))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    ckpts = checkpoint.RunCheckpoints(workdir)
    ckpts.save(checkpoint.BEST, 7, jax.device_get(state), {"epochs_done": 1, "best_epoch": 0})
    ckpts.wait()
    ckpts.close()
    if balanced_accuracy is not None:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({"balanced_accuracy": balanced_accuracy, "best_epoch": 0}, f)
    return workdir


def write_images(folder: str, n: int, size: int = 40, seed: int = 0) -> list[str]:
    """`n` random RGB PNGs of `size` px (not the run's size, so they get resized) in `folder`/subject_k/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"subject_{i % 2}")
        os.makedirs(sub, exist_ok=True)
        paths.append(os.path.join(sub, f"img{i}.png"))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths
