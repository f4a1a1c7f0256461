"""Confusion figures a pathologist reads: class names on both axes, count and row percentage per cell, a colour bar."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from circlemix_jax import report  # noqa: E402

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
