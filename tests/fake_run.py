"""A finished-looking run folder without training: config.json, a best checkpoint of random weights, metrics.json.

For tests of what reads a run (explain, export, predict's provenance): training
one would cost minutes of compiling the train step.
"""

import json
import os

import jax
import numpy as np

from circlemix_jax import checkpoint, defaults, step as steplib


def make_run(workdir: str, stage: str = "binary", arg: str = "smoke", image_size: int = 32, seed: int = 0,
             balanced_accuracy: float | None = 0.5, **fields) -> str:
    """Writes a run folder whose best checkpoint holds randomly initialised weights.

    The BatchNorm running statistics are perturbed away from (0, 1), so a test
    that forgot them (or used batch statistics) would see other logits.

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
    variables = model.init(jax.random.key(seed), np.zeros((1, image_size, image_size, 3), np.float32), train=False)
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 2.0, x.shape) if path[-1].key == "var" else rng.normal(0, 0.2, x.shape))
        .astype(np.float32), variables["batch_stats"])
    state = steplib.init_state({"params": variables["params"], "batch_stats": stats}, steplib.make_optimizer(config))
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
