"""Checks every user-settable field of a run's config before anything runs.

A bad value must stop a run in its first second, with one line that names the
field, the value and what is allowed: not after an epoch of training (a zero
eval batch), never silently (a negative learning rate trains), and never as a
traceback from deep inside XLA (an image too small for B0's five stride-2 stages).
"""

from __future__ import annotations

import math
import numbers

from circlemix_jax import augment, colour, decision, hierarchy, step
from circlemix_jax.data import image_cache
from circlemix_jax.errors import InputError
from circlemix_jax.models import PADDINGS, layers
from circlemix_jax.rundir import get_field

DTYPES = ("float32", "bfloat16")
# B0 halves the resolution five times; below 32 px the last stage sees less than one pixel.
MIN_IMAGE_SIZE = 32


def _fail(field: str, value, allowed: str) -> InputError:
    return InputError(f"config field {field}={value!r} is invalid: {allowed}")


def _int(config, field: str, lo: int | None = None, hi: int | None = None) -> int:
    value = get_field(config, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(field, value, "must be an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}" if lo is not None else f"<= {hi}"
        raise _fail(field, value, f"must be an integer {span}")
    return int(value)


def _real(config, field: str, lo: float, hi: float = math.inf, lo_open: bool = False,
          hi_open: bool = False) -> float:
    value = get_field(config, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _fail(field, value, "must be a finite number")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open or hi == math.inf else ']'}"
        raise _fail(field, value, f"must lie in {span}")
    return float(value)


def _choice(config, field: str, allowed) -> str:
    value = get_field(config, field)
    if value not in allowed:
        raise _fail(field, value, f"must be one of {tuple(allowed)}")
    return value


def _bool(config, field: str) -> bool:
    value = get_field(config, field)
    if not isinstance(value, bool):
        raise _fail(field, value, "must be True or False")
    return value


def _triple(config, field: str, lo_open: float) -> None:
    value = get_field(config, field)
    try:
        ok = len(value) == 3 and all(isinstance(v, numbers.Real) and math.isfinite(v) and v > lo_open
                                     for v in value)
    except TypeError:
        ok = False
    if not ok:
        raise _fail(field, value, f"must be three finite numbers > {lo_open} (R, G, B in the 0-1 scale)")


def check_run_config(config, num_devices: int = 1) -> None:
    """Checks a stage config (`configs/<stage>.py`) field by field.

    Args:
      config: the resolved ConfigDict of one run.
      num_devices: devices the global batch is split across.

    Raises:
      InputError: the first bad field, with its value and what is allowed.
    """
    names = config.class_names
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise _fail("class_names", tuple(names), "must be distinct non-empty names")
    classes = tuple(config.classes)
    if (len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, numbers.Integral) and 0 <= c < len(names) for c in classes)):
        raise _fail("classes", classes, f"must be 2 or more distinct ids in 0..{len(names) - 1} (into class_names)")
    _int(config, "seed", 0)
    _int(config, "split_seed", 0)
    num_folds = _int(config, "num_folds", 2)
    decision.check_options(config)  # eval.tta, eval.decision, split
    # The recipe's fields, each checked by the module that uses them.
    step.check_optim(config)
    augment.check_geometry(config.augment)
    colour.check_options(config.augment.colour)
    if config.eval.decision == "prior" and config.optim.get("logit_adjust", 0.0) > 0:
        # The logit-adjusted loss already makes the argmax the balanced decision; subtracting
        # the prior again at test time would overcorrect towards the rare class.
        raise _fail("eval.decision", "prior", "double-counts the class prior with optim.logit_adjust > 0; "
                    "use 'argmax' (or 'val') with the logit-adjusted loss")
    if config.mix.lam_mode == "mask" and config.mix.method not in ("none", "cutmix", "circlemix"):
        raise _fail("mix.lam_mode", "mask", f"works with cutmix and circlemix, not {config.mix.method!r}")
    if config.split == "subject_kfold":  # a centre's index is checked against the manifest's centres
        _int(config, "fold", 0, num_folds - 1)
    else:
        _int(config, "fold", 0)
    _real(config, "val_fraction", 0.0, 0.5, lo_open=True)

    size = _int(config, "data.image_size", MIN_IMAGE_SIZE, 4096)
    _int(config, "data.synthetic_count", 5 * num_folds)
    _int(config, "data.workers", 1, 256)
    _choice(config, "data.cache", image_cache.MODES)
    _real(config, "data.cache_memory_mib", 0.0)
    if not isinstance(config.data.cache_dir, str):
        raise _fail("data.cache_dir", config.data.cache_dir, "must be a folder path ('' = the default)")
    _triple(config, "data.mean", -math.inf)
    _triple(config, "data.std", 0.0)
    _choice(config, "data.input_norm", colour.INPUT_NORMS)
    label_map = config.data.label_map.to_dict() if hasattr(config.data.label_map, "to_dict") else {}
    bad = [v for v in label_map.values() if v not in names]
    if bad:
        raise _fail("data.label_map", label_map, f"maps onto {bad[0]!r}, which is not in class_names {list(names)}")

    _bool(config, "augment.basic")
    _bool(config, "data.balance_centers")
    _int(config, "augment.max_crop", 0, size // 2)

    try:
        augment._check_options(**{k: v for k, v in config.mix.to_dict().items() if k != "alpha"},
                               alpha=config.mix.alpha)
    except ValueError as e:
        raise InputError(f"config field {str(e).rstrip('.').replace('mix: ', 'mix.', 1)}") from None
    _real(config, "mix.alpha", 0.0, lo_open=True)

    _choice(config, "model.padding", PADDINGS)
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.layers", layers.CHOICES)
    _real(config, "model.bn_eps", 0.0, 1.0, lo_open=True)
    _real(config, "model.bn_momentum", 0.0, 1.0, hi_open=True)
    _real(config, "model.dropout_rate", 0.0, 1.0, hi_open=True)
    _real(config, "model.drop_path_rate", 0.0, 1.0, hi_open=True)
    _choice(config, "model.child_head", hierarchy.HEAD_MODES)

    _real(config, "optim.lr", 0.0, lo_open=True)
    _real(config, "optim.momentum", 0.0, 1.0, hi_open=True)
    _real(config, "optim.decay_at", 0.0, 1.0)
    _real(config, "optim.decay_factor", 0.0, 1.0, lo_open=True)

    batch = _int(config, "batch_size", 1)
    if batch % num_devices:
        raise _fail("batch_size", batch, f"must be divisible by the {num_devices} devices")
    eval_batch = _int(config, "eval_batch_size", 1)
    if eval_batch % num_devices:
        raise _fail("eval_batch_size", eval_batch, f"must be divisible by the {num_devices} devices")
    _int(config, "num_epochs", 1)
    _int(config, "log_every_steps", 1)
    _int(config, "checkpoint_every_steps", 0)
