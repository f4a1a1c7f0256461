"""A finished run as a function on images: uint8 NHWC in, class probabilities out.

`explain`, `export` and `load_run` all read a run's model through this module,
so they agree with each other and with `predict` on which weights and which
preprocessing are used:

- the weights are `step.eval_variables` of the best train state, as for every
  evaluation (the average of the weights where a run keeps one);
- `logits` normalises the images exactly as `step.eval_step` does and applies
  the model in eval mode, on one device and without `eval_step`'s pieces, so
  that it also traces with a symbolic batch size for `jax.export`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from circlemix_jax import colour, hierarchy
from circlemix_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A finished run's model, ready to apply.

    Attributes:
      workdir: the run folder (absolute).
      config: its resolved config.
      model: the Flax module (no mesh axis).
      variables: {'params', 'batch_stats'} as host arrays.
      step: the train step of the best checkpoint.
    """

    workdir: str
    config: Any
    model: Any
    variables: dict
    step: int

    @property
    def class_names(self) -> list[str]:
        """Names of the model's outputs, in output order (the stage's classes)."""
        return [self.config.class_names[c] for c in self.config.classes]

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)


def load(workdir: str) -> RunModel:
    """The model of a run's best checkpoint.

    Raises:
      InputError: no run, no best checkpoint, or one that does not match its config.
    """
    from circlemix_jax import step as steplib  # the model only when one is loaded

    workdir = os.path.abspath(workdir)
    hierarchy.require_best_checkpoint(workdir, finished=False)
    config = hierarchy.load_run_config(workdir)
    state = hierarchy.restore_best(workdir, config)
    return RunModel(workdir, config, steplib.make_model(config),
                    steplib.eval_variables(state), int(state.step))


def normalise(config, images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in the model's input scale (as `step.eval_step`)."""
    return colour.model_input(config.data, images.astype(jnp.float32) / 255.0)


def logits(run: RunModel, images: jax.Array) -> jax.Array:
    """Logits (N, K) of uint8 images (N, S, S, 3), the same function as `step.eval_step`'s.

    With `config.eval.tta` (test-time augmentation) they are the mean over the
    8 dihedral views, as in `step.eval_step`.
    """
    x = normalise(run.config, images)
    forward = lambda v: run.model.apply(run.variables, v, train=False)
    tta = run.config.get("eval") is not None and run.config.eval.get("tta", False)
    if not tta:
        return forward(x)
    from circlemix_jax import step as steplib

    return jax.lax.map(forward, jnp.stack(steplib.tta_views(x))).mean(axis=0)


def probabilities(run: RunModel, images: jax.Array) -> jax.Array:
    """Softmax probabilities (N, K) over the run's classes, float32."""
    return jax.nn.softmax(logits(run, images), axis=-1)


def check_images(images, size: int) -> np.ndarray:
    """`images` as a uint8 array (N, size, size, 3), or an error naming what is wrong.

    Raises:
      InputError: another shape or dtype (float images are refused rather than
        guessed at: 0-1 and 0-255 floats would both pass silently).
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise InputError(f"images must be uint8 RGB 0-255, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise InputError(f"images must have shape (N, {size}, {size}, 3) (NHWC, the run's image size), "
                         f"got {x.shape}")
    return x
