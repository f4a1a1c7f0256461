"""Readers and key maps that turn EfficientNet-B0 checkpoints of four frameworks into our Flax tree.

Every source is mapped tensor by tensor onto the tree documented in `models/efficientnet.py`.
The map is checked strictly: a file converts only when its keys are exactly the
expected ones with exactly the expected shapes, so a B1, a truncated file or a
renamed layer is refused with the full list of differences, never loaded in part.

Key layouts (s.j = stage s, repeat j; i = block 0..15; block 0 has no expansion conv):

- timm: conv_stem, bn1; blocks.s.j.{conv_pw, bn1, conv_dw, bn2, se.conv_reduce,
  se.conv_expand, conv_pwl, bn3} (block 0: conv_dw, bn1, se.*, conv_pw, bn2);
  conv_head, bn2; classifier.
- torchvision: features.0.{0,1}; features.(s+1).j.block.{0: expand, 1: depthwise,
  2: SE fc1/fc2, 3: project} (block 0 shifts down one slot); features.8.{0,1}; classifier.1.
- efficientnet_pytorch: _conv_stem, _bn0; _blocks.i.{_expand_conv, _bn0, _depthwise_conv,
  _bn1, _se_reduce, _se_expand, _project_conv, _bn2}; _conv_head, _bn1; _fc.
- keras: stem_conv, stem_bn; block{s+1}{a,b,...}_{expand_conv, expand_bn, dwconv, bn,
  se_reduce, se_expand, project_conv, project_bn}; top_conv, top_bn; predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from circlemix_jax.defaults import IMAGENET_STD
from circlemix_jax.errors import InputError
from circlemix_jax.models import B0_STAGES

SOURCES = ("timm", "torchvision", "efficientnet_pytorch", "keras")
TIMM_ARCHS = ("efficientnet_b0", "tf_efficientnet_b0")
# Keras' constant for the EfficientNet normalisation quirk (tensorflow#49930).
KERAS_EPSILON = 1e-7  # Normalization divides by max(sqrt(var), backend.epsilon()).


class ConversionError(InputError):
    """The checkpoint cannot be converted; the message names the file and the keys."""


@dataclasses.dataclass(frozen=True)
class Arch:
    """How a family of weights runs: what `EfficientNetB0` must be built with."""

    source: str
    arch: str
    padding: str
    bn_eps: float


ARCHS = {
    ("timm", "efficientnet_b0"): Arch("timm", "efficientnet_b0", "symmetric", 1e-5),
    ("timm", "tf_efficientnet_b0"): Arch("timm", "tf_efficientnet_b0", "same", 1e-3),
    ("torchvision", "efficientnet_b0"): Arch("torchvision", "efficientnet_b0", "symmetric", 1e-5),
    ("efficientnet_pytorch", "efficientnet-b0"): Arch("efficientnet_pytorch", "efficientnet-b0", "same", 1e-3),
    # eps as stored in a full-model file's config; 1e-3 (Keras' default) for weights-only files.
    ("keras", "EfficientNetB0"): Arch("keras", "EfficientNetB0", "same", 1e-3),
}


# ---------------------------------------------------------------- target layout

def flax_modules() -> list[tuple[str, str, tuple[int, int, int] | None]]:
    """(Flax module path, kind, (block, stage, repeat) or None) in forward order.

    Kinds: 'conv' (kernel), 'dw' (depthwise kernel), 'se' (kernel, bias), 'bn', 'dense'.
    """
    mods: list[tuple[str, str, tuple[int, int, int] | None]] = [("stem_conv", "conv", None), ("stem_bn", "bn", None)]
    i = 0
    for s, (expand, *_rest, repeats) in enumerate(B0_STAGES):
        for j in range(repeats):
            pos = (i, s, j)
            if expand != 1:
                mods += [(f"blocks_{i}/expand_conv", "conv", pos), (f"blocks_{i}/expand_bn", "bn", pos)]
            mods += [(f"blocks_{i}/dw_conv", "dw", pos), (f"blocks_{i}/dw_bn", "bn", pos),
                     (f"blocks_{i}/se_reduce", "se", pos), (f"blocks_{i}/se_expand", "se", pos),
                     (f"blocks_{i}/project_conv", "conv", pos), (f"blocks_{i}/project_bn", "bn", pos)]
            i += 1
    return mods + [("head_conv", "conv", None), ("head_bn", "bn", None), ("classifier", "dense", None)]


def _leaf(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _timm_prefix(module: str, pos) -> str:
    fixed = {"stem_conv": "conv_stem", "stem_bn": "bn1", "head_conv": "conv_head", "head_bn": "bn2",
             "classifier": "classifier"}
    if module in fixed:
        return fixed[module]
    i, s, j = pos
    names = ({"dw_conv": "conv_dw", "dw_bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"} if i == 0 else
             {"expand_conv": "conv_pw", "expand_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
              "project_conv": "conv_pwl", "project_bn": "bn3"})
    names |= {"se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand"}
    return f"blocks.{s}.{j}.{names[_leaf(module)]}"


def _torchvision_prefix(module: str, pos) -> str:
    fixed = {"stem_conv": "features.0.0", "stem_bn": "features.0.1", "head_conv": "features.8.0",
             "head_bn": "features.8.1", "classifier": "classifier.1"}
    if module in fixed:
        return fixed[module]
    i, s, j = pos
    o = 0 if i == 0 else 1  # block 0 has no expand conv, so every later layer shifts down one slot
    names = {"expand_conv": "0.0", "expand_bn": "0.1", "dw_conv": f"{o}.0", "dw_bn": f"{o}.1",
             "se_reduce": f"{o + 1}.fc1", "se_expand": f"{o + 1}.fc2",
             "project_conv": f"{o + 2}.0", "project_bn": f"{o + 2}.1"}
    return f"features.{s + 1}.{j}.block.{names[_leaf(module)]}"


def _effnet_pytorch_prefix(module: str, pos) -> str:
    fixed = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1",
             "classifier": "_fc"}
    if module in fixed:
        return fixed[module]
    names = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dw_conv": "_depthwise_conv", "dw_bn": "_bn1",
             "se_reduce": "_se_reduce", "se_expand": "_se_expand", "project_conv": "_project_conv",
             "project_bn": "_bn2"}
    return f"_blocks.{pos[0]}.{names[_leaf(module)]}"


def _keras_prefix(module: str, pos) -> str:
    fixed = {"stem_conv": "stem_conv", "stem_bn": "stem_bn", "head_conv": "top_conv", "head_bn": "top_bn",
             "classifier": "predictions"}
    if module in fixed:
        return fixed[module]
    _, s, j = pos
    leaf = {"dw_conv": "dwconv", "dw_bn": "bn"}.get(_leaf(module), _leaf(module))
    return f"block{s + 1}{chr(97 + j)}_{leaf}"


# (Flax leaf, torch suffix, Keras suffix) per kind.
_LEAVES = {
    "conv": [("params", "kernel", "weight", "kernel")],
    "dw": [("params", "kernel", "weight", "kernel")],
    "se": [("params", "kernel", "weight", "kernel"), ("params", "bias", "bias", "bias")],
    "dense": [("params", "kernel", "weight", "kernel"), ("params", "bias", "bias", "bias")],
    "bn": [("params", "scale", "weight", "gamma"), ("params", "bias", "bias", "beta"),
           ("batch_stats", "mean", "running_mean", "moving_mean"),
           ("batch_stats", "var", "running_var", "moving_variance")],
}

# Source array -> Flax array, and Flax shape -> the source shape it must come from.
_TORCH = {
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    "dw": (lambda a: a[:, 0].transpose(1, 2, 0), lambda s: (s[2], 1, s[0], s[1])),
    "dense": (lambda a: a.T, lambda s: (s[1], s[0])),
}
_TORCH["se"] = _TORCH["conv"]
_KERAS = {
    "dw": (lambda a: a[..., 0], lambda s: (*s, 1)),
}
_SAME = (lambda a: a, tuple)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One source tensor and where it lands."""

    key: str
    path: tuple[str, ...]  # ('params' | 'batch_stats', module..., leaf)
    convert: Callable[[np.ndarray], np.ndarray]
    source_shape: tuple[int, ...]


_PREFIX = {"timm": _timm_prefix, "torchvision": _torchvision_prefix,
           "efficientnet_pytorch": _effnet_pytorch_prefix, "keras": _keras_prefix}


def classifier_bias_key(source: str) -> str:
    """The source key of the classifier bias (its length is the number of classes)."""
    prefix = _PREFIX[source]("classifier", None)
    return f"{prefix}/bias" if source == "keras" else f"{prefix}.bias"


def key_map(source: str, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[Entry]:
    """Every tensor `source` must provide, with its conversion and expected shape.

    Args:
      source: one of `SOURCES`.
      shapes: Flax shape per path (collection, module..., leaf), e.g. from `jax.eval_shape`.
    """
    entries = []
    for module, kind, pos in flax_modules():
        prefix = _PREFIX[source](module, pos)
        for collection, leaf, torch_name, keras_name in _LEAVES[kind]:
            path = (collection, *module.split("/"), leaf)
            is_array = leaf == "kernel"
            if source == "keras":
                fn, shape_fn = _KERAS.get(kind, _SAME) if is_array else _SAME
                key = f"{prefix}/{keras_name}"
            else:
                fn, shape_fn = _TORCH.get(kind, _SAME) if is_array else _SAME
                key = f"{prefix}.{torch_name}"
            entries.append(Entry(key, path, fn, tuple(shape_fn(shapes[path]))))
    return entries


# ---------------------------------------------------------------- file readers

def read_torch_like(path: str, log: Callable[[str], None]) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file, or of a torch pickle (.pth/.bin/.pt), as numpy."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # any parse failure is a bad file
            raise ConversionError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); "
                                  "is it truncated or not a safetensors file?") from None
    try:
        import torch  # optional: only .pth/.bin need it
    except ImportError:
        raise ConversionError(f"reading {path} needs PyTorch (pip install 'circlemix-jax[torch]'); "
                              "a .safetensors file needs no torch") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConversionError(f"cannot read {path} with torch.load ({type(e).__name__}: {first}); "
                              "is it truncated, or not a state dict?") from None
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            log(f"{path}: using the weights under '{wrapper}'")
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _h5_attr_list(group, name: str) -> list[str] | None:
    """A string-list attribute, including Keras' chunked form (`name0`, `name1`, ...)."""
    if name in group.attrs:
        values = list(group.attrs[name])
    elif f"{name}0" in group.attrs:
        values, n = [], 0
        while f"{name}{n}" in group.attrs:
            values += list(group.attrs[f"{name}{n}"])
            n += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


@dataclasses.dataclass
class KerasFile:
    """What a legacy Keras HDF5 file holds."""

    tensors: dict[str, np.ndarray]  # 'layer/weight' with Keras 2 and 3 names unified
    layer_names: list[str]
    layer_configs: list[dict]  # from 'model_config' in a full-model save; [] for weights-only files


def read_keras_h5(path: str) -> KerasFile:
    """Reads the legacy HDF5 layout (`layer_names` / `weight_names`) of Keras 2 and 3.

    Weight names such as 'block1a_dwconv/depthwise_kernel:0' (Keras 2) and
    'block1a_dwconv/kernel' (Keras 3) both become 'block1a_dwconv/kernel'.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise ConversionError(f"cannot open {path} as HDF5 ({type(e).__name__}: {e}); "
                              "is it truncated, or not a Keras .h5 file?") from None
    with f:
        configs = []
        if "model_config" in f.attrs:
            raw = f.attrs["model_config"]
            cfg = json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
            configs = cfg.get("config", {}).get("layers", [])
        group = f["model_weights"] if "model_weights" in f else f
        layer_names = _h5_attr_list(group, "layer_names")
        if layer_names is None:
            raise ConversionError(f"{path} is not a legacy Keras HDF5 weights file (no 'layer_names' attribute); "
                                  "the Keras 3 '.weights.h5' format is not supported, re-save with model.save('x.h5')")
        tensors: dict[str, np.ndarray] = {}
        try:
            for layer in layer_names:
                for wname in _h5_attr_list(group[layer], "weight_names") or []:
                    short = wname.rsplit("/", 1)[-1].split(":")[0]
                    short = "kernel" if short == "depthwise_kernel" else short
                    key = f"{layer}/{short}"
                    if key in tensors:
                        raise ConversionError(f"{path}: layer {layer} has two weights named {short}")
                    tensors[key] = np.asarray(group[layer][wname], dtype=np.float32)
        except (KeyError, OSError, ValueError) as e:
            raise ConversionError(f"cannot read the weights of {path} ({type(e).__name__}: {e}); "
                                  "is it truncated?") from None
    return KerasFile(tensors, layer_names, configs)


def timm_config(path: str) -> dict:
    """The HF `config.json` beside a timm file, or {}."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.exists(cfg_path):
        return {}
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {cfg_path}: {e}") from None


# ---------------------------------------------------------------- Keras preprocessing

def format_values(values) -> str:
    """A short '[0.485, 0.456, 0.406]' of a few numbers, for log lines."""
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _per_channel(value, n: int = 3) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, np.float64).reshape(-1), (n,)).copy()


def keras_input_normalisation(kf: KerasFile, log: Callable[[str], None]) -> tuple[list[float], list[float], dict]:
    """Mean/std on x = pixels/255 that reproduce the file's Rescaling -> Normalization -> [Rescaling].

    Keras computes y = ((pixels*s1 + o1) - m) / max(sqrt(v), 1e-7) * s2 + o2, with
    s1 = 1/255 and, only in models built with weights='imagenet', a second
    Rescaling s2 = 1/sqrt(IMAGENET_STDDEV_RGB): the keras-applications files store
    the ImageNet *std* as the variance (tensorflow#49930), and Keras compensates.
    Rescaling layers hold no weights, so their factors come from the file's
    model_config when present, else from Keras' EfficientNet definition.

    Returns:
      (mean, std, the raw statistics for meta.json).
    """
    def is_kind(name: str, kind: str) -> bool:
        return name == kind or (name.startswith(kind + "_") and name[len(kind) + 1:].isdigit())

    norm = next((n for n in kf.layer_names if is_kind(n, "normalization")), None)
    cfg_by_name = {c.get("config", {}).get("name"): c for c in kf.layer_configs}
    m, v = np.zeros(3), np.ones(3)
    if norm is not None:
        cfg = cfg_by_name.get(norm, {}).get("config", {})

        def stat(name: str, default: float) -> np.ndarray:
            # Built with mean=/variance= (Keras 3), the statistics live in the config, not in weights.
            if f"{norm}/{name}" in kf.tensors:
                return _per_channel(kf.tensors.pop(f"{norm}/{name}"))
            return _per_channel(default if cfg.get(name) is None else cfg[name])

        m, v = stat("mean", 0.0), stat("variance", 1.0)
        kf.tensors.pop(f"{norm}/count", None)
    else:
        log("keras: no Normalization layer in the file; assuming none")
    rescalings = [n for n in kf.layer_names if is_kind(n, "rescaling")]
    before = [n for n in rescalings if norm is None or kf.layer_names.index(n) < kf.layer_names.index(norm)]
    after = [n for n in rescalings if n not in before]

    def factors(name: str | None, default_scale) -> tuple[np.ndarray, np.ndarray]:
        cfg = cfg_by_name.get(name, {}).get("config", {}) if name else {}
        scale, offset = cfg.get("scale"), cfg.get("offset")
        return (_per_channel(default_scale if scale is None else scale),
                _per_channel(0.0 if offset is None else offset))

    # Weightless layers are still listed in layer_names, so an absent Rescaling is truly absent.
    s1, o1 = factors(before[0] if before else None, 1 / 255 if before else 1.0)
    imagenet_file = not after and not kf.layer_configs and np.allclose(v, IMAGENET_STD, atol=1e-6)
    quirk_scale = [1 / np.sqrt(s) for s in IMAGENET_STD]
    s2, o2 = factors(after[0] if after else None, quirk_scale if after or imagenet_file else 1.0)
    if after:
        origin = ("model_config" if kf.layer_configs else
                  "not stored, so keras.applications' 1/sqrt(IMAGENET_STDDEV_RGB)")
        log(f"keras: Rescaling layer {after[0]} follows Normalization, scale {format_values(s2)} ({origin})")
    elif imagenet_file:
        log("keras: the stored variance is the ImageNet std, as in the keras.applications file, which Keras runs "
            "(weights='imagenet') with an extra Rescaling by 1/sqrt(IMAGENET_STDDEV_RGB) (tensorflow#49930); "
            "reproducing that")
    sd = np.maximum(np.sqrt(v), KERAS_EPSILON)
    a = 255.0 * s1 * s2 / sd  # y = a*x + b with x = pixels/255
    b = (o1 - m) * s2 / sd + o2
    stats = {"normalization_mean": m.tolist(), "normalization_variance": v.tolist(),
             "rescaling_before": s1.tolist(), "rescaling_after": s2.tolist() if after or imagenet_file else None}
    return (-b / a).tolist(), (1.0 / a).tolist(), stats


def keras_bn_eps(kf: KerasFile, log: Callable[[str], None]) -> float:
    """BatchNorm epsilon from model_config (all layers must agree), else Keras' default 1e-3."""
    eps = {c["config"]["epsilon"] for c in kf.layer_configs
           if c.get("class_name") == "BatchNormalization" and "epsilon" in c.get("config", {})}
    if len(eps) > 1:
        raise ConversionError(f"BatchNorm layers use different epsilons {sorted(eps)}; EfficientNetB0 has one")
    if not eps:
        log("keras: weights-only file, so BatchNorm epsilon is Keras' default 1e-3")
        return 1e-3
    return float(eps.pop())
