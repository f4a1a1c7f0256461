"""The train state, and the data-parallel train and eval steps.

The batch is split over a 1-D mesh with axis 'data'. The train step is plain
`jax.jit` over the global batch (state replicated, batch `NamedSharding` on
'data'): the model, its BatchNorm, the loss and the metrics are written for one
batch and know nothing of the mesh; XLA's SPMD partitioner inserts the
reductions that make BatchNorm statistics, the loss and the gradients those of
the global batch, so 1 and N devices compute the same update. `jax.shard_map`
remains only where the semantics are per device:

- augmentation and mixing (`prepare_images`): each device mixes within its own
  shard with its own key (`step_keys` folds in the device index), as every run
  so far has, so resumed runs and recorded results draw exactly as before
  (dropout, drawn inside the model, now takes one key for the global batch:
  unchanged on one device, see `train_step`);
- eval (`eval_step`): no reduction crosses devices, and `eval_pieces` cuts each
  device's shard into independent pieces, which only a per-device program can
  express without moving data between devices.

Before this layout the whole train step was one shard_map, and the model had to
carry the mesh axis (BatchNorm `pmean`) and a cast of replicated kernels to
device-varying before each custom VJP. Plain jit removed both and measured as
fast (BENCHMARKS.md, "Train step: plain jit against shard_map").
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from circlemix_jax import augment, colour, models
from circlemix_jax.data import pipeline
from circlemix_jax.errors import InputError
from circlemix_jax.models import EfficientNetB0

AXIS = "data"


@struct.dataclass
class TrainState:
    """Everything that changes during training: one pytree, donated to each step.

    The PRNG stream is not stored: step keys are `fold_in(root, step)`, so the
    step counter restores the randomness exactly.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # {'params', 'batch_stats'} averaged over steps (`optim.ema_decay` > 0), else None.
    # In the state, so Orbax checkpoints it with everything else and resume stays exact.
    ema: Any = None
    # log class prior (K,) of the training set when the loss is logit-adjusted
    # (`optim.logit_adjust` > 0), else None; a per-fold constant kept in the state so
    # folds share one compiled step and a resume restores it.
    log_prior: Any = None


def make_model(config) -> EfficientNetB0:
    """`models.make_model`: the same model serves every step and any number of devices."""
    return models.make_model(config)


SCHEDULES = ("step", "cosine")


def _optim(config, name: str, default):
    # Runs saved before a field existed lack it in config.json; their value was the default.
    return config.optim.get(name, default)


def check_optim(config) -> None:
    """Validates the optimiser fields of `config.optim`.

    Raises:
      InputError: naming the field and its allowed values.
    """
    o = config.optim
    checks = (
        ("lr", o.lr, lambda v: v > 0, "> 0"),
        ("momentum", o.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("decay_at", o.decay_at, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("decay_factor", o.decay_factor, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("warmup_epochs", _optim(config, "warmup_epochs", 0.0), lambda v: 0 <= v <= config.num_epochs,
         f"in [0, num_epochs={config.num_epochs}]"),
        ("weight_decay", _optim(config, "weight_decay", 0.0), lambda v: 0 <= v < 1, "in [0, 1)"),
        ("ema_decay", _optim(config, "ema_decay", 0.0), lambda v: 0 <= v < 1, "in [0, 1) (0 = off)"),
        ("logit_adjust", _optim(config, "logit_adjust", 0.0), lambda v: 0 <= v <= 2, "in [0, 2] (0 = off)"),
    )
    for name, value, ok, allowed in checks:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise InputError(f"config field optim.{name}={value!r} must be a number {allowed}")
    select_from = config.get("select_from", 0.0)
    if isinstance(select_from, bool) or not isinstance(select_from, (int, float)) or not 0 <= select_from <= 1:
        raise InputError(f"config field select_from={select_from!r} must be a number in [0, 1]")
    if _optim(config, "schedule", "step") not in SCHEDULES:
        raise InputError(f"config field optim.schedule={o.schedule!r} must be one of {SCHEDULES}")
    if not isinstance(_optim(config, "nesterov", False), bool):
        raise InputError(f"config field optim.nesterov={o.nesterov!r} must be true or false")


def _decays(params) -> Any:
    """Weight decay applies to conv and dense kernels only, not to BatchNorm scales or biases.

    Decaying BatchNorm scales shrinks the features the next layer sees without
    regularising the function (BN renormalises them), and biases carry no capacity.
    """
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and weight decay; the learning rate is each step's `lr` argument.

    The lr is a hyperparameter in the optimizer state (`optax.inject_hyperparams`),
    not a schedule compiled into the step: a boundary in steps depends on each
    fold's training-set size, and as a constant it would make every fold compile
    its own train step. The schedule is `learning_rate`, evaluated on the host.

    Weight decay is PyTorch's SGD `weight_decay`: `wd * w` is added to the
    gradient before momentum (L2, masked by `_decays`). With plain SGD the
    decoupled form differs only by a constant factor, and this form keeps the
    values of the PyTorch recipes we compare with (1e-4 to 5e-4) meaningful.
    With no decay the transformation is exactly `optax.sgd`, so the state of runs
    saved before these fields existed still restores.
    """
    nesterov = _optim(config, "nesterov", False)
    weight_decay = _optim(config, "weight_decay", 0.0)

    def sgd(learning_rate, momentum):
        if not weight_decay:
            return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decays),
                           optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))

    return optax.inject_hyperparams(sgd)(learning_rate=config.optim.lr, momentum=config.optim.momentum)


def learning_rate(config, steps_per_epoch: int, step: int) -> float:
    """The lr of `step`: a linear warm-up from 0, then the configured schedule.

    'step' divides the lr by `decay_factor` at `decay_at` of all steps (paper 4.2);
    'cosine' decays it from `lr` to 0 along a half cosine over the steps after the
    warm-up (as `optax.warmup_cosine_decay_schedule`).
    """
    total = max(1, config.num_epochs * steps_per_epoch)
    warmup = int(_optim(config, "warmup_epochs", 0.0) * steps_per_epoch)
    peak = config.optim.lr
    if step < warmup:
        return peak * step / warmup
    if _optim(config, "schedule", "step") == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * peak * (1.0 + float(np.cos(np.pi * progress)))
    boundary = max(1, int(config.optim.decay_at * total))
    return peak * (config.optim.decay_factor if step >= boundary else 1.0)


def ema_enabled(config) -> bool:
    """Whether the run keeps an exponential moving average of its weights."""
    return _optim(config, "ema_decay", 0.0) > 0


def ema_update(ema: Any, params: Any, batch_stats: Any, step: jax.Array, decay: float) -> Any:
    """One EMA step, with the warm-up decay min(decay, (1 + n) / (10 + n)) at update n.

    The warm-up lets the average forget the random initialisation within the
    first few dozen steps: short runs would otherwise evaluate an average still
    dominated by it.
    """
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    new = {"params": params, "batch_stats": batch_stats}
    return jax.tree_util.tree_map(lambda e, x: d * e + (1.0 - d) * x, ema, new)


def log_prior(config, labels: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray | None:
    """log of the class frequencies the training batches hold (add-one smoothed), or None when unused.

    Args:
      config: the run's config; None unless `optim.logit_adjust` > 0.
      labels: the training labels, ids into the stage's classes.
      probs: the batches' sampling probabilities per example (`pipeline.balanced_probs`), or None
        for a plain shuffle.
    """
    if _optim(config, "logit_adjust", 0.0) <= 0:
        return None
    counts = pipeline.class_counts(labels, len(config.classes), probs)
    return np.log((counts + 1.0) / (counts.sum() + len(counts))).astype(np.float32)


def selectable_epoch(config, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) may become the best checkpoint.

    `select_from` (a fraction of `num_epochs`, default 0) keeps the early epochs out:
    with a small validation set, a high learning rate makes some early epoch score
    well by chance, and picking it discards the annealed end of a cosine run. The
    last epoch is always eligible, so every run has a best checkpoint.
    """
    first = int(np.ceil(config.get("select_from", 0.0) * config.num_epochs))
    return epoch + 1 >= min(max(first, 1), config.num_epochs)


def eval_variables(state: TrainState) -> dict:
    """The variables every evaluation uses: the EMA weights when the run keeps them.

    Validation (and so the best-epoch choice), test, predict and the hierarchy's
    children all read the model through this one function.
    """
    if state.ema is not None:
        return state.ema
    return {"params": state.params, "batch_stats": state.batch_stats}


def init_state(variables: dict, tx: optax.GradientTransformation, ema: bool = False,
               log_prior: np.ndarray | None = None) -> TrainState:
    """A fresh train state from model variables; `ema` starts the average at them.

    `log_prior` (see `log_prior`) switches on the logit-adjusted loss.
    """
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    average = None
    if ema:  # copies, so the average never aliases the donated live weights
        average = jax.tree_util.tree_map(jnp.array, {"params": params, "batch_stats": batch_stats})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema=average,
                      log_prior=None if log_prior is None else jnp.asarray(log_prior, jnp.float32))


def augment_geometry(config, rng: jax.Array, x: jax.Array) -> jax.Array:
    """Flips, crop or shift, transpose, rotation and zoom of float images (B, H, W, C), as configured."""
    a = config.augment
    if a.basic:
        crop = augment.crop_pixels(a.max_crop, a.get("crop_fraction", 0.0), x.shape[1])
        x = augment.basic_augment(rng, x, max_crop=crop, transpose=a.get("transpose", False),
                                  translate=a.get("translate", False))
    # Extra keys by fold_in, so runs without these features draw exactly as before.
    return augment.rotate(jax.random.fold_in(rng, 1), x, max_degrees=a.get("rotate_degrees", 0.0),
                          scale=tuple(a.get("scale", (1.0, 1.0))))


def augment_colour(config, rng: jax.Array, x: jax.Array) -> jax.Array:
    """Stain and colour jitter of RGB images in [0, 1] (B, H, W, 3), as configured."""
    a = config.augment
    if "colour" in a and not colour.is_off(a.colour):
        x = colour.augment(jax.random.fold_in(rng, 2), x, a.colour.to_dict())
    return x


def augment_images(config, rng: jax.Array, x: jax.Array) -> jax.Array:
    """Geometry, then colour and stain, of RGB images in [0, 1] (B, H, W, 3) as configured."""
    return augment_colour(config, rng, augment_geometry(config, rng, x))


def prepare_images(config, rng: jax.Array, images: jax.Array, labels: jax.Array, normalise: bool = True):
    """Augmentation (`augment_images`), normalisation and mixing of one device's uint8 batch.

    Each image is normalised before mixing, so a per-image normalisation
    (`colour.model_input`) sees one glomerulus, not a patchwork of two.

    Returns:
      (float images, normalised unless `normalise` is False, soft labels (B, K), lambda (B,)).
    """
    aug_rng, mix_rng = jax.random.split(rng)
    x = images.astype(jnp.float32) / 255.0
    masks = None
    if x.shape[-1] == 4:  # a glomerulus mask rides along as channel 4 (`masks`): same geometry
        x = augment_geometry(config, aug_rng, x)
        x, masks = x[..., :3], x[..., 3]
        x = augment_colour(config, aug_rng, x)
    else:
        x = augment_images(config, aug_rng, x)
    if normalise:
        x = colour.model_input(config.data, x)
    return augment.mix(mix_rng, x, labels, num_classes=len(config.classes), masks=masks, **config.mix.to_dict())


def _l2(tree) -> jax.Array:
    return optax.tree.norm(tree)


def step_keys(rng: jax.Array, step: jax.Array, device: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(augmentation and mixing key, dropout key) of device `device` (its mesh index) at one step.

    Derived from the run's root key and the step counter, so a resumed run draws
    exactly what an uninterrupted one would.
    """
    return tuple(jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, step), device)))


def prepare_shards(config, mesh: Mesh, normalise: bool = True) -> Callable:
    """`prepare_images` of every device's shard: (images, labels, rng, step) -> its outputs, split on 'data'.

    A shard_map, because mixing is per device: partners come from the device's own
    shard and each device draws with its own `step_keys`.
    """

    def fn(images, labels, rng, step):
        return prepare_images(config, step_keys(rng, step, lax.axis_index(AXIS))[0], images, labels,
                              normalise=normalise)

    spec = P(AXIS)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=(spec, spec, spec))


def train_step(state: TrainState, batch: dict, rng: jax.Array, lr: jax.Array, *, config, model: EfficientNetB0,
               tx: optax.GradientTransformation, mesh: Mesh) -> tuple[TrainState, dict]:
    """One SGD step at learning rate `lr` on the global batch; call through `parallel_train_step`.

    A non-finite loss or gradient leaves the state unchanged and raises the
    `nonfinite` metric, so the last good state is what gets checkpointed.
    """
    images, soft_labels, lam = prepare_shards(config, mesh)(batch["image"], batch["label"], rng, state.step)
    # One dropout key for the global batch: device 0's, which is the key single-device
    # runs always used. Random bits are partitionable (jax_threefry_partitionable), so
    # the masks do not depend on how the batch is split.
    dropout_rng = step_keys(rng, state.step, 0)[1]

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                      train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
        # Logit adjustment (Menon et al. 2021): the loss sees logits + tau * log prior, so
        # the raw logits, which every evaluation uses, learn the class-balanced decision
        # and their argmax targets balanced accuracy instead of accuracy.
        adjusted = logits if state.log_prior is None else logits + config.optim.logit_adjust * state.log_prior
        loss = optax.softmax_cross_entropy(adjusted, soft_labels).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = _l2(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ema = state.ema
    if ema is not None:
        ema = ema_update(ema, params, batch_stats, state.step, config.optim.ema_decay)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema,
                           log_prior=state.log_prior)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "param_norm": _l2(params), "update_norm": _l2(updates),
               "lambda": jnp.mean(lam), "nonfinite": ~finite}
    return new_state, metrics


# Each piece adds a copy of the network to compile; past 4 the eval speed-up levels off
# while the compile time keeps growing (BENCHMARKS.md, "Eval in pieces on CPU").
_MAX_EVAL_PIECES = 4


def eval_pieces(batch: int, backend: str | None = None, cores: int | None = None,
                devices: int | None = None) -> int:
    """How many independent pieces the eval step splits one device's batch into.

    On CPU, XLA runs each op on its intra-op thread pool, but at eval batch sizes
    most ops are too small to keep every core busy. Independent copies of the
    forward pass, each on a slice of the batch, give XLA's executor work to run
    side by side (BENCHMARKS.md, "Eval in pieces on CPU", has the figures).
    Eval BatchNorm uses running statistics, so every example's logits are the
    same however the batch is cut. GPUs and TPUs fill up on one batch: 1 piece.

    Args:
      batch: one device's batch size.
      backend: platform name; defaults to `jax.default_backend()`.
      cores: CPU cores this process may use; defaults to its affinity mask.
      devices: XLA devices sharing those cores; defaults to `jax.local_device_count()`.

    Returns:
      The largest divisor of `batch` that is at most the cores per device (and 4).
    """
    if (backend or jax.default_backend()) != "cpu":
        return 1
    if not cores:  # the affinity mask where the OS has one (Linux), else every core (macOS)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_device = max(1, cores // (devices or jax.local_device_count()))
    return max(d for d in range(1, min(per_device, _MAX_EVAL_PIECES, max(batch, 1)) + 1) if batch % d == 0)


def tta_views(x: jax.Array) -> list[jax.Array]:
    """The 8 dihedral views of a square NHWC batch: rotations by 0-270 degrees, each also mirrored.

    Glomeruli have no preferred orientation, and these are the symmetries of the
    pixel grid itself: no interpolation, so every view is exactly the image.
    """
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"dihedral views need square images, got {x.shape[1]}x{x.shape[2]}")
    rotations = [jnp.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return rotations + [jnp.flip(r, axis=2) for r in rotations]


def eval_step(state: TrainState, images: jax.Array, *, config, model: EfficientNetB0) -> jax.Array:
    """Logits of one device's shard with running BatchNorm statistics (see `eval_pieces`).

    With `config.eval.tta` they are the mean of the logits of the 8 `tta_views`.
    """
    x = colour.model_input(config.data, images.astype(jnp.float32) / 255.0)
    variables = eval_variables(state)

    def forward(x):
        # A Python loop, not lax.map: the pieces must be independent ops that XLA can run
        # concurrently, and a loop primitive would run them one after another.
        pieces = jnp.split(x, eval_pieces(x.shape[0]))
        return jnp.concatenate([model.apply(variables, piece, train=False) for piece in pieces])

    if not config.eval.tta:
        return forward(x)
    # lax.map over the views, not a Python loop or one 8x batch: the compiled program keeps
    # one copy of the network and the activations of one batch, at the price of running
    # the views one after another.
    return lax.map(forward, jnp.stack(tta_views(x))).mean(axis=0)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D 'data' mesh over all (or the first `num_devices`) devices."""
    devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
    return Mesh(devices, (AXIS,))


def parallel_train_step(config, model, tx, mesh: Mesh) -> Callable:
    """jit(train_step): state, key and lr replicated, batch split on 'data', state and metrics replicated.

    The state argument is donated: callers must use the returned state.
    """
    fn = functools.partial(train_step, config=config, model=model, tx=tx, mesh=mesh)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    return jax.jit(fn, in_shardings=(replicated, split, replicated, replicated), out_shardings=replicated,
                   donate_argnums=0)


def parallel_eval_step(config, model, mesh: Mesh) -> Callable:
    """jit(shard_map(eval_step)): returns logits sharded like the images."""
    fn = functools.partial(eval_step, config=config, model=model)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def parallel_prepare(config, mesh: Mesh) -> Callable:
    """The train step's augmentation alone (as at step 0), for logging a mixed batch as an image."""
    prepare = prepare_shards(config, mesh, normalise=False)

    def fn(images, labels, rng):
        x, soft, lam = prepare(images, labels, rng, 0)
        return jnp.clip(x, 0, 1), soft, lam

    return jax.jit(fn)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays split over 'data' (works multi-host)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Places a pytree on every device of the mesh, from this process's own copy.

    Not `jax.device_put`: with several processes it all-gathers every leaf to check
    that the processes agree (hundreds of gloo/ICI collectives for B0).
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def evaluate(eval_fn, state, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Logits for every example exactly once (padding masked out), gathered on the host."""
    outs = []
    for batch in pipeline.eval_batches(images, labels, batch_size):
        mask = batch.pop("mask")
        logits = eval_fn(state, shard_batch({"image": batch["image"]}, mesh)["image"])
        logits, mask = multihost_utils.process_allgather((logits, shard_batch({"m": mask}, mesh)["m"]),
                                                         tiled=True)
        outs.append(np.asarray(logits)[np.asarray(mask)])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
