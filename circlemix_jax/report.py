"""Tables and figures of the cross-validated experiments (paper, Tables 1-2 and Figure 3).

Pure functions of the per-fold rows that `experiments.collect` returns (and of
the pooled scores `experiments.pooled_scores` computes from the runs' test
predictions): no training code here, so the report can be rebuilt from finished
runs alone. With several seeds, a fold's score is the mean over its seeds.
"""

from __future__ import annotations

import csv
import warnings

import numpy as np

CSV_COLUMNS = ("fold", "seed", "method", "setting", "test_center", "balanced_accuracy", "balanced_f1", "accuracy",
               "num_examples", "adjusted_balanced_accuracy", "adjusted_balanced_f1", "ci_low", "ci_high",
               "adjusted_ci_low", "adjusted_ci_high")
# The fold and seed of a pooled row in results.csv: every fold's test predictions, the mean over seeds.
POOLED = "pooled"
METRICS = (("balanced_accuracy", "ACC"), ("balanced_f1", "F1"))
TABLE1 = (("binary", "Binary"), ("C5", "Five-class"))
TABLE2 = (("C5", "C5"), ("C5+NC2", "C5+NC2"), ("C5+C3", "C5+C3"), ("C5+C2", "C5+C2"))
BASELINE = "baseline"
# Wilcoxon's signed-rank test cannot reach p < 0.05 with fewer pairs (smallest two-sided p is 2/2^n).
MIN_PAIRS_FOR_TEST = 5


def write_csv(rows: list[dict], path: str, pooled: list[dict] = ()) -> str:
    """One row per fold x seed x method x setting, then one pooled row per method x setting.

    Pooled rows have fold and seed 'pooled' and the subject-bootstrap interval in
    ci_low/ci_high (adjusted_ci_* for the decision rule); adjusted_* are empty for
    runs made without a stored decision rule.
    """
    def cell(v):
        return "" if v is None else f"{v:.6f}" if isinstance(v, float) else v

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["setting"], r["method"], r["seed"], r["fold"])):
            w.writerow({k: cell(r.get(k)) for k in CSV_COLUMNS})
        for r in pooled:
            w.writerow({k: cell(r.get(k)) for k in CSV_COLUMNS} | {"fold": POOLED, "seed": POOLED})
    return path


def _scores(rows: list[dict], method: str, setting: str, metric: str) -> dict[int, float]:
    """{fold: the mean over its seeds} of one method and setting (folds whose metric is missing are left out)."""
    per_fold = {}
    for r in rows:
        if r["method"] == method and r["setting"] == setting and r.get(metric) is not None:
            per_fold.setdefault(r["fold"], []).append(r[metric])
    return {f: float(np.mean(v)) for f, v in per_fold.items()}


def _setting_rank(setting: str) -> int:
    """Tables list the settings as the paper does: binary, C5, then C5 with each child."""
    order = [s for s, _ in TABLE1 + TABLE2[1:]]
    return order.index(setting) if setting in order else len(order)


def _pct(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f}"


def pooled_table(pooled: list[dict], rows: list[dict], methods: list[str]) -> str:
    """Per setting and method: pooled balanced accuracy [95% subject-bootstrap interval], plain and
    under the decision rule, then the spread over folds and over seeds."""
    if not pooled:
        return "_no test predictions to pool_\n"
    lines = ["| Setting | Method | pooled ACC [95% CI] | pooled ACC, decision rule [95% CI] | folds mean ± std | "
             "seeds mean ± std | folds | seeds | images | subjects |", "|" + "---|" * 10]
    order = {m: i for i, m in enumerate(methods)}
    for r in sorted(pooled, key=lambda r: (_setting_rank(r["setting"]), order.get(r["method"], 99))):
        folds = _scores(rows, r["method"], r["setting"], "balanced_accuracy")
        adjusted = ("–" if r["adjusted_balanced_accuracy"] is None else
                    f"{_pct(r['adjusted_balanced_accuracy'])} [{_pct(r['adjusted_ci_low'])}, "
                    f"{_pct(r['adjusted_ci_high'])}]")
        lines.append(f"| {r['setting']} | {r['method']} | {_pct(r['balanced_accuracy'])} [{_pct(r['ci_low'])}, "
                     f"{_pct(r['ci_high'])}] | {adjusted} | {mean_std(folds.values())} | "
                     f"{mean_std(r['seed_scores'])} | {len(folds)} | {r['seeds']} | {r['num_examples']} | "
                     f"{r['subjects']} |")
    return "\n".join(lines) + "\n"


def centre_table(rows: list[dict], methods: list[str]) -> str:
    """Leave-one-centre-out: each held-out centre's balanced accuracy (mean over seeds), plain / rule."""
    held = sorted({r["test_center"] for r in rows if r.get("test_center")})
    if not held:
        return ""
    settings = [s for s, _ in TABLE1 + TABLE2[1:] if any(r["setting"] == s for r in rows)]
    lines = ["| Setting | Method | " + " | ".join(held) + " |", "|" + "---|" * (len(held) + 2)]
    for s in settings:
        for m in methods:
            cells = []
            for c in held:
                sel = [r for r in rows if r["setting"] == s and r["method"] == m and r.get("test_center") == c]
                plain = [r["balanced_accuracy"] for r in sel]
                adj = [r["adjusted_balanced_accuracy"] for r in sel if r["adjusted_balanced_accuracy"] is not None]
                cells.append("–" if not plain else f"{_pct(np.mean(plain))} / {_pct(np.mean(adj)) if adj else '–'}")
            lines.append(f"| {s} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_table(centres: dict, methods: list[str]) -> str:
    """Sclerotic recall per centre: {(setting, method): {centre: (found, total)}} as found/total (%)."""
    names = sorted({c for per in centres.values() for c in per})
    if not names:
        return ""
    lines = ["| Setting | Method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    order = {m: i for i, m in enumerate(methods)}
    for (setting, method), per in sorted(centres.items(),
                                         key=lambda kv: (_setting_rank(kv[0][0]), order.get(kv[0][1], 99))):
        cells = [f"{per[c][0]}/{per[c][1]} ({100 * per[c][0] / per[c][1]:.0f}%)" if c in per and per[c][1] else "–"
                 for c in names]
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_std(values) -> str:
    """'73.0 ± 1.2' in percent; the std is over folds (ddof=1), '–' for one fold or none."""
    v = 100 * np.asarray(list(values), np.float64)
    if v.size == 0:
        return "–"
    if v.size == 1:
        return f"{v[0]:.1f}"
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def results_table(rows: list[dict], methods: list[str], settings) -> str:
    """A markdown table: one row per method, ACC and F1 per setting, mean ± std over folds."""
    settings = [(s, title) for s, title in settings if any(r["setting"] == s for r in rows)]
    if not settings:
        return "_no finished runs for this table_\n"
    head = "| Method | " + " | ".join(f"{t} {m}" for _, t in settings for _, m in METRICS) + " | folds |"
    lines = [head, "|" + "---|" * (2 * len(settings) + 2)]
    for method in methods:
        cells, folds = [], set()
        for s, _ in settings:
            for metric, _ in METRICS:
                scores = _scores(rows, method, s, metric)
                folds |= set(scores)
                cells.append(mean_std(scores.values()))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(folds)} |")
    return "\n".join(lines) + "\n"


def paired(base: dict[int, float], other: dict[int, float]) -> dict:
    """Per-fold comparison of two methods on the folds both finished.

    Returns:
      {n, mean_diff (percentage points), improved (folds where other > base),
      p (two-sided Wilcoxon signed-rank, None below MIN_PAIRS_FOR_TEST pairs or
      when every difference is zero)}.
    """
    folds = sorted(set(base) & set(other))
    d = np.array([other[f] - base[f] for f in folds], np.float64)
    p = None
    if len(d) >= MIN_PAIRS_FOR_TEST and np.any(d != 0):
        from scipy.stats import wilcoxon  # scipy comes with sklearn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample and tie warnings; the p-value is still defined
            p = float(wilcoxon(d).pvalue)
    return {"n": len(d), "mean_diff": 100 * float(d.mean()) if len(d) else float("nan"),
            "improved": int((d > 0).sum()), "p": p}


def comparison_table(rows: list[dict], methods: list[str], differences: dict | None = None) -> str:
    """Each method against the baseline, fold by fold, for every setting that has both.

    Args:
      differences: {(setting, method): `bootstrap.paired_difference` of the pooled
        balanced accuracy against the baseline}, shown as a last column.
    """
    if BASELINE not in methods:
        return "_the baseline was not run, so there is nothing to compare against_\n"
    differences = differences or {}
    others = [m for m in methods if m != BASELINE]
    settings = [s for s, _ in TABLE1 + TABLE2[1:] if any(r["setting"] == s for r in rows)]
    lines = ["| Method | Setting | ΔACC (pp) | ACC better | p (ACC) | ΔF1 (pp) | F1 better | p (F1) | "
             "pooled ΔACC (pp) [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in others:
        for s in settings:
            d = differences.get((s, method))
            pooled = "–" if d is None else (f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, "
                                            f"{100 * d['high']:+.1f}]")
            cells = []
            for metric, _ in METRICS:
                c = paired(_scores(rows, BASELINE, s, metric), _scores(rows, method, s, metric))
                if c["n"] == 0:
                    cells += ["–", "–", "–"]
                    continue
                cells += [f"{c['mean_diff']:+.1f}", f"{c['improved']}/{c['n']}",
                          "–" if c["p"] is None else f"{c['p']:.3f}"]
            lines.append(f"| {method} | {s} | " + " | ".join(cells) + f" | {pooled} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], methods: list[str], header: list[str], figures: list[str],
             pooled: list[dict] = (), differences: dict | None = None, centres: dict | None = None) -> str:
    """The whole results.md.

    Args:
      rows: per-fold rows (`experiments.collect`).
      methods: column order.
      header: lines describing the settings.
      figures: PNG names to embed.
      pooled: pooled rows (`experiments.pooled_scores`).
      differences: pooled paired differences against the baseline.
      centres: sclerotic recall per centre (`experiments.centre_recall`).
    """
    parts = ["# CircleMix: cross-validated results\n", *[f"{line}  " for line in header], "",
             "Scores are percentages on the test folds: mean ± standard deviation over folds (with several "
             "seeds, each fold's score is the mean over its seeds). "
             "ACC is balanced accuracy (mean per-class recall), F1 is balanced F1 (macro one-vs-rest F1). "
             "C5+X is the five-class result after the child X re-decides the images C5 put into its classes "
             "(paper, section 3.2); it is scored on every test image.\n",
             "## Table 1. Non-hierarchical training\n", results_table(rows, methods, TABLE1),
             "## Table 2. Hierarchical training\n", results_table(rows, methods, TABLE2),
             "## Pooled over the folds, with subject-bootstrap intervals\n",
             "ACC pooled over every test prediction of the folds (each image once per seed; with several seeds, "
             "the mean over seeds of each seed's pooled ACC). The 95% interval is the percentile interval of a "
             "bootstrap that resamples subjects (slides), not images: a slide's images share its stain, scanner "
             "and patient. 'Decision rule' is the same under each run's stored rule (eval.decision; the plain "
             "argmax when that is 'argmax'). Folds mean ± std is over folds of each fold's ACC (mean over seeds); "
             "seeds mean ± std is over seeds of the pooled ACC.\n",
             pooled_table(list(pooled), rows, methods),
             "## Paired comparison against the baseline\n",
             "Per fold, the same test images: Δ is the mean over folds of (method − baseline) in percentage points, "
             "'better' counts the folds where the method scores higher, and p is the two-sided Wilcoxon "
             f"signed-rank test over folds (only with ≥ {MIN_PAIRS_FOR_TEST} folds; with 5 folds the smallest "
             "possible p is 0.0625, so read it as a sign of consistency, not as proof). With several seeds each "
             "fold's score is the mean over its seeds. The pooled Δ is the difference of pooled ACC on the images "
             "both methods predicted, with a paired subject-bootstrap interval (the same slides drawn for both).\n",
             comparison_table(rows, methods, differences)]
    loco = centre_table(rows, methods)
    if loco:
        parts += ["## Leave one centre out\n", "Each held-out centre's ACC (mean over seeds): plain argmax / "
                  "under the decision rule.\n", loco]
    recall = recall_table(centres or {}, methods)
    if recall:
        parts += ["## Sclerotic recall per centre\n", "Globally sclerotic test images predicted sclerotic "
                  "(plain argmax), pooled over folds and seeds, by the manifest's `center`.\n", recall]
    if figures:
        parts += ["## Confusion matrices\n", "Summed over the test folds (every image counted once per seed); "
                  "rows are the truth; each cell gives the count and its share of the row (the recall on the "
                  "diagonal), and the colour is that share.\n", *[f"![{f}]({f})\n" for f in figures]]
    return "\n".join(parts)


def _pyplot():
    import matplotlib  # only figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_confusion(ax, counts, class_names, title: str | None = None, colorbar: bool = True):
    """Draws one confusion matrix the way a pathologist reads it.

    Rows are the truth, columns the prediction, both labelled with class names.
    Each cell shows its count and its share of the row (the recall on the
    diagonal); the colour is that row share, so a rare class's errors are as
    visible as a common class's.

    Args:
      ax: a matplotlib Axes.
      counts: (K, K) confusion counts, rows = truth.
      class_names: K names.
      title: drawn above the matrix.
      colorbar: adds a colour bar of the row share beside the matrix.

    Returns:
      The image artist (for a shared colour bar).
    """
    cm = np.asarray(counts, np.int64)
    k = len(cm)
    rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    small = k > 3  # five classes need a smaller font to fit count and percentage
    for (r, c), n in np.ndenumerate(cm):
        ax.text(c, r, f"{n}\n{100 * rate[r, c]:.0f}%", ha="center", va="center", fontsize=7 if small else 9,
                color="white" if rate[r, c] > 0.6 else "black")
    labels = [n.replace("_", " ") for n in class_names]
    ax.set_xticks(range(k), labels, rotation=30 if small else 0, ha="right" if small else "center", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("share of the true class", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return image


def confusion_figure(counts, class_names, title: str | None = None, path: str | None = None) -> np.ndarray:
    """One confusion matrix as an RGB image (and a PNG when `path` is given).

    The single figure used by the report, TensorBoard and the docs.

    Args:
      counts: (K, K) confusion counts, rows = truth.
      class_names: K names.
      title: drawn above the matrix.
      path: PNG to write, or None.

    Returns:
      (H, W, 3) uint8 RGB pixels of the figure.
    """
    plt = _pyplot()
    k = len(class_names)
    side = 2.6 + 0.55 * k
    fig, ax = plt.subplots(figsize=(side + 1.3, side))
    draw_confusion(ax, counts, class_names, title)
    fig.tight_layout(pad=0.6)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return pixels


def confusion_grid(matrices: dict, settings: list[str], methods: list[str], path: str) -> str:
    """A grid of confusion matrices like the paper's Figure 3: settings as rows, methods as columns.

    Each panel is `draw_confusion` (class names, counts and row percentages);
    one colour bar serves the whole grid, since every panel shares its 0-1 scale.

    Args:
      matrices: {(setting, method): (counts (K, K), class names)}.
      settings: row order, e.g. ['C5', 'C5+NC2'].
      methods: column order.
      path: PNG to write.

    Returns:
      `path`.
    """
    plt = _pyplot()
    k = max((len(np.asarray(cm)) for cm, _ in matrices.values()), default=2)
    side = 2.4 + 0.5 * k
    fig, axes = plt.subplots(len(settings), len(methods), figsize=(side * len(methods) + 1.2, side * len(settings)),
                             squeeze=False)
    image = None
    for i, setting in enumerate(settings):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            if (setting, method) not in matrices:
                ax.axis("off")
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                continue
            cm, names = matrices[(setting, method)]
            image = draw_confusion(ax, cm, names, f"{setting}: {method}", colorbar=False)
            if j > 0:
                ax.set_ylabel("")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes((0.91, 0.15, 0.012, 0.7)))
        bar.set_label("share of the true class", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
