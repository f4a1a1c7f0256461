"""Binary task: non_sclerotic vs global_sclerosis (obsolescent, solidified and disappearing map to global_sclerosis).

Command:
  python -m circlemix_jax.main --config configs/binary.py --config.data.manifest=../shared/data/glomeruli-bueno/manifest.csv

Variants (the part after ':' in --config):
  configs/binary.py:smoke             tiny run for tests (32 px, 2 epochs): seconds of training plus 1-2 min of compilation
  configs/binary.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)
  configs/binary.py:scratch           the recommended recipe without ImageNet weights (defaults.scratch:
                                      96 px, 30 epochs, cosine lr with warm-up, Nesterov, weight decay,
                                      EMA weights, logit-adjusted loss, label smoothing, 8 dihedral views,
                                      small rotations, colour and stain jitter); combine as scratch,circlemix. Sized to
                                      train one fold in under 30 minutes on a 2-core CPU:
                                        python -m circlemix_jax.main --config configs/binary.py:scratch --config.data.manifest=../shared/data/glomeruli-bueno/manifest.csv
                                      Measured results: docs/RESULTS.md ("From scratch").

Expected result and time:
  On the public Bueno set: prints per-epoch validation balanced accuracy, then
  the TEST line and the 2x2 confusion matrix of fold 0. The public set has 946
  images (209 global_sclerosis); see docs/RESULTS.md for the cross-validated
  figures and wall times measured on a 2-core CPU.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("binary", arg)
