"""Five-class parent (C5): normal, periglomerular_fibrosis, obsolescent, solidified, disappearing.

Command:
  python -m circlemix_jax.main --config configs/c5.py

Variants (the part after ':' in --config):
  configs/c5.py:smoke             tiny run for tests (32 px, 2 epochs), under a minute on a 2-core CPU
  configs/c5.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the built-in synthetic set: EXPECTED_C5.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c5", arg)
