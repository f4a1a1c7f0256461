"""Child NC2: re-verifies normal vs periglomerular_fibrosis (classes 0, 1), fine-tuned from C5's best checkpoint.

Command:
  python -m circlemix_jax.main --config configs/nc2.py   # after configs/c5.py, same fold and method

Variants (the part after ':' in --config):
  configs/nc2.py:smoke             tiny run for tests (32 px, 2 epochs), under a minute on a 2-core CPU
  configs/nc2.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the built-in synthetic set: EXPECTED_CHILD.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("nc2", arg)
