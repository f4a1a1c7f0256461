"""How finished runs hold up when their test images are zoomed, blurred, compressed or recoloured.

A centre the model never saw differs from the training centres in more than
stain: its crops may hold more or less tissue around the glomerulus, its scanner
may be softer or noisier. This script writes shifted copies of a run's test
images, predicts them with each run through `python -m circlemix_jax.predict`,
and prints balanced accuracy and per-class recall per shift. The shifts are
applied to the stored 224 px crops, before the pipeline resizes them.

Used for docs/RESULTS.md ("Zoom"); not part of the package. Command:

  python docs/shift_probe.py --out /tmp/probe --run runs/a --run runs/b

All runs must share the first run's test split (same manifest, fold and split seed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageFilter
from sklearn.metrics import balanced_accuracy_score, recall_score


def _zoom_in(im, f):
    s = im.size[0]
    c = int(round(s * f))
    o = (s - c) // 2
    return im.crop((o, o, o + c, o + c)).resize(im.size, Image.BILINEAR)


def _shrunk(im, f):
    c = int(round(im.size[0] * f))
    return im.resize((c, c), Image.BILINEAR)


def _paste(im, canvas, f):
    small = _shrunk(im, f)
    o = (im.size[0] - small.size[0]) // 2
    out = canvas.copy()
    out.paste(small, (o, o))
    return out


def _mirrored(im, f):
    a = np.asarray(_shrunk(im, f))
    p = im.size[0] - a.shape[0]
    return Image.fromarray(np.pad(a, ((p // 2, p - p // 2), (p // 2, p - p // 2), (0, 0)), mode="reflect"))


def _flat(im):
    a = np.asarray(im)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return Image.new("RGB", im.size, tuple(int(v) for v in np.median(border, 0)))


def _jpeg(im, quality):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(im, std):
    a = np.asarray(im) / 255.0 + np.random.default_rng(0).normal(0, std, np.asarray(im).shape)
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def _hue(im, turn):
    h, s, v = im.convert("HSV").split()
    h = h.point(lambda x: (x + int(turn * 255)) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _gamma(im, g):
    return Image.fromarray(((np.asarray(im) / 255.0) ** g * 255).round().astype(np.uint8))


def _half_resolution(im):
    s = im.size[0]
    return im.resize((s // 2, s // 2), Image.BILINEAR).resize(im.size, Image.BILINEAR)


# name -> fn(image, neighbour): `neighbour` is another crop of the same slide, whose tissue
# surrounds the shrunken glomerulus in the "context" zoom-outs, as a wider crop would.
SHIFTS = {
    "none": lambda im, nb: im,
    "zoom in 1/0.8": lambda im, nb: _zoom_in(im, 0.8),
    "zoom out 0.8, mirrored border": lambda im, nb: _mirrored(im, 0.8),
    "zoom out 0.65, mirrored border": lambda im, nb: _mirrored(im, 0.65),
    "zoom out 0.8, flat border": lambda im, nb: _paste(im, _flat(im), 0.8),
    "zoom out 0.65, flat border": lambda im, nb: _paste(im, _flat(im), 0.65),
    "zoom out 0.8, tissue of the slide": lambda im, nb: _paste(im, nb, 0.8),
    "zoom out 0.65, tissue of the slide": lambda im, nb: _paste(im, nb, 0.65),
    "blur sigma 2 px": lambda im, nb: im.filter(ImageFilter.GaussianBlur(2)),
    "half resolution": lambda im, nb: _half_resolution(im),
    "JPEG quality 30": lambda im, nb: _jpeg(im, 30),
    "noise std 0.04": lambda im, nb: _noise(im, 0.04),
    "hue +0.06 turn": lambda im, nb: _hue(im, 0.06),
    "hue -0.06 turn": lambda im, nb: _hue(im, -0.06),
    "gamma 0.6": lambda im, nb: _gamma(im, 0.6),
}


def write_shifted(run: str, out: str) -> tuple[str, dict]:
    """Writes every shift of the run's test images under `out`; returns (manifest, {path: (shift, class)})."""
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run, "split.json")) as f:
        paths = json.load(f)["test"]["paths"]
    manifest = config["data"]["manifest"]
    with open(manifest, newline="") as f:
        root = os.path.dirname(os.path.abspath(manifest))
        rows = {os.path.normpath(os.path.join(root, r["path"])): r for r in csv.DictReader(f)}
    label_map = config["data"].get("label_map") or {}
    by_subject: dict[str, list[str]] = {}
    for p in paths:
        by_subject.setdefault(rows[p]["subject"], []).append(p)
    folders = [os.path.join(out, f"shift{i:02d}") for i in range(len(SHIFTS))]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    truth, lines = {}, []
    for j, p in enumerate(paths):  # each image and its neighbour are read once, for every shift
        same = by_subject[rows[p]["subject"]]
        image = Image.open(p).convert("RGB")
        neighbour = Image.open(same[(same.index(p) + 1) % len(same)]).convert("RGB").resize(image.size)
        label = rows[p]["label"]
        for folder, (name, fn) in zip(folders, SHIFTS.items()):
            q = os.path.join(folder, f"{j:05d}.png")
            fn(image, neighbour).save(q)
            truth[q] = (name, label_map.get(label, label))
            lines.append({"path": q, "subject": rows[p]["subject"], "label": label})
    probe_manifest = os.path.join(out, "manifest.csv")
    with open(probe_manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "subject", "label"])
        w.writeheader()
        w.writerows(lines)
    return probe_manifest, truth


def score(predictions: str, truth: dict) -> dict:
    """{shift: (balanced accuracy, {class: recall}, images)} from a predict CSV."""
    got: dict[str, tuple[list, list]] = {}
    with open(predictions, newline="") as f:
        for r in csv.DictReader(f):
            shift, label = truth[r["path"]]
            y, p = got.setdefault(shift, ([], []))
            y.append(label)
            p.append(r["pred_name"])
    out = {}
    for shift, (y, p) in got.items():
        classes = sorted(set(y))
        recalls = recall_score(y, p, labels=classes, average=None, zero_division=0)
        out[shift] = (balanced_accuracy_score(y, p), dict(zip(classes, recalls)), len(y))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a finished run (repeat for several)")
    parser.add_argument("--out", required=True, help="folder for the shifted images and the predictions")
    args = parser.parse_args(argv)
    manifest, truth = write_shifted(args.run[0], args.out)
    for k, run in enumerate(args.run):
        preds = os.path.join(args.out, f"predictions{k}.csv")
        subprocess.run([sys.executable, "-m", "circlemix_jax.predict", f"--workdir={run}", f"--manifest={manifest}",
                        f"--out={preds}"], check=True, stdout=subprocess.DEVNULL)
        print(f"\n{run}")
        for shift, (bacc, recalls, n) in score(preds, truth).items():
            per_class = ", ".join(f"{c} {r:.3f}" for c, r in recalls.items())
            print(f"  {shift:36s} balanced accuracy {bacc:.3f}  recall: {per_class}  ({n} images)")


if __name__ == "__main__":
    main()
