"""Binary task: non_sclerotic vs global_sclerosis (obsolescent, solidified and disappearing map to global_sclerosis).

Command:
  python -m circlemix_jax.main --config configs/binary.py --config.data.manifest=../shared/data/glomeruli-bueno/manifest.csv

Variants (the part after ':' in --config):
  configs/binary.py:smoke             tiny run for tests (32 px, 2 epochs), under a minute on a 2-core CPU
  configs/binary.py:circlemix         CircleMix (also: baseline, cutmix, mixup; combine as smoke,circlemix)

Expected result and time:
  On the public Bueno set: EXPECTED_BINARY.
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("binary", arg)
