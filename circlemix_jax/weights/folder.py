"""A converted-weights folder: `variables/` (Orbax: {'params', 'batch_stats'}) and
`meta.json` (source, arch, padding, bn_eps, num_classes, and the input
normalisation mean/std on x = pixels/255), and everything that reads one.

`load(DIR)` rebuilds the model whose logits equal the source model's;
`init_backbone` / `load_backbone` serve training with a fresh classifier, and
`override_config` makes a run's config match the weights.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from circlemix_jax.models import EfficientNetB0
from circlemix_jax.weights.sources import ConversionError

META_FILE = "meta.json"
VARIABLES_DIR = "variables"
FORMAT = "circlemix_jax.convert/1"
Log = Callable[[str], None]


def print_line(msg: str) -> None:
    """The default `Log` of conversion and loading: one flushed line on stdout."""
    print(msg, flush=True)


@functools.lru_cache(maxsize=8)
def flax_shapes(num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every variable of `EfficientNetB0(num_classes)`, keyed by path."""
    model = EfficientNetB0(num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return {k: tuple(v.shape) for k, v in traverse.flatten_dict(dict(abstract)).items()}


def read_meta(directory: str) -> dict:
    """The `meta.json` of a converted folder."""
    path = os.path.join(os.path.abspath(directory), META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{directory} is not a converted-weights folder (no {META_FILE}); "
                              "write one with python -m circlemix_jax.convert") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _restore(directory: str, meta: dict) -> dict:
    shapes = flax_shapes(meta["num_classes"] or 1000)
    abstract = traverse.unflatten_dict({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()
                                        if meta["has_classifier"] or p[1] != "classifier"})
    path = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        return ckptr.restore(path, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises many types for a damaged folder
        raise ConversionError(f"cannot restore {path} as EfficientNet-B0 variables "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        ckptr.close()


def load(directory: str) -> tuple[EfficientNetB0, dict]:
    """The source model, in Flax: `model.apply(variables, x, train=False)` gives its logits.

    `x` is NHWC float, normalised as `meta.json` says: x = (pixels/255 - mean) / std.

    Raises:
      ConversionError: the folder is damaged, or it holds a backbone without a
        classifier (a Keras `_notop.h5`); use `load_backbone` for those.
    """
    meta = read_meta(directory)
    if not meta["has_classifier"]:
        raise ConversionError(f"{directory} holds a backbone without classifier (converted from "
                              f"{os.path.basename(meta['input_file'])}); it has no logits to load: "
                              "use load_backbone() or init_backbone() to train a new head")
    model = EfficientNetB0(meta["num_classes"], padding=meta["padding"], bn_eps=meta["bn_eps"])
    return model, _restore(directory, meta)


def load_backbone(directory: str) -> tuple[dict, dict]:
    """Metadata and variables without the classifier, for fine-tuning.

    Returns:
      (meta, {'params': ..., 'batch_stats': ...}) with numpy leaves; 'params' lacks
      'classifier'. Build the model with `padding=meta['padding']`, `bn_eps=meta['bn_eps']`
      and normalise inputs with meta['mean'] / meta['std'].
    """
    meta = read_meta(directory)
    variables = _restore(directory, meta)
    variables["params"] = {k: v for k, v in variables["params"].items() if k != "classifier"}
    return meta, variables


def init_backbone(directory: str, variables: Any, log: Log = print_line) -> dict:
    """`variables` of a freshly initialised model with everything but the classifier from `directory`.

    Args:
      directory: a folder written by `convert`.
      variables: {'params', 'batch_stats'} of `EfficientNetB0(num_classes, ...)`, any num_classes.
      log: where the one-line summary goes.

    Raises:
      ConversionError: listing every variable whose path or shape differs.
    """
    meta, backbone = load_backbone(directory)
    mine = traverse.flatten_dict({"params": dict(variables["params"]), "batch_stats": dict(variables["batch_stats"])})
    theirs = traverse.flatten_dict(backbone)
    body = {p: v for p, v in mine.items() if p[1] != "classifier"}
    bad = sorted("/".join(p) for p in set(body) ^ set(theirs))
    bad += sorted(f"{'/'.join(p)} {tuple(theirs[p].shape)} != {tuple(v.shape)}" for p, v in body.items()
                  if p in theirs and tuple(theirs[p].shape) != tuple(v.shape))
    if bad:
        raise ConversionError(f"{directory} does not fit this model; differing variables: {bad}")
    merged = {p: (theirs[p] if p in theirs else v) for p, v in mine.items()}
    log(f"init_from {directory}: backbone and BatchNorm statistics from {meta['source']} {meta['arch']} "
        f"({len(theirs)} tensors); classifier freshly initialised")
    return traverse.unflatten_dict(merged)


def override_config(config, log: Log = print_line) -> dict | None:
    """Makes `config` match `config.model.init_from`'s weights: padding, bn_eps, data mean/std.

    Call before building the model and input pipeline. Each change is logged.

    Returns:
      The metadata, or None when `init_from` is empty.
    """
    if not config.model.init_from:
        return None
    meta = read_meta(config.model.init_from)
    for section, field, value in (("model", "padding", meta["padding"]), ("model", "bn_eps", meta["bn_eps"]),
                                  ("data", "mean", meta["mean"]), ("data", "std", meta["std"])):
        old = config[section][field]
        new = type(old)(value) if isinstance(old, (list, tuple)) else value
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(new) if isinstance(new, tuple) else new):
            log(f"init_from: config.{section}.{field} {old} -> {new} (from {META_FILE} of {meta['source']} "
                f"{meta['arch']})")
            config[section][field] = new
    return meta
