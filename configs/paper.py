"""The paper's protocol (sections 3.2 and 4): 5 folds x {baseline, cutmix, circlemix} x {C5, NC2, C3, C2, binary}.

Command:
  python -m circlemix_jax.experiments --config configs/paper.py --workdir runs/paper

  Writes runs/paper/<stage>/<method>/fold<k> for every run (a rerun skips the
  finished ones), then runs/paper/results.csv, results.md (Tables 1 and 2; the
  balanced accuracy pooled over the folds with a 95% subject-bootstrap interval,
  plain and under each run's decision rule; the spread over folds and seeds; a
  paired comparison against the baseline; per-centre sclerotic recall when the
  manifest has a `center` column) and confusion_c5.png / confusion_binary.png
  (Figure 3). Fields shared by all runs live under `base` and take the usual
  overrides, e.g. --config.base.data.manifest=PATH, --config.base.num_epochs=20,
  --config.folds="(0, 1)", --config.stages="('binary',)".

  Several initialisation seeds (the split stays fixed by base.split_seed):
  --config.seeds="(0, 1, 2)" writes runs/paper/<stage>/<method>/seed<S>/fold<k>;
  the default () runs base.seed alone in the layout above.

Variants (the part after ':' in --config, comma-separated):
  configs/paper.py:smoke    the whole protocol in miniature on the built-in synthetic set (2 folds,
                            1 epoch, 32 px): 30 runs, 9 compiled train steps; with a cold compilation
                            cache, compiling is most of its time.
                            Scores are at chance (a dozen steps): it checks the plumbing, not CircleMix.
  configs/paper.py:scratch  every run with the from-scratch recipe of configs/c5.py:scratch (combines:
                            scratch,loco).
  configs/paper.py:loco     leave one centre out: base.split='leave_one_center_out' and folds=() (every
                            centre of the manifest's `center` column in turn), e.g.
                            --config=configs/paper.py:loco --config.stages="('binary',)"
                            --config.base.data.manifest=PATH.

Expected result and time:
  The full protocol is 75 runs of 8 epochs at 256 px; on the paper's 6,861 images that is a GPU job
  (each C5 run is about 33,000 images per epoch pass). See docs/RESULTS.md for the binary stage on the
  public Bueno set on this 2-core CPU.
"""

import ml_collections

from circlemix_jax import defaults

# Set by each run (stage, method, fold, parent), so they are not shared fields.
PER_RUN_FIELDS = ("stage", "classes", "class_names", "parent_workdir", "fold")


def get_config(arg: str = ""):
    words = [w for w in arg.split(",") if w]
    if any(w not in ("smoke", "loco", "scratch") for w in words):
        raise ValueError(f"config arg {arg!r} must be '' or comma-separated words from 'smoke', 'loco', 'scratch'")
    c = ml_collections.ConfigDict()
    c.folds = (0, 1, 2, 3, 4)  # () = every fold (every centre when leaving centres out)
    c.seeds = ()  # initialisation seeds; () = base.seed alone, in the seed-less run layout
    c.methods = ("baseline", "cutmix", "circlemix")
    c.stages = ("c5", "nc2", "c3", "c2", "binary")
    # The pooled interval: a percentile bootstrap over subjects, fixed so that tables are reproducible.
    c.bootstrap_resamples = 2000
    c.bootstrap_seed = 0
    base = defaults.get_config("c5", ",".join(w for w in words if w in ("smoke", "scratch")))
    base.unlock()
    for field in PER_RUN_FIELDS:
        del base[field]
    del base.data["label_map"]  # the binary stage maps five labels onto two itself
    del base.mix["method"]
    if "loco" in words:
        base.split = "leave_one_center_out"
        c.folds = ()
    if "smoke" in words:
        if "loco" not in words:  # every centre: a manifest has few
            c.folds = (0, 1)
        base.num_epochs = 1
        base.data.image_size = 32
        base.augment.max_crop = 4
    c.base = base
    c.lock()
    return c
