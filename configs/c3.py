"""Child C3: re-verifies obsolescent, solidified, disappearing (classes 2, 3, 4), fine-tuned from C5's best checkpoint.

Command:
  python -m circlemix_jax.main --config configs/c3.py   # after configs/c5.py, same fold and method

Variants (the part after ':' in --config):
  configs/c3.py:smoke             tiny run for tests (32 px, 2 epochs), under a minute on a 2-core CPU
  configs/c3.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the built-in synthetic set: EXPECTED_CHILD.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c3", arg)
