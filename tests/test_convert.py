"""Weight conversion: logit parity with each reference framework, and refusal of bad files.

Every reference is built offline with random weights in its own framework and
written in its own file format, then converted through the CLI. BatchNorm
affine parameters are random; running statistics are measured on noise images
(so activations stay O(1) through 16 blocks and logits are meaningful) and then
perturbed, so a wrong eps or padding moves the logits far past the bar, which
`test_wrong_padding_or_eps_would_be_caught` checks. Bar, as in issue #4:
max|Δlogit| <= 1e-4 * max(1, max|logit|), fp32, 'highest' precision (conftest).

efficientnet_pytorch and Keras (JAX backend) run in CI; timm and torchvision
skip when absent (they need the multi-GB torchvision).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import h5py
import jax
import numpy as np
import pytest

from circlemix_jax import convert, defaults
from circlemix_jax.models import EfficientNetB0
from circlemix_jax.weights import sources as ws

# Keras-on-JAX converts its variables with np.array(x), which numpy 2 flags, once per weight.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (224, 256)


@functools.cache
def _forward(model):
    """One compile per model config and input shape, shared by sources with equal settings."""
    return jax.jit(functools.partial(model.apply, train=False))


def _pixels(size: int) -> np.ndarray:
    return np.random.default_rng(size).uniform(0, 255, (1, size, size, 3)).astype(np.float32)


@dataclass
class Reference:
    out_dir: str
    logits: dict  # size -> source framework's logits for _pixels(size)

    def flax_logits(self, size: int) -> np.ndarray:
        model, variables = convert.load(self.out_dir)
        meta = convert.read_meta(self.out_dir)
        x = (_pixels(size) / 255.0 - np.float32(meta["mean"])) / np.float32(meta["std"])
        return np.asarray(_forward(model)(variables, x.astype(np.float32)))


def _run_cli(*args: str) -> None:
    assert convert.main(list(args)) == 0  # the CLI, in-process: no second JAX start-up


# ---------------------------------------------------------------- torch references

def _randomise_torch(model, seed: int) -> None:
    """Random weights and BatchNorm affine parameters; running statistics set from the data, then perturbed.

    One eval-mode pass over noise images: a hook gives each BatchNorm the mean and
    variance of its actual input, shifted by 0.2 std and scaled by U(0.6, 1.6), before
    it normalises. Later layers thus see the perturbed outputs, and the logits stay
    O(10) instead of compounding the perturbations over 49 BatchNorms.
    """
    import torch

    rng = np.random.default_rng(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn_ids = {id(m) for m in bns}
    as_t = lambda a: torch.from_numpy(np.asarray(a, np.float32))

    def set_stats(bn, inputs):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean + as_t(rng.normal(0, 0.2, mean.shape)) * var.sqrt())
        bn.running_var.copy_(var * as_t(rng.uniform(0.6, 1.6, var.shape)))

    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(mod) in bn_ids:
                    value = rng.uniform(0.5, 1.5, p.shape) if name == "weight" else rng.normal(0, 0.3, p.shape)
                elif p.ndim == 1:
                    value = rng.normal(0, 0.3, p.shape)
                else:
                    value = rng.normal(0, np.sqrt(2.0 / np.prod(p.shape[1:])), p.shape)
                p.copy_(as_t(value))
        hooks = [bn.register_forward_pre_hook(set_stats) for bn in bns]
        model.eval()
        model(as_t((rng.uniform(0, 1, (2, 3, 224, 224)) - 0.45) / 0.225))
        for h in hooks:
            h.remove()


def _torch_logits(model, mean, std) -> dict:
    import torch

    out = {}
    for size in SIZES:
        x = (_pixels(size) / 255.0 - np.float32(mean)) / np.float32(std)
        with torch.no_grad():
            out[size] = model(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)).numpy()
    return out


@pytest.fixture(scope="module")
def effnet_pytorch_ref(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'circlemix-jax[test]')")
    ep = pytest.importorskip("efficientnet_pytorch", reason="efficientnet-pytorch is not installed")
    tmp = tmp_path_factory.mktemp("effnet_pytorch")
    torch.manual_seed(0)
    model = ep.EfficientNet.from_name("efficientnet-b0", image_size=None)  # dynamic TF 'SAME' padding
    _randomise_torch(model, seed=1)
    torch.save(model.state_dict(), tmp / "efficientnet-b0-random.pth")
    _run_cli("--source", "efficientnet_pytorch", "--input", str(tmp / "efficientnet-b0-random.pth"),
             "--output", str(tmp / "out"))
    return Reference(str(tmp / "out"), _torch_logits(model, defaults.IMAGENET_MEAN, defaults.IMAGENET_STD))


def _timm_reference(arch: str, tmp_path_factory) -> Reference:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs the multi-GB torchvision)")
    tmp = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    _randomise_torch(model, seed=2)
    if arch == "efficientnet_b0":  # safetensors + --arch
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        _run_cli("--source", "timm", "--input", str(tmp / "model.safetensors"), "--arch", arch,
                 "--output", str(tmp / "out"))
        mean, std = defaults.IMAGENET_MEAN, defaults.IMAGENET_STD
    else:  # pytorch_model.bin + the HF config.json, which sets the arch and (here unusual) mean/std
        torch.save(model.state_dict(), tmp / "pytorch_model.bin")
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        (tmp / "config.json").write_text(json.dumps(
            {"architecture": arch, "num_classes": 1000, "pretrained_cfg": {"mean": mean, "std": std}}))
        _run_cli("--source", "timm", "--input", str(tmp / "pytorch_model.bin"), "--output", str(tmp / "out"))
    return Reference(str(tmp / "out"), _torch_logits(model, mean, std))


@pytest.fixture(scope="module")
def timm_ref(tmp_path_factory):
    return _timm_reference("efficientnet_b0", tmp_path_factory)


@pytest.fixture(scope="module")
def timm_tf_ref(tmp_path_factory):
    return _timm_reference("tf_efficientnet_b0", tmp_path_factory)


@pytest.fixture(scope="module")
def torchvision_ref(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed (a multi-GB build)")
    tmp = tmp_path_factory.mktemp("torchvision")
    torch.manual_seed(0)
    model = tv.models.efficientnet_b0(weights=None)
    _randomise_torch(model, seed=3)
    torch.save(model.state_dict(), tmp / "efficientnet_b0_random.pth")
    _run_cli("--source", "torchvision", "--input", str(tmp / "efficientnet_b0_random.pth"),
             "--output", str(tmp / "out"))
    return Reference(str(tmp / "out"), _torch_logits(model, defaults.IMAGENET_MEAN, defaults.IMAGENET_STD))


# ---------------------------------------------------------------- Keras reference

def _keras_h5_variants(full: str, tmp) -> dict[str, str]:
    """From a Keras 3 `model.save('x.h5')`: weights-only files as keras-applications ships them.

    'weights': Keras 3 names; 'keras2': Keras 2 names ('.../depthwise_kernel:0');
    'notop': without avg_pool/top_dropout/predictions, like `_notop.h5`.
    """
    paths = {k: str(tmp / f"{k}.h5") for k in ("weights", "keras2", "notop")}
    with h5py.File(full, "r") as src:
        g = src["model_weights"]
        layers = [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]
        for kind, path in paths.items():
            keep = [n for n in layers if kind != "notop" or n not in ("avg_pool", "top_dropout", "predictions")]
            with h5py.File(path, "w") as dst:
                dst.attrs["layer_names"] = [n.encode() for n in keep]
                for layer in keep:
                    names = [n.decode() if isinstance(n, bytes) else n for n in g[layer].attrs["weight_names"]]
                    new = names
                    if kind == "keras2":
                        new = [n.replace("/kernel", "/depthwise_kernel") if layer.endswith("_dwconv") else n
                               for n in names]
                        new = [n + ":0" for n in new]
                    grp = dst.create_group(layer)
                    grp.attrs["weight_names"] = [n.encode() for n in new]
                    for old, name in zip(names, new):
                        grp[name] = g[layer][old][()]
    return paths


def _randomise_keras(keras, model, rng) -> None:
    for layer in model.layers:
        for w in layer.weights:
            name, shape = w.path.rsplit("/", 1)[-1], tuple(w.shape)
            if isinstance(layer, keras.layers.Normalization):
                value = {"mean": rng.uniform(0.3, 0.6, shape), "variance": rng.uniform(0.03, 0.1, shape)}.get(name)
            elif name == "gamma":
                value = rng.uniform(0.5, 1.5, shape)
            elif name in ("beta", "bias"):
                value = rng.normal(0, 0.3, shape)
            elif name == "kernel":
                dw = isinstance(layer, keras.layers.DepthwiseConv2D)
                value = rng.normal(0, np.sqrt(2.0 / (np.prod(shape[:2]) if dw else np.prod(shape[:-1]))), shape)
            else:
                value = None  # BatchNorm moving stats: calibrated below
            if value is not None:
                w.assign(value.astype(np.float32))
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # what load_weights does; the layer caches mean/variance
    # Calibrate: one training-mode pass with momentum 0 makes moving stats = batch stats.
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    for bn in bns:
        bn.momentum = 0.0
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    calib = rng.uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    _, ntv = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=True))(tv, ntv, calib)
    for v, value in zip(model.non_trainable_variables, ntv):
        v.assign(value)
    for bn in bns:
        var = np.asarray(bn.moving_variance)
        bn.moving_mean.assign(np.asarray(bn.moving_mean) + rng.normal(0, 0.2, var.shape) * np.sqrt(var))
        bn.moving_variance.assign(var * rng.uniform(0.6, 1.6, var.shape))


@pytest.fixture(scope="module")
def keras_ref(tmp_path_factory):
    os.environ["KERAS_BACKEND"] = "jax"  # must precede the first import of keras
    keras = pytest.importorskip("keras", reason="keras is not installed (pip install 'circlemix-jax[test]')")
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
    tmp = tmp_path_factory.mktemp("keras")
    with pytest.MonkeyPatch.context() as mp:
        try:  # speed only: Keras compiles one initializer per shape (~40 s); every weight is overwritten below
            from keras.src.applications import efficientnet as kapp

            mp.setattr(kapp, "CONV_KERNEL_INITIALIZER", "zeros")
            mp.setattr(kapp, "DENSE_KERNEL_INITIALIZER", "zeros")
        except (ImportError, AttributeError):
            pass
        model = keras.applications.EfficientNetB0(weights=None, classifier_activation=None)
    _randomise_keras(keras, model, np.random.default_rng(4))
    full = str(tmp / "full.h5")
    model.save(full)  # the legacy HDF5 layout, with model_config
    paths = _keras_h5_variants(full, tmp)
    model.load_weights(paths["weights"])  # the reference computes exactly what the file holds
    # The model is built for 224 px; all its stride-2 inputs are even at 256 px too, so its
    # static ZeroPadding is the same there.
    logits = {size: np.asarray(model.predict(_pixels(size), verbose=0)) for size in SIZES}
    _run_cli("--source", "keras", "--input", paths["weights"], "--output", str(tmp / "out"))
    return Reference(str(tmp / "out"), logits), {**paths, "full": full}, tmp


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fixture", ["effnet_pytorch_ref", "keras_ref", "timm_ref", "timm_tf_ref", "torchvision_ref"])
def test_logit_parity(fixture, size, request):
    ref = request.getfixturevalue(fixture)
    ref = ref[0] if isinstance(ref, tuple) else ref
    got, want = ref.flax_logits(size), ref.logits[size]
    diff, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    meta = convert.read_meta(ref.out_dir)
    print(f"\nPARITY {meta['source']} {meta['arch']} {size}px: max|logit| {scale:.4g}, max|diff| {diff:.3g}, "
          f"bar {1e-4 * max(1.0, scale):.3g}")
    assert diff <= 1e-4 * max(1.0, scale)


def test_wrong_padding_or_eps_would_be_caught(effnet_pytorch_ref):
    model, variables = convert.load(effnet_pytorch_ref.out_dir)
    meta = convert.read_meta(effnet_pytorch_ref.out_dir)
    x = ((_pixels(224) / 255.0 - np.float32(meta["mean"])) / np.float32(meta["std"])).astype(np.float32)
    want = effnet_pytorch_ref.logits[224]
    for wrong in (model.clone(padding="symmetric"), model.clone(bn_eps=1e-5)):
        diff = np.abs(np.asarray(_forward(wrong)(variables, x)) - want).max()
        assert diff > 100 * 1e-4 * max(1.0, np.abs(want).max()), wrong


def test_meta_records_architecture(effnet_pytorch_ref):
    meta = convert.read_meta(effnet_pytorch_ref.out_dir)
    assert (meta["source"], meta["padding"], meta["bn_eps"], meta["num_classes"]) == (
        "efficientnet_pytorch", "same", 1e-3, 1000)
    assert meta["mean"] == pytest.approx(defaults.IMAGENET_MEAN) and meta["std"] == pytest.approx(defaults.IMAGENET_STD)


def _leaves(directory):
    return jax.tree_util.tree_leaves_with_path(convert.load_backbone(directory)[1])


def test_keras_layouts_agree(keras_ref):
    """Keras 2 names, a full-model save and a _notop file all give the same backbone."""
    ref, paths, tmp = keras_ref
    want = _leaves(ref.out_dir)
    for kind in ("keras2", "full", "notop"):
        _run_cli("--source", "keras", "--input", paths[kind], "--output", str(tmp / f"out_{kind}"))
        got = _leaves(str(tmp / f"out_{kind}"))
        assert [p for p, _ in got] == [p for p, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want)), kind
    full, weights_only = convert.read_meta(str(tmp / "out_full")), convert.read_meta(ref.out_dir)
    assert full["bn_eps"] == weights_only["bn_eps"] == 1e-3  # from model_config / Keras' default
    assert full["mean"] == pytest.approx(weights_only["mean"]) and full["std"] == pytest.approx(weights_only["std"])
    assert not convert.read_meta(str(tmp / "out_notop"))["has_classifier"]
    with pytest.raises(ws.ConversionError, match="without classifier"):
        convert.load(str(tmp / "out_notop"))


def test_keras_applications_normalisation_quirk():
    """keras-applications files store the ImageNet std as the variance; Keras divides by sqrt twice."""
    stats = {"normalization/mean": np.float32(defaults.IMAGENET_MEAN),
             "normalization/variance": np.float32(defaults.IMAGENET_STD),
             "normalization/count": np.float32(0)}
    layers = ["input_1", "rescaling", "normalization", "stem_conv_pad"]
    mean, std, _ = ws.keras_input_normalisation(ws.KerasFile(dict(stats), layers, []), print)
    assert mean == pytest.approx(defaults.IMAGENET_MEAN, abs=1e-6)
    assert std == pytest.approx(defaults.IMAGENET_STD, abs=1e-6)
    # A model saved with its config: the second Rescaling's factors are read, not assumed.
    configs = [{"class_name": "Rescaling", "config": {"name": "rescaling", "scale": 1 / 255, "offset": 0.0}},
               {"class_name": "Rescaling", "config": {"name": "rescaling_1", "scale": 2.0, "offset": 0.0}}]
    mean, std, _ = ws.keras_input_normalisation(
        ws.KerasFile(dict(stats), layers[:3] + ["rescaling_1"] + layers[3:], configs), print)
    assert std == pytest.approx(np.sqrt(defaults.IMAGENET_STD) / 2, abs=1e-6)


# ---------------------------------------------------------------- training hooks

def test_init_backbone_keeps_fresh_classifier(effnet_pytorch_ref):
    from circlemix_jax import defaults

    directory = effnet_pytorch_ref.out_dir
    abstract = jax.eval_shape(EfficientNetB0(5).init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    fresh = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7.0, s.dtype), dict(abstract))
    logs = []
    merged = convert.init_backbone(directory, fresh, log=logs.append)
    _, backbone = convert.load_backbone(directory)
    assert np.all(merged["params"]["classifier"]["kernel"] == 7.0) and "classifier" not in backbone["params"]
    assert np.array_equal(merged["batch_stats"]["head_bn"]["var"], backbone["batch_stats"]["head_bn"]["var"])
    assert len(logs) == 1 and "classifier" in logs[0]
    del fresh["params"]["head_bn"]
    with pytest.raises(ws.ConversionError, match="head_bn"):
        convert.init_backbone(directory, fresh)

    config = defaults.get_config("c5")
    config.model.init_from = directory
    convert.override_config(config, log=logs.append)
    assert (config.model.padding, config.model.bn_eps) == ("same", 1e-3)
    assert list(config.data.mean) == pytest.approx(defaults.IMAGENET_MEAN)
    assert any("padding" in line for line in logs)


# ---------------------------------------------------------------- refusals

def _cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "circlemix_jax.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_clean_refusal(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(err) == 1 and err[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in err[0]
    return err[0]


@pytest.fixture(scope="module")
def b0_state_dict():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    ep = pytest.importorskip("efficientnet_pytorch", reason="efficientnet-pytorch is not installed")
    torch.manual_seed(0)
    return ep.EfficientNet.from_name("efficientnet-b0").state_dict()


def test_b1_checkpoint_is_refused(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    ep = pytest.importorskip("efficientnet_pytorch", reason="efficientnet-pytorch is not installed")
    torch.save(ep.EfficientNet.from_name("efficientnet-b1").state_dict(), tmp_path / "b1.pth")
    proc = _cli_subprocess("--source", "efficientnet_pytorch", "--input", str(tmp_path / "b1.pth"),
                           "--output", str(tmp_path / "out"))
    line = _assert_clean_refusal(proc, str(tmp_path / "b1.pth"), "unexpected", "_blocks.22._project_conv.weight")
    assert "shape-mismatched" in line and "nothing was converted" in line
    assert not os.path.exists(tmp_path / "out" / convert.META_FILE)


def test_truncated_file_is_refused(tmp_path, b0_state_dict):
    import torch

    torch.save(b0_state_dict, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    proc = _cli_subprocess("--source", "efficientnet_pytorch", "--input", str(tmp_path / "cut.pth"),
                           "--output", str(tmp_path / "out"))
    _assert_clean_refusal(proc, str(tmp_path / "cut.pth"), "truncated")
    assert not os.path.exists(tmp_path / "out")


def test_missing_unexpected_and_misshapen_keys_are_all_listed(tmp_path, b0_state_dict, capsys):
    import torch

    sd = dict(b0_state_dict)
    del sd["_blocks.3._bn1.running_var"], sd["_fc.bias"]
    sd["_blocks.5._extra.weight"] = torch.zeros(3)
    sd["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--source", "efficientnet_pytorch", "--input", str(tmp_path / "bad.pth"),
                      "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for needle in ("2 missing", "_blocks.3._bn1.running_var", "_fc.bias", "1 unexpected", "_blocks.5._extra.weight",
                   "1 shape-mismatched", "_conv_head.weight (1280, 321, 1, 1) != (1280, 320, 1, 1)"):
        assert needle in err
    assert not os.path.exists(tmp_path / "out" / convert.META_FILE)


def _refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_other_refusals(tmp_path, b0_state_dict, capsys, monkeypatch):
    import torch
    from safetensors.numpy import save_file

    torch.save(b0_state_dict, tmp_path / "b0.pth")
    save_file({"conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)}, str(tmp_path / "model.safetensors"))
    out = str(tmp_path / "out")
    assert "--source efficientnet_pytorch" in _refusal(
        capsys, "--source", "torchvision", "--input", str(tmp_path / "b0.pth"), "--output", out)
    assert "pass --arch" in _refusal(capsys, "--source", "timm", "--input", str(tmp_path / "model.safetensors"),
                                     "--output", out)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    assert "cut.safetensors" in _refusal(capsys, "--source", "timm", "--arch", "efficientnet_b0",
                                         "--input", str(tmp_path / "cut.safetensors"), "--output", out)
    (tmp_path / "cut.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    assert "cut.h5" in _refusal(capsys, "--source", "keras", "--input", str(tmp_path / "cut.h5"), "--output", out)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert "needs PyTorch" in _refusal(capsys, "--source", "efficientnet_pytorch", "--input",
                                       str(tmp_path / "b0.pth"), "--output", out)
    os.makedirs(out)
    open(os.path.join(out, convert.META_FILE), "w").close()
    assert "--force" in _refusal(capsys, "--source", "efficientnet_pytorch", "--input", str(tmp_path / "b0.pth"),
                                 "--output", out)
