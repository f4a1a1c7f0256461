"""Data: manifests (`manifest.py`), folds (`folds.py`), the built-in synthetic set
(`synthetic.py`) and the host pipeline (`pipeline.py`).

The names most callers use are re-exported here, so `from circlemix_jax import data`
then `data.read_manifest(...)`, `data.make_split(...)` work as before the split.
"""

from circlemix_jax.data.folds import SPLITS, Split, make_split, restrict
from circlemix_jax.data.manifest import (
                                         CENTER_COLUMN,
                                         REQUIRED_COLUMNS,
                                         Records,
                                         center_names,
                                         centers,
                                         manifest_path,
                                         path_centers,
                                         read_manifest,
)

__all__ = ["CENTER_COLUMN", "REQUIRED_COLUMNS", "SPLITS", "Records", "Split", "center_names", "centers",
           "make_split", "manifest_path", "path_centers", "read_manifest", "restrict"]
