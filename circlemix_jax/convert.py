"""Converts ImageNet EfficientNet-B0 weights (timm, torchvision, efficientnet_pytorch, Keras) for our Flax model.

    python -m circlemix_jax.convert --source timm --input model.safetensors --arch efficientnet_b0 --output DIR

DIR then holds `variables/` (Orbax: {'params', 'batch_stats'}) and `meta.json`
(source, arch, padding, bn_eps, num_classes, and the input normalisation mean/std
on x = pixels/255). `load(DIR)` rebuilds the model whose logits equal the source
model's; `init_backbone` / `load_backbone` serve training with a fresh classifier.

Notes:
- Keras `_notop.h5` files convert to a backbone without classifier: `load` refuses
  them (there are no logits to reproduce), `load_backbone` / `init_backbone` work.
- Keras models report softmax probabilities by default; `load` gives the logits
  before that softmax (`classifier_activation=None` in Keras terms).
- 'same' padding is TF's SAME. Keras pads stride-2 layers with a ZeroPadding fixed
  when the model is built; that equals SAME at the size it was built for, and at any
  size whose stride-2 inputs are all even (multiples of 32 px, e.g. 224 and 256).
  A Keras model built for one size and run at a size of other parity (e.g. 240)
  pads differently from both TF and us.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
from typing import Any
from collections.abc import Callable

import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from circlemix_jax import defaults, weight_sources as ws
from circlemix_jax.errors import exits_cleanly
from circlemix_jax.models import EfficientNetB0
from circlemix_jax.weight_sources import ConversionError

META_FILE = "meta.json"
VARIABLES_DIR = "variables"
FORMAT = "circlemix_jax.convert/1"
Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


@functools.lru_cache(maxsize=8)
def flax_shapes(num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every variable of `EfficientNetB0(num_classes)`, keyed by path."""
    model = EfficientNetB0(num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return {k: tuple(v.shape) for k, v in traverse.flatten_dict(dict(abstract)).items()}


# ---------------------------------------------------------------- mapping

def _closest_source(tensors: dict[str, np.ndarray], num_classes: int) -> str | None:
    scores = {s: len(set(tensors) & {e.key for e in ws.key_map(s, flax_shapes(num_classes))}) for s in ws.SOURCES}
    best = max(scores, key=scores.get)
    return best if scores[best] else None


def map_tensors(tensors: dict[str, np.ndarray], source: str, path: str,
                allow_headless: bool = False) -> tuple[dict, int | None]:
    """Maps source tensors onto the Flax tree, all or nothing.

    Args:
      tensors: source key -> array.
      source: one of `weight_sources.SOURCES`.
      path: the file, for messages.
      allow_headless: accept a file without any classifier tensor (Keras `_notop.h5`).

    Returns:
      ({'params', 'batch_stats'} of numpy float32, num_classes or None when headless).

    Raises:
      ConversionError: listing every missing, unexpected and shape-mismatched key.
    """
    bias = tensors.get(ws.classifier_bias_key(source))
    num_classes = int(bias.shape[0]) if bias is not None and bias.ndim == 1 and bias.size else 1000
    entries = ws.key_map(source, flax_shapes(num_classes))
    head = [e for e in entries if e.path[1] == "classifier"]
    if allow_headless and not any(e.key in tensors for e in head):
        entries, num_classes = [e for e in entries if e not in head], None
    expected = {e.key: e for e in entries}
    ignored = {k for k in tensors if k.endswith(".num_batches_tracked")}  # a torch counter, unused in eval
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected and k not in ignored)
    mismatched = [f"{k} {tuple(tensors[k].shape)} != {e.source_shape}" for k, e in expected.items()
                  if k in tensors and tuple(tensors[k].shape) != e.source_shape]
    if len(missing) == len(expected):  # not a near miss: listing ~300 keys twice would bury the point
        guess = _closest_source(tensors, num_classes or 1000)
        hint = f"they look like --source {guess}" if guess and guess != source else "wrong --source?"
        raise ConversionError(f"{path} holds none of the {len(expected)} keys of EfficientNet-B0 in {source} layout "
                              f"(e.g. {missing[:3]}); its keys (e.g. {sorted(tensors)[:3]}): {hint}")
    if missing or unexpected or mismatched:
        raise ConversionError(f"{path} is not an EfficientNet-B0 checkpoint in {source} layout: "
                              f"{len(missing)} missing {missing}; {len(unexpected)} unexpected {unexpected}; "
                              f"{len(mismatched)} shape-mismatched {mismatched}; nothing was converted")
    flat = {}
    for key, e in expected.items():
        value = np.ascontiguousarray(e.convert(np.asarray(tensors[key], np.float32)))
        if not np.all(np.isfinite(value)):
            raise ConversionError(f"{path}: tensor {key} holds NaN or Inf; nothing was converted")
        flat[e.path] = value
    return traverse.unflatten_dict(flat), num_classes


# ---------------------------------------------------------------- sources

def _read(source: str, path: str, arch: str | None, log: Log) -> tuple[dict, dict]:
    """Reads `path` of `source`; returns (variables, meta)."""
    if not os.path.isfile(path):
        raise ConversionError(f"--input {path} does not exist or is not a file")
    if arch is not None and source != "timm":
        raise ConversionError(f"--arch {arch} only applies to --source timm; {source} has one B0 layout")
    mean, std, extra = defaults.IMAGENET_MEAN, defaults.IMAGENET_STD, {}
    if source == "keras":
        kf = ws.read_keras_h5(path)
        log(f"read {len(kf.tensors)} tensors from {len(kf.layer_names)} Keras layers")
        mean, std, stats = ws.keras_input_normalisation(kf, log)
        spec = dataclasses.replace(ws.ARCHS[("keras", "EfficientNetB0")], bn_eps=ws.keras_bn_eps(kf, log))
        variables, num_classes = map_tensors(kf.tensors, source, path,
                                             allow_headless="predictions" not in kf.layer_names)
        extra = {"keras_preprocessing": stats}
    else:
        tensors = ws.read_torch_like(path, log)
        log(f"read {len(tensors)} tensors")
        if source == "timm":
            cfg = ws.timm_config(path)
            cfg_arch = cfg.get("architecture")
            if cfg_arch is not None and cfg_arch not in ws.TIMM_ARCHS:
                raise ConversionError(f"config.json beside {path} names architecture {cfg_arch!r}; "
                                      f"only {' / '.join(ws.TIMM_ARCHS)} are EfficientNet-B0")
            if arch and cfg_arch and arch != cfg_arch:
                raise ConversionError(f"--arch {arch} contradicts config.json beside {path} ({cfg_arch})")
            arch = arch or cfg_arch
            if arch is None:
                raise ConversionError(f"{path}: pass --arch efficientnet_b0 (PyTorch-trained: symmetric padding, "
                                      "BatchNorm eps 1e-5) or tf_efficientnet_b0 (TF-ported: SAME padding, eps 1e-3); "
                                      "their keys are identical and no config.json lies beside the file")
            if cfg_arch:
                log(f"architecture {cfg_arch} from config.json")
            pre = cfg.get("pretrained_cfg", cfg)
            mean, std = tuple(pre.get("mean", mean)), tuple(pre.get("std", std))
        else:
            arch = {"torchvision": "efficientnet_b0", "efficientnet_pytorch": "efficientnet-b0"}[source]
            if source == "efficientnet_pytorch" and os.path.basename(path).startswith("adv-"):
                log("advprop weights (adv-*): inputs scaled to [-1, 1], i.e. mean = std = 0.5")
                mean, std = (0.5,) * 3, (0.5,) * 3
        spec = ws.ARCHS[(source, arch)]
        variables, num_classes = map_tensors(tensors, source, path)
    meta = {"format": FORMAT, "source": source, "arch": spec.arch, "input_file": os.path.abspath(path),
            "padding": spec.padding, "bn_eps": spec.bn_eps, "num_classes": num_classes,
            "has_classifier": num_classes is not None,
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input": "x = pixels / 255 (NHWC, RGB), then (x - mean) / std", **extra}
    return variables, meta


def convert(source: str, input_path: str, output_dir: str, arch: str | None = None, force: bool = False,
            log: Log = _print) -> dict:
    """Converts one checkpoint into `output_dir`; returns the metadata written.

    Raises:
      ConversionError: bad file, wrong layout or an occupied output folder; nothing is written then.
    """
    if source not in ws.SOURCES:
        raise ConversionError(f"--source must be one of {ws.SOURCES}, got {source!r}")
    out = os.path.abspath(output_dir)
    occupied = [n for n in (META_FILE, VARIABLES_DIR) if os.path.exists(os.path.join(out, n))]
    if occupied and not force:
        raise ConversionError(f"{out} already holds a conversion ({', '.join(occupied)}); pass --force to replace it")
    log(f"reading {input_path} ({source})")
    variables, meta = _read(source, input_path, arch, log)
    n = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    head = f"{meta['num_classes']} classes" if meta["has_classifier"] else "no classifier (backbone only)"
    log(f"mapped {len(jax.tree_util.tree_leaves(variables))} tensors ({n:,} values), {head}; "
        f"padding={meta['padding']} bn_eps={meta['bn_eps']} mean={_fmt(meta['mean'])} std={_fmt(meta['std'])}")
    try:
        os.makedirs(out, exist_ok=True)
        for name in occupied:  # meta.json goes first, so a half-replaced folder never looks complete
            target = os.path.join(out, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        log(f"writing {os.path.join(out, VARIABLES_DIR)}")
        ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        try:
            ckptr.save(os.path.join(out, VARIABLES_DIR), args=ocp.args.StandardSave(variables))
        finally:
            ckptr.close()
        tmp = os.path.join(out, META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(out, META_FILE))
    except OSError as e:
        raise ConversionError(f"cannot write {out}: {e.strerror or e}") from None
    log(f"done: {out} (load with circlemix_jax.convert.load, or train with --config.model.init_from={out})")
    return meta


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# ---------------------------------------------------------------- loading

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
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged folder
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


def init_backbone(directory: str, variables: Any, log: Log = _print) -> dict:
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


def override_config(config, log: Log = _print) -> dict | None:
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


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m circlemix_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, choices=ws.SOURCES)
    p.add_argument("--input", required=True, help=".safetensors / .pth / .bin (torch sources) or .h5 (keras)")
    p.add_argument("--arch", choices=ws.TIMM_ARCHS, default=None,
                   help="timm only; read from a config.json beside the file when present")
    p.add_argument("--output", required=True, help="folder for variables/ and meta.json")
    p.add_argument("--force", action="store_true", help="replace an earlier conversion in --output")
    return p.parse_args(argv)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    """CLI entry: bad input ends in one `error: ...` line and exit code 2."""
    args = parse_args(argv)
    convert(args.source, args.input, args.output, arch=args.arch, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
