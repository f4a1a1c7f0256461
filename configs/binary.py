"""Binary task: non_sclerotic vs global_sclerosis (obsolescent, solidified and disappearing map to global_sclerosis).

Command:
  python -m circlemix_jax.main --config configs/binary.py:scratch \
      --config.data.manifest=../shared/data/glomeruli-bueno/manifest.csv

Arguments (the part after ':' in --config, comma-separated):
  smoke      a tiny run for tests (32 px, 2 epochs)
  scratch    the recommended recipe without ImageNet weights (`defaults.scratch`): cosine lr with
             warm-up, Nesterov, weight decay, EMA weights, label smoothing, batches balanced over centre and class,
             the best epoch chosen from the second half, 8 dihedral views, small rotations, zoom,
             colour and stain jitter, blur and noise, each image standardised in optical density,
             at 96 px for 30 epochs; sized to train one fold
             of the public set in under 30 minutes on a 2-core CPU
  baseline, mixup, cutmix, circlemix
             the mixing method, e.g. configs/binary.py:scratch,circlemix

Prints a line per epoch, then the TEST line with per-class recall and the 2x2
confusion matrix of the fold. What this recipe gave on the public set, with
the wall times, is in docs/RESULTS.md ("Blur and noise", "Today's recipe on
the five folds"): fold 0 98.3% balanced accuracy (three seeds), 5.5 min a run
alone (up to 18 beside another); with a centre held out (--config.split=leave_one_center_out
--config.fold=K) SESCAM 90.1 (five seeds), SAS 96.1, VUHSK 99.2; pooled over
the five folds and three seeds 94.7 [90.4, 97.7].
"""

from circlemix_jax import defaults


def get_config(arg: str = ""):
    return defaults.get_config("binary", arg)
