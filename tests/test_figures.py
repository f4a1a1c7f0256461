"""Figures: confusion matrices a pathologist reads (class names on both axes, count and
row percentage per cell, a colour bar), and visualize's augmentation figures."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from circlemix_jax import report

NAMES = ["non_sclerotic", "global_sclerosis"]


def test_cells_axes_and_colour_bar():
    fig, ax = plt.subplots()
    report.draw_confusion(ax, [[166, 2], [22, 13]], NAMES, "fold 0")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["non sclerotic", "global sclerosis"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["non sclerotic", "global sclerosis"]
    assert ax.get_ylabel() == "true" and ax.get_xlabel() == "predicted"
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["166\n99%", "2\n1%", "22\n63%", "13\n37%"])  # percentages of each row (truth)
    assert len(fig.axes) == 2  # the matrix and its colour bar
    plt.close(fig)


def test_empty_row_and_figure_pixels(tmp_path):
    image = report.confusion_figure(np.array([[0, 0], [3, 1]]), NAMES, path=str(tmp_path / "cm.png"))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (tmp_path / "cm.png").stat().st_size > 5000


def test_grid_names_and_missing_panels(tmp_path):
    path = report.confusion_grid({("binary", "baseline"): (np.array([[5, 1], [2, 4]]), NAMES)}, ["binary"],
                                 ["baseline", "circlemix"], str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 5000 and path.endswith("grid.png")


@pytest.mark.parametrize("mode, centres", [("mix", False), ("augment", True)])
def test_visualize_writes_each_figure(mode, centres, synthetic_manifest, tmp_path):
    from PIL import Image

    from circlemix_jax import defaults, visualize

    with_centres = tmp_path / "centres.csv"
    with open(synthetic_manifest) as f, open(with_centres, "w") as g:
        rows = f.read().splitlines()
        root = os.path.dirname(synthetic_manifest)
        g.write(rows[0] + ",center\n")
        for i, row in enumerate(rows[1:]):
            path, rest = row.split(",", 1)
            g.write(f"{os.path.join(root, path)},{rest},{'AB'[i % 2]}\n")
    for manifest in [str(with_centres) if centres else synthetic_manifest]:
        config = defaults.get_config("c5", "smoke,scratch")
        with config.unlocked():
            config.data.manifest = manifest
        out = tmp_path / f"{mode}-{os.path.basename(manifest)}.png"
        visualize.write_figure(config, str(out), mode, pairs=2, seed=0)
        with Image.open(out) as im:
            assert im.width > 300 and im.height > 200
