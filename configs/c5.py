"""Five-class parent (C5): normal, periglomerular_fibrosis, obsolescent, solidified, disappearing.

Command:
  python -m circlemix_jax.main --config configs/c5.py [--config.data.manifest=PATH]

Arguments (the part after ':' in --config, comma-separated):
  smoke      a tiny run for tests (32 px, 2 epochs)
  scratch    the recommended recipe without ImageNet weights (`defaults.scratch`): cosine lr with
             warm-up, Nesterov, weight decay, EMA weights, label smoothing, batches balanced over centre and class,
             the best epoch chosen from the second half, 8 dihedral views, small rotations,
             colour and stain jitter, blur and noise, each image standardised in optical density,
             at 96 px for 30 epochs
  baseline, mixup, cutmix, circlemix
             the mixing method, e.g. configs/c5.py:scratch,circlemix

Prints a line per epoch (validation balanced accuracy, img/s, ETA), then the TEST
line with per-class recall and the confusion matrix of the fold, and writes
runs/c5/<method>/fold<k>/metrics.json. Without a manifest it trains on the
built-in synthetic set, which checks an installation and nothing more. Measured
times and scores are in README.md and docs/RESULTS.md.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c5", arg)
