"""Five-class parent (C5): normal, periglomerular_fibrosis, obsolescent, solidified, disappearing.

Command:
  python -m circlemix_jax.main --config configs/c5.py

Variants (the part after ':' in --config):
  configs/c5.py:smoke             tiny run for tests (32 px, 2 epochs): seconds of training plus 1-2 min of compilation
  configs/c5.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)
  configs/c5.py:scratch               the recommended recipe without ImageNet weights (defaults.scratch:
                                      96 px, 30 epochs, cosine lr with warm-up, Nesterov, weight decay,
                                      EMA weights, logit-adjusted loss, label smoothing, 8 dihedral views,
                                      small rotations, colour and stain jitter); combine as scratch,circlemix. Sized to
                                      train one fold in under 30 minutes on a 2-core CPU:
                                        python -m circlemix_jax.main --config configs/c5.py:scratch --config.data.manifest=PATH
                                      Measured results: docs/RESULTS.md ("From scratch").

Expected result and time:
  On the built-in synthetic set: prints one progress line per epoch (val balanced accuracy, img/s, ETA),
  then the TEST line and the 5x5 confusion matrix of fold 0, and writes
  runs/c5/baseline/fold0/metrics.json. On the synthetic set (365 images, 224
  for training) 8 epochs from scratch at 256 px took 4 min 35 s end to end on
  this project's quiet 2-core CPU (2026-11-27, including generating the
  synthetic set and a cold compile; peak RSS 4.3 GiB), at about 10 img/s. The
  measured result was test balanced_accuracy=0.6000 balanced_f1=0.5798 (best
  epoch 6): normal, periglomerular_fibrosis and obsolescent all right, the two
  test images each of solidified and disappearing wrong. Expect 0.5-0.8; chance is 0.2.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c5", arg)
