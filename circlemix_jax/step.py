"""The train state, and the data-parallel train and eval steps.

Each step is a per-device program (`jax.shard_map` over a 1-D mesh with axis
'data', wrapped in `jax.jit`): pmap's model with the current API. Gradients and
BatchNorm statistics are averaged over the axis, so 1 and N devices compute the
same update for the same global batch.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from circlemix_jax import augment
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


def make_model(config, axis_name: str | None = AXIS) -> EfficientNetB0:
    """The configured EfficientNet-B0 for this stage's classes."""
    return EfficientNetB0(
        num_classes=len(config.classes), padding=config.model.padding, bn_eps=config.model.bn_eps,
        bn_momentum=config.model.bn_momentum, dropout_rate=config.model.dropout_rate,
        drop_path_rate=config.model.drop_path_rate, dtype=jnp.dtype(config.model.dtype),
        axis_name=axis_name)


def make_optimizer(config) -> optax.GradientTransformation:
    """SGD with momentum whose learning rate is set by each step's `lr` argument.

    The lr is a hyperparameter in the optimizer state (`optax.inject_hyperparams`),
    not a schedule compiled into the step: a boundary in steps depends on each
    fold's training-set size, and as a constant it would make every fold compile
    its own train step. The schedule is `learning_rate`, evaluated on the host.
    """
    return optax.inject_hyperparams(optax.sgd)(learning_rate=config.optim.lr, momentum=config.optim.momentum)


def learning_rate(config, steps_per_epoch: int, step: int) -> float:
    """The lr of `step`: divided by `decay_factor` at `decay_at` of all steps (paper 4.2)."""
    boundary = max(1, int(config.optim.decay_at * config.num_epochs * steps_per_epoch))
    return config.optim.lr * (config.optim.decay_factor if step >= boundary else 1.0)


def init_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    """A fresh train state from model variables."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]))


def prepare_images(config, rng: jax.Array, images: jax.Array, labels: jax.Array):
    """Basic augmentation, normalisation and mixing of one device's uint8 batch.

    Returns:
      (normalised float images, soft labels (B, K), lambda (B,)).
    """
    aug_rng, mix_rng = jax.random.split(rng)
    x = images.astype(jnp.float32) / 255.0
    if config.augment.basic:
        x = augment.basic_augment(aug_rng, x, max_crop=config.augment.max_crop)
    x = (x - jnp.asarray(config.data.mean)) / jnp.asarray(config.data.std)
    return augment.mix(mix_rng, x, labels, num_classes=len(config.classes), **config.mix.to_dict())


def _l2(tree) -> jax.Array:
    return optax.tree.norm(tree)


def train_step(state: TrainState, batch: dict, rng: jax.Array, lr: jax.Array, *, config, model: EfficientNetB0,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One SGD step at learning rate `lr` on one device's shard; call through `parallel_train_step`.

    A non-finite loss or gradient leaves the state unchanged and raises the
    `nonfinite` metric, so the last good state is what gets checkpointed.
    """
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
    data_rng, dropout_rng = jax.random.split(rng)
    images, soft_labels, lam = prepare_images(config, data_rng, batch["image"], batch["label"])

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                      train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
        # The global-batch loss (equal shards: mean of per-device means). Averaging here
        # with pmean, not on the gradients afterwards: params are device-invariant under
        # shard_map, so autodiff already sums their cotangents over the axis, and the
        # gradient of this pmean is exactly the global-mean gradient.
        loss = lax.pmean(optax.softmax_cross_entropy(logits, soft_labels).mean(), AXIS)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = _l2(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    accuracy = lax.pmean(jnp.mean(jnp.argmax(logits, -1) == batch["label"]), AXIS)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
               "param_norm": _l2(params), "update_norm": _l2(updates),
               "lambda": lax.pmean(jnp.mean(lam), AXIS), "nonfinite": ~finite}
    return new_state, metrics


# Each piece adds a copy of the network to compile. On a 16-core CPU, 4 pieces gave
# 452 img/s for a 5.2 s compile, 8 gave 466 img/s for 10.7 s (1 piece: 325, 1.7 s).
_MAX_EVAL_PIECES = 4


def eval_pieces(batch: int, backend: str | None = None, cores: int | None = None,
                devices: int | None = None) -> int:
    """How many independent pieces the eval step splits one device's batch into.

    On CPU, XLA runs each op on its intra-op thread pool, but at eval batch sizes
    most ops are too small to keep every core busy. Independent copies of the
    forward pass, each on a slice of the batch, give XLA's executor work to run
    side by side. Eval img/s at 128 px, batch 16 (BENCHMARKS.md, "Eval in pieces"):
    2 cores 1.15-1.2x with 2 pieces; 4 cores 1.7x with 4; 16 cores 1.4x with 4.
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
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(config.data.mean)) / jnp.asarray(config.data.std)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

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
    """jit(shard_map(train_step)): state, key and lr replicated, batch split on 'data'.

    The state argument is donated: callers must use the returned state.
    """
    fn = functools.partial(train_step, config=config, model=model, tx=tx)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=0)


def parallel_eval_step(config, model, mesh: Mesh) -> Callable:
    """jit(shard_map(eval_step)): returns logits sharded like the images."""
    fn = functools.partial(eval_step, config=config, model=model)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))


def parallel_prepare(config, mesh: Mesh) -> Callable:
    """The train step's augmentation alone, for logging a mixed batch as an image."""

    def fn(images, labels, rng):
        rng = jax.random.fold_in(jax.random.fold_in(rng, 0), lax.axis_index(AXIS))
        x, soft, lam = prepare_images(config, jax.random.split(rng)[0], images, labels)
        x = x * jnp.asarray(config.data.std) + jnp.asarray(config.data.mean)
        return jnp.clip(x, 0, 1), soft, lam

    spec = P(AXIS)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P()), out_specs=(spec, spec, spec)))


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
