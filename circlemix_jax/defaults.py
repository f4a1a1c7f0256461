"""The paper's settings, shared by every stage config in `configs/`.

`configs/<stage>.py` files are one-line wrappers around `get_config(stage, arg)`,
so the experiments driver can build the same configs programmatically.
"""

from __future__ import annotations

import os

import ml_collections

FIVE_CLASSES = ("normal", "periglomerular_fibrosis", "obsolescent", "solidified", "disappearing")
BINARY_CLASSES = ("non_sclerotic", "global_sclerosis")
# Global sclerosis = obsolescent + solidified + disappearing (ids 2, 3, 4).
SCLEROTIC = ("obsolescent", "solidified", "disappearing")

# Which global class ids each stage of the hierarchy trains on (paper, Fig. 2).
STAGE_CLASSES = {
    "c5": (0, 1, 2, 3, 4),
    "nc2": (0, 1),
    "c3": (2, 3, 4),
    "c2": (3, 4),
    "binary": (0, 1),
}
CHILD_STAGES = ("nc2", "c3", "c2")
METHODS = ("baseline", "mixup", "cutmix", "circlemix")
# ImageNet statistics in the 0-1 pixel scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(stage: str = "c5", arg: str = "") -> ml_collections.ConfigDict:
    """Builds the config of one stage.

    Args:
      stage: one of `STAGE_CLASSES`.
      arg: comma-separated words, each 'smoke' (a tiny run for tests),
        'scratch' (the recommended recipe without ImageNet weights, `scratch`)
        or a method name from `METHODS` ('baseline' means no mixing). Example:
        'scratch,circlemix'.

    Returns:
      An unlocked-for-reading, locked-for-new-fields ConfigDict.
    """
    if stage not in STAGE_CLASSES:
        raise ValueError(f"unknown stage {stage!r}; choose from {sorted(STAGE_CLASSES)}")
    words = [w for w in arg.split(",") if w]
    bad = [w for w in words if w not in ("smoke", "scratch") and w not in METHODS]
    if bad:
        raise ValueError(f"config arg {bad[0]!r} is neither 'smoke', 'scratch' nor a method {METHODS}")
    methods = [w for w in words if w in METHODS]

    c = ml_collections.ConfigDict()
    c.stage = stage
    # The label space: stage ids index into class_names; the binary task has its own.
    c.class_names = BINARY_CLASSES if stage == "binary" else FIVE_CLASSES
    c.classes = STAGE_CLASSES[stage]
    # Child stages start from the best checkpoint of this parent workdir ('' = derived).
    c.parent_workdir = ""
    # Two seeds, so repeats can vary one and hold the other fixed: `split_seed` decides
    # which subjects go to train/val/test; `seed` decides the initialisation, the data
    # order, the augmentation and the mixing.
    c.split_seed = 0
    c.seed = 0
    c.fold = 0
    c.num_folds = 5
    c.val_fraction = 0.25
    # 'subject_kfold' (paper): test = fold `fold` of num_folds subject-level folds.
    # 'leave_one_center_out': test = the manifest's `center` number `fold` (sorted names);
    # num_folds is then unused and the folds are the centres.
    c.split = "subject_kfold"

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # '' = the built-in synthetic set.
    # Maps manifest label names onto class_names (used by the binary task).
    c.data.label_map = {name: "global_sclerosis" for name in SCLEROTIC} | {
        "normal": "non_sclerotic", "periglomerular_fibrosis": "non_sclerotic"} if stage == "binary" else {}
    c.data.image_size = 256
    c.data.synthetic_count = 360  # images in the built-in set (paper's class proportions).
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    # 'dataset' (the paper's mean/std), or a per-image standardisation that removes the
    # stain's strength: 'od_per_image' or 'gray_per_image' (colour.model_input).
    c.data.input_norm = "dataset"
    # True: training batches draw every (centre, class) cell of the training set equally
    # often (`pipeline.balanced_probs`; from the manifest's `center` column, else the
    # classes only), so a centre's look says nothing about the label.
    c.data.balance_centers = False
    c.data.workers = 4
    # Where the decoded images live (image_cache.py): 'memory' (decoded at every start),
    # 'disk' (decoded once per image size into a memory-mapped file under cache_dir, reused
    # by later runs, folds and stages; a changed image or manifest gets a new file), or
    # 'auto': disk when the run's images would take more than cache_memory_mib decoded.
    c.data.cache = "auto"
    c.data.cache_memory_mib = 8192
    c.data.cache_dir = ""  # '' = $CIRCLEMIX_CACHE/decoded (default ~/.cache/circlemix_jax/decoded)

    c.augment = ml_collections.ConfigDict()
    c.augment.basic = True  # h/v flips at 50% and a random crop of 0..max_crop px (paper 4.3).
    c.augment.max_crop = 16
    # Beyond the paper (all off here; see the 'scratch' recipe below). Checked by
    # augment.check_geometry and colour.check_options.
    c.augment.crop_fraction = 0.0  # > 0: the crop is this fraction of the image side, not max_crop px.
    c.augment.translate = False  # reflect-pad and shift (no zoom) instead of crop-and-resize.
    c.augment.transpose = False  # with the two flips: all 8 symmetries of the square.
    c.augment.rotate_degrees = 0.0
    # Zoom each image by a factor drawn log-uniformly from (lowest, highest); below 1 the
    # glomerulus shrinks, as in a crop with a wider margin. (1, 1) = no zoom.
    c.augment.scale = (1.0, 1.0)
    c.augment.colour = ml_collections.ConfigDict(
        {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "stain": 0.0, "density": 0.0,
         "grayscale": 0.0, "blur": 0.0, "noise": 0.0})

    c.mix = ml_collections.ConfigDict()
    c.mix.method = "none" if not methods or methods[0] == "baseline" else methods[0]
    c.mix.alpha = 1.0
    c.mix.sampler = "paper"  # 'paper' (sorted uniform pair) or 'beta' (wrap-around, unbiased).
    c.mix.granularity = "batch"  # the authors mix one mask per batch.
    c.mix.prob = 1.0
    c.mix.lam_mode = "pixels"  # or 'formula', or 'mask' (glomerulus pixels; needs the manifest's mask column)
    c.mix.label_smoothing = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.padding = "symmetric"
    c.model.bn_eps = 1e-5
    c.model.bn_momentum = 0.9
    c.model.dropout_rate = 0.2
    c.model.drop_path_rate = 0.2
    c.model.dtype = "float32"
    # The implementation of the 1x1, depthwise and BatchNorm layers (models.layers): 'auto'
    # (the CPU-fast set on a CPU, flax's and XLA's elsewhere), 'cpu' or 'xla'. The same function.
    c.model.layers = "auto"
    # A child stage's classifier: 'parent' (the parent's rows for the child's classes) or
    # 'fresh' (random); see hierarchy.child_classifier. Unused by C5 and binary.
    c.model.child_head = "parent"
    c.model.init_from = ""  # a directory written by `python -m circlemix_jax.convert`.

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.01
    c.optim.momentum = 0.9
    c.optim.decay_at = 0.5  # lr /10 at half of the epochs (paper 4.2).
    c.optim.decay_factor = 0.1
    # Beyond the paper (off here), checked by step.check_optim.
    c.optim.schedule = "step"  # 'step' (the paper's) or 'cosine'.
    c.optim.warmup_epochs = 0.0  # linear warm-up from 0, before either schedule.
    c.optim.nesterov = False
    c.optim.weight_decay = 0.0  # L2 on conv and dense kernels (not BatchNorm, not biases).
    c.optim.ema_decay = 0.0  # > 0: evaluate an exponential moving average of the weights.
    c.optim.logit_adjust = 0.0  # tau > 0: logit-adjusted loss, so argmax targets balanced accuracy.

    # Evaluation (checked by decision.check_options). Off by default: the paper's argmax.
    c.eval = ml_collections.ConfigDict()
    c.eval.tta = False  # average the logits of the 8 dihedral views in val, test and predict.
    # 'argmax' (paper), 'prior' (subtract the training set's log class prior from the logits)
    # or 'val' (a per-class logit bias fitted on the validation set for balanced accuracy).
    c.eval.decision = "argmax"

    c.batch_size = 16  # global, split across devices.
    c.eval_batch_size = 64
    c.num_epochs = 8
    # The best checkpoint is chosen among epochs from this fraction of num_epochs on (0 = all).
    c.select_from = 0.0
    c.log_every_steps = 10
    c.checkpoint_every_steps = 0  # 0 = only at epoch ends (and on SIGTERM).

    if "scratch" in words:
        scratch(c)
    if "smoke" in words:
        c.data.image_size = 32
        c.data.synthetic_count = 150
        c.data.workers = 2
        c.batch_size = 8
        c.eval_batch_size = 32
        c.num_epochs = 2
        c.log_every_steps = 2
    c.lock()
    return c


def scratch(c: ml_collections.ConfigDict) -> None:
    """The recommended recipe for training from random weights, set on `c` in place.

    The paper fine-tunes ImageNet weights; from scratch on a few hundred images
    its short step schedule leaves the network undertrained and its choice of
    epoch noisy. This recipe trains longer at a lower resolution, warms up and
    decays along a cosine, regularises (weight decay, label smoothing),
    evaluates an average of the weights, draws batches balanced over centre and
    class (so the argmax targets balanced accuracy and a centre's look carries no
    label), and makes colour, orientation and
    scale uninformative: the public set's centres differ in stain and in their share of
    sclerotic glomeruli, so colour is a shortcut that fails on a new centre. Each
    image is therefore standardised in optical density (`colour.model_input`).
    Sized to train one fold of the public set in under 30 minutes on a 2-core CPU.
    """
    c.data.image_size = 96
    c.batch_size = 32
    c.num_epochs = 30
    c.optim.lr = 0.05
    c.optim.schedule = "cosine"
    c.optim.warmup_epochs = 2.0
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.ema_decay = 0.99
    # The public set is 22% sclerotic: without this, errors were one-sided. The balanced
    # batches below hold the classes equally, which makes it a no-op; it acts again with
    # --config.data.balance_centers=False.
    c.optim.logit_adjust = 1.0
    c.select_from = 0.5  # not an early, high-lr epoch that a small validation set favours by chance
    c.mix.label_smoothing = 0.1
    c.augment.transpose = True
    c.augment.crop_fraction = 16 / 256  # the paper's 16 px at 256 px, at any size
    c.augment.rotate_degrees = 10.0
    # Glomeruli from 0.65 to 1.15 times their size in the crop: another centre may crop with a
    # wider or tighter margin, and a model trained at one scale then misses sclerotic glomeruli
    # (docs/RESULTS.md, "Zoom").
    c.augment.scale = (0.65, 1.15)
    # A blur up to 1% of the side (about 1 px at 96) and noise up to 0.03: a new scanner
    # is sharper or softer and noisier. With SESCAM held out, seeds 0-2 went from 87.2 / 90.0 /
    # 87.5 to 89.9 / 89.2 / 89.1, and seeds 3 and 4 gave 90.4 and 92.1 (docs/RESULTS.md, "Blur and noise").
    c.augment.colour.update({"brightness": 0.2, "contrast": 0.2, "saturation": 0.4, "hue": 0.04,
                             "stain": 0.4, "grayscale": 0.1, "blur": 0.01, "noise": 0.03})
    # Each image's optical density standardised over its own pixels: how strongly a lab
    # stains and how bright its scanner is cancel, so a stain strength seen only at one
    # centre cannot stand in for the label. Jitter alone did not remove that shortcut
    # (docs/RESULTS.md, leave one centre out).
    c.data.input_norm = "od_per_image"
    # Every (centre, class) cell of the training set drawn equally often: in the public set
    # the centre predicts the label (4% to 42% sclerotic), so a network can learn a centre's
    # look instead of the glomerulus. Balanced batches raised the held-out centre SESCAM by
    # about 6 points on each of three seeds (docs/RESULTS.md, "Batches balanced over centre
    # and class"). A manifest without a `center` column balances the classes only.
    c.data.balance_centers = True


def cache_root() -> str:
    """Where this machine keeps what can be rebuilt (the synthetic set, decoded images, compiled
    programs): $CIRCLEMIX_CACHE, else ~/.cache/circlemix_jax."""
    return os.environ.get("CIRCLEMIX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "circlemix_jax"))


def method_name(config: ml_collections.ConfigDict) -> str:
    """The method's name for paths and tables: 'baseline' when nothing is mixed."""
    return "baseline" if config.mix.method == "none" else config.mix.method


def default_workdir(config: ml_collections.ConfigDict) -> str:
    """runs/<stage>/<method>/fold<k>, or runs/<stage>/<method>/seed<S>/fold<k> for a seed other than 0.

    Rerunning the same command resumes the same run; repeats that differ only in
    `seed` (the usual way to measure seed noise) each get a folder of their own
    instead of being refused by the first one's.
    """
    seed = f"seed{config.seed}/" if config.seed else ""
    return f"runs/{config.stage}/{method_name(config)}/{seed}fold{config.fold}"


def field_defaults(stage: str) -> dict:
    """{dotted field: default} of a stage: what a field added later meant for runs made before it."""
    from circlemix_jax.rundir import flatten_dict  # keeps configs/ importing only this module

    return flatten_dict(get_config(stage).to_dict())
