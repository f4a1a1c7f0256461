"""Five-class parent (C5): normal, periglomerular_fibrosis, obsolescent, solidified, disappearing.

Command:
  python -m circlemix_jax.main --config configs/c5.py

Variants (the part after ':' in --config):
  configs/c5.py:smoke             tiny run for tests (32 px, 2 epochs): seconds of training plus 1-2 min of compilation
  configs/c5.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the built-in synthetic set: prints one progress line per epoch (val balanced accuracy, img/s, ETA),
  then the TEST line and the 5x5 confusion matrix of fold 0, and writes
  runs/c5/baseline/fold0/metrics.json. On the synthetic set (365 images, about
  220 for training) 8 epochs from scratch at 256 px take roughly 10-15 minutes
  on a 2-core CPU (1-2 of them compiling); the classes are drawn to be
  separable, so test balanced accuracy should end well above chance (0.2).
  Not yet measured on a quiet machine in this release: see BENCHMARKS.md for
  throughput.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c5", arg)
