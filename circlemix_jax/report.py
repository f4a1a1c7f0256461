"""Tables and figures of the cross-validated experiments (paper, Tables 1-2 and Figure 3).

Pure functions of the per-fold rows that `experiments.collect` returns: no
training code here, so the report can be rebuilt from finished runs alone.
"""

from __future__ import annotations

import csv
import warnings

import numpy as np

CSV_COLUMNS = ("fold", "method", "setting", "balanced_accuracy", "balanced_f1", "accuracy", "num_examples")
METRICS = (("balanced_accuracy", "ACC"), ("balanced_f1", "F1"))
TABLE1 = (("binary", "Binary"), ("C5", "Five-class"))
TABLE2 = (("C5", "C5"), ("C5+NC2", "C5+NC2"), ("C5+C3", "C5+C3"), ("C5+C2", "C5+C2"))
BASELINE = "baseline"
# Wilcoxon's signed-rank test cannot reach p < 0.05 with fewer pairs (smallest two-sided p is 2/2^n).
MIN_PAIRS_FOR_TEST = 5


def write_csv(rows: list[dict], path: str) -> str:
    """One row per fold x method x setting."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["setting"], r["method"], r["fold"])):
            w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in CSV_COLUMNS})
    return path


def _scores(rows: list[dict], method: str, setting: str, metric: str) -> dict[int, float]:
    return {r["fold"]: r[metric] for r in rows if r["method"] == method and r["setting"] == setting}


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
        from scipy.stats import wilcoxon  # noqa: PLC0415 - scipy comes with sklearn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample and tie warnings; the p-value is still defined
            p = float(wilcoxon(d).pvalue)
    return {"n": len(d), "mean_diff": 100 * float(d.mean()) if len(d) else float("nan"),
            "improved": int((d > 0).sum()), "p": p}


def comparison_table(rows: list[dict], methods: list[str]) -> str:
    """Each method against the baseline, fold by fold, for every setting that has both."""
    if BASELINE not in methods:
        return "_the baseline was not run, so there is nothing to compare against_\n"
    others = [m for m in methods if m != BASELINE]
    settings = [s for s, _ in TABLE1 + TABLE2[1:] if any(r["setting"] == s for r in rows)]
    lines = ["| Method | Setting | ΔACC (pp) | ACC better | p (ACC) | ΔF1 (pp) | F1 better | p (F1) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in others:
        for s in settings:
            cells = []
            for metric, _ in METRICS:
                c = paired(_scores(rows, BASELINE, s, metric), _scores(rows, method, s, metric))
                if c["n"] == 0:
                    cells += ["–", "–", "–"]
                    continue
                cells += [f"{c['mean_diff']:+.1f}", f"{c['improved']}/{c['n']}",
                          "–" if c["p"] is None else f"{c['p']:.3f}"]
            lines.append(f"| {method} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], methods: list[str], header: list[str], figures: list[str]) -> str:
    """The whole results.md."""
    parts = ["# CircleMix: cross-validated results\n", *[f"{line}  " for line in header], "",
             "Scores are percentages on the test folds: mean ± standard deviation over folds. "
             "ACC is balanced accuracy (mean per-class recall), F1 is balanced F1 (macro one-vs-rest F1). "
             "C5+X is the five-class result after the child X re-decides the images C5 put into its classes "
             "(paper, section 3.2); it is scored on every test image.\n",
             "## Table 1. Non-hierarchical training\n", results_table(rows, methods, TABLE1),
             "## Table 2. Hierarchical training\n", results_table(rows, methods, TABLE2),
             "## Paired comparison against the baseline\n",
             "Per fold, the same test images: Δ is the mean over folds of (method − baseline) in percentage points, "
             "'better' counts the folds where the method scores higher, and p is the two-sided Wilcoxon "
             f"signed-rank test over folds (only with ≥ {MIN_PAIRS_FOR_TEST} folds; with 5 folds the smallest "
             "possible p is 0.0625, so read it as a sign of consistency, not as proof).\n",
             comparison_table(rows, methods)]
    if figures:
        parts += ["## Confusion matrices\n", "Summed over the test folds (every image counted once); rows are the "
                  "truth, colour is the row-normalised rate.\n", *[f"![{f}]({f})\n" for f in figures]]
    return "\n".join(parts)


def confusion_grid(matrices: dict, settings: list[str], methods: list[str], path: str) -> str:
    """A grid of confusion matrices like the paper's Figure 3: settings as rows, methods as columns.

    Args:
      matrices: {(setting, method): (counts (K, K), class names)}.
      settings: row order, e.g. ['C5', 'C5+NC2'].
      methods: column order.
      path: PNG to write.

    Returns:
      `path`.
    """
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(len(settings), len(methods), figsize=(3.2 * len(methods), 3.1 * len(settings) + 0.6),
                             squeeze=False)
    names = None
    for i, setting in enumerate(settings):
        for j, method in enumerate(methods):
            ax = axes[i][j]
            if (setting, method) not in matrices:
                ax.axis("off")
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
                continue
            cm, names = matrices[(setting, method)]
            cm = np.asarray(cm)
            rate = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
            ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
            for (r, c), n in np.ndenumerate(cm):
                ax.text(c, r, str(n), ha="center", va="center", fontsize=8,
                        color="white" if rate[r, c] > 0.6 else "black")
            k = len(cm)
            ax.set_xticks(range(k), [str(x) for x in range(k)])
            ax.set_yticks(range(k), [str(x) for x in range(k)])
            if i == 0:
                ax.set_title(method)
            if j == 0:
                ax.set_ylabel(f"{setting}\ntruth")
            if i == len(settings) - 1:
                ax.set_xlabel("prediction")
    if names:
        fig.text(0.5, 0.01, "   ".join(f"{i} = {n}" for i, n in enumerate(names)), ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
