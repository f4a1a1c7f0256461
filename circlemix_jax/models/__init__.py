"""EfficientNet-B0 (`efficientnet.py`), built from interchangeable layers (`layers.py`,
`depthwise.py`), and `make_model`, which picks them for a config and a backend."""

from __future__ import annotations

import jax.numpy as jnp

from circlemix_jax.models import layers
from circlemix_jax.models.efficientnet import B0_STAGES, PADDINGS, EfficientNetB0, count_params

__all__ = ["B0_STAGES", "PADDINGS", "EfficientNetB0", "count_params", "make_model"]


def make_model(config, backend: str | None = None) -> EfficientNetB0:
    """The configured EfficientNet-B0 for this stage's classes.

    Args:
      config: a run config (`model.*`, `classes`).
      backend: the platform whose layer set `model.layers='auto'` picks (default: JAX's).
    """
    m = config.model
    return EfficientNetB0(
        num_classes=len(config.classes), padding=m.padding, bn_eps=m.bn_eps, bn_momentum=m.bn_momentum,
        dropout_rate=m.dropout_rate, drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype),
        layers=layers.layers(m.get("layers", "auto"), backend))
