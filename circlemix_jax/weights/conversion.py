"""Converts ImageNet EfficientNet-B0 checkpoints of timm, torchvision,
efficientnet_pytorch and Keras into a converted-weights folder (`folder.py`).

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

import dataclasses
import json
import os
import shutil

import flax.traverse_util as traverse
import jax
import numpy as np
import orbax.checkpoint as ocp

from circlemix_jax import defaults
from circlemix_jax.weights import sources as ws
from circlemix_jax.weights.folder import FORMAT, META_FILE, VARIABLES_DIR, Log, flax_shapes, print_line
from circlemix_jax.weights.sources import ConversionError


def _closest_source(tensors: dict[str, np.ndarray], num_classes: int) -> str | None:
    scores = {s: len(set(tensors) & {e.key for e in ws.key_map(s, flax_shapes(num_classes))}) for s in ws.SOURCES}
    best = max(scores, key=scores.get)
    return best if scores[best] else None


def map_tensors(tensors: dict[str, np.ndarray], source: str, path: str,
                allow_headless: bool = False) -> tuple[dict, int | None]:
    """Maps source tensors onto the Flax tree, all or nothing.

    Args:
      tensors: source key -> array.
      source: one of `sources.SOURCES`.
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
            log: Log = print_line) -> dict:
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
        f"padding={meta['padding']} bn_eps={meta['bn_eps']} mean={ws.format_values(meta['mean'])} "
        f"std={ws.format_values(meta['std'])}")
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
