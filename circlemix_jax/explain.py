"""Saliency maps: where in a glomerulus patch the model found its evidence.

    python -m circlemix_jax.explain --workdir runs/binary/circlemix/fold0 \\
        (--manifest M.csv | --images DIR) --out cam.png [--max-images 16] [--target CLASS]

Writes a grid with, for each image, the patch and its heat map over it, titled
with the true class (when the manifest has labels) and the predicted class with
its probability.

The method is Grad-CAM (Selvaraju et al., 2017) on the last convolutional stage
(`head_conv` -> `head_bn` -> SiLU: 1280 channels at 1/32 of the image side),
for the *centred* logit of the explained class (its logit minus the mean of
all logits):

- In EfficientNet-B0 that stage is followed only by global average pooling and
  the linear classifier. Grad-CAM's channel weights (the spatial mean of the
  gradient) are then the classifier's column divided by the number of
  positions, and the map before its ReLU is an exact decomposition of the
  score: score = mean over positions of the map + the bias. This is CAM (Zhou
  et al., 2016), so the map is not a gradient heuristic here but the share of
  the score each position contributes; `tests/test_explain.py` checks the
  identity against the model's own logits. The gradient is still taken with
  `jax.grad` so the map stays right if the head ever becomes non-linear.
- The centred logit, not the raw one: softmax ignores whatever all classes
  share, so only a position's contribution to the difference between classes
  is evidence for one class over the others. With two classes it is half the
  logit margin.
- Gradient-free perturbation methods (occlusion, RISE) need hundreds of forward
  passes per image; integrated gradients attribute to pixels and pick up stain
  texture. One backward pass at the stage where the features are class-specific
  answers the pathologist's question: tuft, capsule or background?

The map is 1/32 of the image side (8x8 at 256 px, 2x2 at 64 px), upsampled
bilinearly for display and scaled to each image's maximum: compare where,
within an image, not how much, between images.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from circlemix_jax import cli, inference, predict, provenance
from circlemix_jax.errors import InputError

# The module whose output (after SiLU) is the last convolutional stage's feature map.
FEATURE_MODULE = "head_bn"
HEAD = "classifier"
# Images per jitted call: bounds memory at 256 px without recompiling per image.
BATCH = 8


def features_and_head(run: inference.RunModel):
    """The model split at its last convolutional stage.

    Returns:
      (features, head): `features(x)` maps normalised images (N, S, S, 3) to the
      stage's activations (N, h, w, C) in float32; `head(a)` maps them to logits
      (N, K) as the model does (global average pooling, then the classifier).
    """
    kernel = jnp.asarray(run.variables["params"][HEAD]["kernel"], jnp.float32)
    bias = jnp.asarray(run.variables["params"][HEAD]["bias"], jnp.float32)

    def features(x):
        _, state = run.model.apply(run.variables, x, train=False,
                                   capture_intermediates=lambda m, method: m.name == FEATURE_MODULE)
        (bn_out,) = state["intermediates"][FEATURE_MODULE]["__call__"]
        return nn.silu(bn_out).astype(jnp.float32)

    def head(a):
        return jnp.mean(a, axis=(1, 2)) @ kernel + bias

    return features, head


def grad_cam(activations: jax.Array, head, target: jax.Array) -> jax.Array:
    """Grad-CAM maps of the centred logit of each image's `target` class.

    Args:
      activations: (N, h, w, C) feature maps.
      head: maps activations to logits (N, K), each image on its own.
      target: (N,) class (output index) to explain per image.

    Returns:
      (N, h, w) non-negative maps: ReLU of the channels weighted by the
      spatial mean of the score's gradient.
    """

    def score(a):
        z = head(a)
        z = z - z.mean(axis=-1, keepdims=True)
        # Summing over images is safe: each image's score depends on its own activations only.
        return jnp.take_along_axis(z, target[:, None], axis=1).sum()

    weights = jax.grad(score)(activations).mean(axis=(1, 2))
    return jax.nn.relu(jnp.einsum("nhwc,nc->nhw", activations, weights))


def make_explainer(run: inference.RunModel):
    """A jitted function of uint8 images (N, S, S, 3) and targets (N,) (-1 = the predicted class).

    Returns:
      A function returning (probabilities (N, K), explained class (N,),
      maps (N, h, w), maps upsampled to (N, S, S) and scaled to [0, 1] per image).
    """
    features, head = features_and_head(run)
    size = run.image_size

    @jax.jit
    def explain(images, target):
        a = features(inference.normalise(run.config, images))
        probs = jax.nn.softmax(head(a), axis=-1)
        target = jnp.where(target < 0, probs.argmax(-1), target)
        cam = grad_cam(a, head, target)
        up = jax.image.resize(cam, (cam.shape[0], size, size), "bilinear")
        up = up / jnp.maximum(up.max(axis=(1, 2), keepdims=True), 1e-12)
        return probs, target, cam, up

    return explain


def explain_images(run: inference.RunModel, images: np.ndarray, target: int = -1) -> dict:
    """Probabilities and Grad-CAM maps of uint8 images, in batches of `BATCH`.

    Args:
      run: the loaded model.
      images: uint8 (N, S, S, 3) at the run's image size.
      target: output index to explain, or -1 for each image's predicted class.

    Returns:
      {probs (N, K), target (N,), cam (N, h, w), overlay (N, S, S) in [0, 1]}.
    """
    images = inference.check_images(images, run.image_size)
    fn = make_explainer(run)
    parts = []
    for i in range(0, len(images), BATCH):
        chunk = images[i:i + BATCH]
        n = len(chunk)
        if n < BATCH:  # one compiled shape: pad the last batch, drop the padding after
            chunk = np.concatenate([chunk, np.zeros((BATCH - n, *chunk.shape[1:]), np.uint8)])
        out = fn(chunk, np.full(BATCH, target, np.int32))
        parts.append([np.asarray(x)[:n] for x in out])
    probs, targets, cam, up = (np.concatenate(p) for p in zip(*parts))
    return {"probs": probs, "target": targets, "cam": cam, "overlay": up}


def pick(labels: list[str] | None, n: int) -> list[int]:
    """Indices of up to `n` images, taking the labels in turn so every class shows (in file order)."""
    if labels is None:
        return list(range(n))
    by_label = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    queues = [by_label[y] for y in sorted(by_label)]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return sorted(out)


def figure(images, result: dict, class_names, truths, header: list[str], path: str, per_row: int = 4) -> str:
    """Writes the grid: per image the patch (titled with the truth) and its overlay (the prediction).

    Args:
      images: uint8 (N, S, S, 3).
      result: `explain_images`'s dict.
      class_names: output names.
      truths: true class names per image, or None.
      header: lines above the grid (provenance and warnings).
      path: PNG to write.
      per_row: images per row (two panels each).

    Returns:
      `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, per_row)
    rows = -(-n // cols)
    header_in = 0.15 * len(header) + 0.05  # inches of text above the grid
    height = 2.6 * rows + header_in
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.2 * 2 * cols, height), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        probs, t = result["probs"][i], int(result["target"][i])
        pred = int(probs.argmax())
        left, right = axes[r][2 * c], axes[r][2 * c + 1]
        left.imshow(images[i])
        left.set_title(f"true: {truths[i]}" if truths is not None else "(no label)", fontsize=8)
        right.imshow(images[i])
        title = f"pred: {class_names[pred]} {probs[pred]:.2f}"
        if t != pred:
            title += f"\nmap of {class_names[t]}"
        if result["cam"][i].max() > 0:
            right.imshow(result["overlay"][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        else:  # every position speaks against the class: an all-blue overlay would look like a map
            title += " (no evidence)"
        right.set_title(title, fontsize=8, color="black" if truths is None or truths[i] == class_names[pred]
                        else "firebrick")
    fig.suptitle("\n".join(header), fontsize=8, ha="left", va="top", x=0.01, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 1 - header_in / height), h_pad=2.0)
    try:
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise InputError(f"cannot write --out {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path


def _true_names(labels, config) -> list[str] | None:
    """Manifest labels as the run's class names (the binary task maps five classes onto two)."""
    if labels is None:
        return None
    label_map = config.data.get("label_map") or {}
    return [label_map.get(y, y) for y in labels]


def explain(workdir: str, manifest: str | None, images_dir: str | None, out: str, max_images: int = 16,
            target: str | None = None, workers: int = 4) -> tuple[str, dict]:
    """Loads a run, explains up to `max_images` images and writes the figure.

    Returns:
      (the PNG path, the run's provenance).

    Raises:
      InputError: bad inputs (one line each).
    """
    from circlemix_jax.data import pipeline

    if max_images < 1:
        raise InputError(f"--max-images must be at least 1, got {max_images}")
    paths, _, labels = predict.read_inputs(manifest, images_dir)
    predict.check_outputs([out], manifest, paths, [workdir])
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise InputError(f"cannot write --out {out}: its folder does not exist")
    run = inference.load(workdir)
    names = run.class_names
    index = -1
    if target is not None:
        if target not in names:
            raise InputError(f"--target {target!r} is not one of the model's classes {names}")
        index = names.index(target)
    truths = _true_names(labels, run.config)
    chosen = pick(truths, min(max_images, len(paths)))
    paths = [paths[i] for i in chosen]
    truths = None if truths is None else [truths[i] for i in chosen]
    images = pipeline.decode_all(paths, run.image_size, workers, f"decoding at {run.image_size}px")
    result = explain_images(run, images, index)
    prov = provenance.describe(run.workdir, run.config)
    header = [provenance.line(prov), *provenance.warnings(prov),
              "Grad-CAM of the centred logit at the last convolutional stage; each map scaled to its own maximum"]
    return figure(images, result, names, truths, header, out), prov


def run() -> None:
    """CLI entry; flags are defined here so importing this module defines none."""
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "Finished run whose best checkpoint is explained.")
    manifest = flags.DEFINE_string("manifest", None, "CSV with a path column (label optional: shown as the truth).")
    images = flags.DEFINE_string("images", None, "Folder of images instead of a manifest.")
    out = flags.DEFINE_string("out", None, "PNG to write.")
    max_images = flags.DEFINE_integer("max-images", 16, "At most this many images (every class in turn when "
                                      "the manifest has labels).")
    target = flags.DEFINE_string("target", None, "Class name to map in every image (default: each image's "
                                 "predicted class).")
    workers = flags.DEFINE_integer("workers", 4, "Decoding threads.")
    flags.mark_flags_as_required(["workdir", "out"])

    @cli.command
    def main() -> None:
        cli.configure_compilation_cache()
        path, prov = explain(workdir.value, manifest.value, images.value, out.value, max_images.value,
                             target.value, workers.value)
        print(provenance.line(prov), flush=True)
        for warning in provenance.warnings(prov):
            print(warning, flush=True)
        print(f"wrote {path}", flush=True)

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
