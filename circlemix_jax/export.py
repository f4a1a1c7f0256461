"""A finished run as a portable StableHLO artefact, and the Python API that loads it.

    python -m circlemix_jax.export --workdir runs/binary/circlemix/fold0 --out exported/ \\
        [--platforms cpu,cuda,tpu]

writes two files to `exported/`:

- `model.mlirbc`: the inference function exported with `jax.export`, as
  StableHLO bytecode (the portable, versioned form XLA and other StableHLO
  compilers read). It takes uint8 images (N, S, S, 3), RGB 0-255, at the run's
  image size with N symbolic (any batch size), and returns float32 softmax
  probabilities (N, K) over the run's classes. The weights are constants in
  it, and it is lowered for every platform in --platforms.
- `model.json`: class names, image size, the preprocessing the function
  applies itself (and the resize that callers must do, as predict does), the
  run's provenance, and the few `jax.export` calling-convention fields needed
  to call the module again.

`load(DIR)` returns a callable on numpy images; it needs JAX and numpy only,
none of this project's model code. `circlemix_jax.load_run(WORKDIR)` returns
the same callable straight from a run folder.

Why not `Exported.serialize()`: it needs the `flatbuffers` package, which JAX
does not install. The module bytes are the same; `load` rebuilds the
`jax.export.Exported` around them from a template export of a trivial
function with the same signature, replacing only the documented fields that
describe the module. With flatbuffers installed, `exported(workdir).serialize()`
gives JAX's own single-file form.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import numpy as np

from circlemix_jax.errors import InputError

FORMAT = "circlemix_jax.export/1"
MODULE_FILE = "model.mlirbc"
META_FILE = "model.json"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


class Predictor:
    """Class probabilities of uint8 RGB images: `predictor(images) -> (N, K) float32 numpy`.

    Attributes:
      class_names: the K output classes, in output order.
      image_size: S; images must be (N, S, S, 3) uint8 (resize them as `pipeline.load_image` does).
      meta: the whole `model.json` (provenance included).
    """

    def __init__(self, fn, meta: dict):
        self._fn = fn
        self.meta = meta
        self.class_names = list(meta["class_names"])
        self.image_size = int(meta["image_size"])

    def __call__(self, images) -> np.ndarray:
        x = np.asarray(images)
        s = self.image_size
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 images of shape (N, {s}, {s}, 3), got {x.dtype} {x.shape}")
        return np.asarray(self._fn(x))

    def __repr__(self) -> str:
        return f"Predictor({self.class_names}, {self.image_size} px, from {self.meta['provenance']['workdir']})"


def _signature(size: int, platforms):
    import jax
    from jax import export as jax_export

    return jax_export.symbolic_shape(f"batch, {size}, {size}, 3"), jax.numpy.uint8, tuple(platforms)


def exported(workdir: str, platforms=DEFAULT_PLATFORMS):
    """The run's inference function as a `jax.export.Exported` (symbolic batch) and its `model.json` dict.

    Raises:
      InputError: no run or no best checkpoint.
    """
    import jax
    from jax import export as jax_export

    from circlemix_jax import inference, provenance

    run = inference.load(workdir)
    shape, dtype, platforms = _signature(run.image_size, platforms)
    fn = jax.jit(lambda images: inference.probabilities(run, images))
    exp = jax_export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(shape, dtype))
    config = run.config
    meta = {
        "format": FORMAT,
        "class_names": run.class_names,
        "class_ids": [int(c) for c in config.classes],
        "all_class_names": list(config.class_names),
        "image_size": run.image_size,
        "input": {"dtype": "uint8", "layout": "NHWC", "shape": ["batch", run.image_size, run.image_size, 3],
                  "channels": "RGB"},
        "output": {"dtype": "float32", "shape": ["batch", len(run.class_names)], "meaning": "softmax probabilities"},
        "preprocessing": {
            "caller": "decode to RGB (alpha composited on white) and resize to image_size x image_size with "
                      "PIL bilinear, as circlemix_jax.data.pipeline.load_image",
            "inside": "x / 255, then circlemix_jax.colour.model_input: (x - mean) / std per channel when "
                      "input_norm is 'dataset', else a per-image standardisation",
            "input_norm": config.data.get("input_norm", "dataset"),
            "mean": list(config.data.mean), "std": list(config.data.std),
        },
        "provenance": {**provenance.describe(run.workdir, config), "checkpoint_step": run.step},
        "platforms": list(exp.platforms),
        "calling_convention_version": exp.calling_convention_version,
        "module_kept_var_idx": list(exp.module_kept_var_idx),
        "uses_global_constants": bool(exp.uses_global_constants),
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return exp, meta


def write(workdir: str, out_dir: str, platforms=DEFAULT_PLATFORMS) -> dict:
    """Exports the run into `out_dir` (created); returns the metadata written.

    Raises:
      InputError: no run, or `out_dir` cannot be written.
    """
    exp, meta = exported(workdir, platforms)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, MODULE_FILE), "wb") as f:
            f.write(exp.mlir_module_serialized)
        with open(os.path.join(out_dir, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
    except OSError as e:
        raise InputError(f"cannot write --out {out_dir}: {e.strerror or e}") from None
    return meta


def load(out_dir: str) -> Predictor:
    """The exported model in `out_dir` as a `Predictor`; needs JAX and numpy only.

    The `jax.export.Exported` is rebuilt from a template: a trivial function
    with the artefact's signature, exported for the same platforms, has the
    same argument and result structure, avals and (unspecified) shardings;
    only the module and the fields describing it are replaced.

    Raises:
      FileNotFoundError: `out_dir` lacks model.mlirbc or model.json.
      ValueError: a model.json of another format.
    """
    import jax
    from jax import export as jax_export

    with open(os.path.join(out_dir, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out_dir}/{META_FILE} is not a {FORMAT} artefact (format {meta.get('format')!r})")
    with open(os.path.join(out_dir, MODULE_FILE), "rb") as f:
        module = f.read()
    shape, dtype, platforms = _signature(meta["image_size"], meta["platforms"])
    k = len(meta["class_names"])
    template = jax_export.export(jax.jit(lambda x: jax.numpy.zeros((x.shape[0], k), jax.numpy.float32)),
                                 platforms=platforms)(jax.ShapeDtypeStruct(shape, dtype))
    exp = dataclasses.replace(
        template, fun_name="probabilities", mlir_module_serialized=module,
        calling_convention_version=meta["calling_convention_version"],
        module_kept_var_idx=tuple(meta["module_kept_var_idx"]), uses_global_constants=meta["uses_global_constants"])
    return Predictor(jax.jit(exp.call), meta)


def from_workdir(workdir: str) -> Predictor:
    """The same `Predictor` as `load`, straight from a run folder (no files written)."""
    import jax

    from circlemix_jax import inference, provenance

    run = inference.load(workdir)
    meta = {"class_names": run.class_names, "image_size": run.image_size,
            "provenance": {**provenance.describe(run.workdir, run.config), "checkpoint_step": run.step}}
    return Predictor(jax.jit(lambda images: inference.probabilities(run, images)), meta)


def run() -> None:
    """CLI entry; flags are defined here so importing this module defines none."""
    from absl import app, flags

    from circlemix_jax import cli, provenance

    workdir = flags.DEFINE_string("workdir", None, "Finished run whose best checkpoint is exported.")
    out = flags.DEFINE_string("out", None, "Folder to write model.mlirbc and model.json to.")
    platforms = flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                                  "Platforms to lower for (jax.export names: cpu, cuda, rocm, tpu).")
    flags.mark_flags_as_required(["workdir", "out"])

    @cli.command
    def main() -> None:
        known = {"cpu", "cuda", "rocm", "tpu"}
        if not platforms.value or not set(platforms.value) <= known:
            raise InputError(f"--platforms must be a comma-separated subset of {sorted(known)}, "
                             f"got {platforms.value}")
        cli.configure_compilation_cache()
        meta = write(workdir.value, out.value, platforms.value)
        print(provenance.line(meta["provenance"]), flush=True)
        for warning in provenance.warnings(meta["provenance"]):
            print(warning, flush=True)
        print(f"wrote {os.path.join(out.value, MODULE_FILE)} ({', '.join(meta['platforms'])}; uint8 "
              f"(batch, {meta['image_size']}, {meta['image_size']}, 3) -> probabilities of "
              f"{', '.join(meta['class_names'])}) and {META_FILE}", flush=True)

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
