"""Child C2: re-verifies solidified vs disappearing (classes 3, 4), fine-tuned from C5's best checkpoint.

Command:
  python -m circlemix_jax.main --config configs/c2.py   # after configs/c5.py, same fold and method

Variants (the part after ':' in --config):
  configs/c2.py:smoke             tiny run for tests (32 px, 2 epochs): mostly compiling
  configs/c2.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the built-in synthetic set: loads C5's best checkpoint of the same fold and method
  (a log line names it), fine-tunes on the child's classes only, and prints the
  child's TEST line; merged C5+child figures come from
  `python -m circlemix_jax.experiments` (see configs/paper.py). The smoke
  variant needs a finished `configs/c5.py:smoke` run of the same fold first.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("c2", arg)
