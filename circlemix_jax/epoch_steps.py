"""The training steps of an epoch: batches to the device, the steps, their metrics, stops and checkpoints.

`train.train` runs one `run_steps` per epoch and `bench --end-to-end` times the
same function, so the benchmark's loop is the one users train with. The host
never waits for the device between steps (see `run_steps`): on an accelerator a
wait leaves the device idle while the host gathers the next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from circlemix_jax import checkpoint, step as steplib
from circlemix_jax.cli import StopRequest
from circlemix_jax.data import pipeline
from circlemix_jax.progress import Progress
from circlemix_jax.summary import SummaryWriter


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGINT) ended the run after saving what there was to save.

    Attributes:
      signum: the signal.
      step: the step saved in `latest`, or None when training had not started.
      workdir: the run folder.
    """

    def __init__(self, signum: int, step: int | None, workdir: str):
        super().__init__(signum, step, workdir)
        self.signum, self.step, self.workdir = signum, step, workdir


def save_and_stop(ckpts, step: int, state, progress, stop: StopRequest, workdir: str):
    """Saves `state` as `latest`, waits for the write, and raises `Stopped`."""
    ckpts.save(checkpoint.LATEST, step, state, progress)
    ckpts.wait()  # `state` was donated to the step: the save must finish before the process ends
    raise Stopped(stop.signum, step, workdir)


def stop_agreed(stop: StopRequest) -> bool:
    """Whether to stop now, the same answer in every process; call at the same point in each.

    A stop signal reaches the processes of a job at different times (a preemption
    notice may reach one host only), and a process that stopped alone would leave
    the others waiting in their next collective for ever. So with several
    processes none acts on its own flag: this gathers every process's (it waits
    for them), and a process stops when any was told to.
    """
    if jax.process_count() == 1:
        return bool(stop)
    return _settle(stop, bool(multihost_utils.process_allgather(np.int32(bool(stop))).max()))


def _settle(stop: StopRequest, agreed: bool) -> bool:
    if agreed and not stop:
        stop.signum = signal.SIGTERM  # another process was told to stop
    return agreed


class StepStopVote:
    """`stop_agreed` after every training step, without waiting for the device.

    Each process casts its flag into a one-number all-reduce after each step and
    reads the result cast `STOP_LAG` steps earlier, which the device has long
    finished: every process reads the same votes at the same steps, so all stop
    at one step, `STOP_LAG` steps after the first signal. JAX's preemption
    service, where it catches the signal itself, agrees on a step the same way.
    One process: its own flag, at once.
    """

    def __init__(self, stop: StopRequest, mesh):
        self.stop, self.mesh = stop, mesh
        self.multi = jax.process_count() > 1
        self._cast = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P())) if self.multi else None
        self._votes = collections.deque()

    def after(self, step: int) -> bool:
        """Whether every process stops after `step`."""
        if not self.multi:
            return bool(self.stop)
        flags = np.full((len(self.mesh.local_devices),), bool(self.stop), np.int32)
        self._votes.append(self._cast(steplib.shard_batch({"stop": flags}, self.mesh)["stop"]))
        agreed = len(self._votes) > STOP_LAG and bool(self._votes.popleft())
        return _settle(self.stop, multihost_utils.reached_preemption_sync_point(step) or agreed)


# Steps between a stop signal and the step at which every process of a job stops.
STOP_LAG = 2

# Batches copied to the device ahead of the step that uses them (pipeline.prefetch).
PREFETCH_DEPTH = 2
# Metrics of the newest steps stay on the device when a progress line is due: reading them
# would wait for the step just dispatched and leave the device idle until the next one.
METRICS_LAG = 1


@dataclasses.dataclass
class Loop:
    """What every training step needs besides the state and the batch.

    Attributes:
      config: the run's config.
      m: the compiled machinery.
      spe: steps per epoch.
      root_rng: the run's root key; each step folds in its step number.
      writer: TensorBoard writer (disabled off process 0).
      meter: progress lines and img/s.
      ckpts: the run's checkpoints (saved on a stop or every `checkpoint_every_steps`).
      stop: polled after every step.
      workdir: the run folder, named in `Stopped`.
    """

    config: object
    m: object  # train.Machinery: mesh and train_fn
    spe: int
    root_rng: jax.Array
    writer: SummaryWriter
    meter: Progress
    ckpts: object
    stop: StopRequest
    workdir: str


def run_steps(loop: Loop, state, batches, step: int, epoch: int, progress: dict):
    """Train steps over `batches` (host numpy batches); the metrics of every step are flushed on return.

    Nothing here waits for the device between steps: batches are copied
    `PREFETCH_DEPTH` ahead, the learning rate is a host value, and metrics are
    read every `log_every_steps`, `METRICS_LAG` steps behind the newest.

    Returns:
      (state, step) after the last batch.

    Raises:
      Stopped: a stop signal arrived (the state is saved as `latest` first).
      FloatingPointError: a non-finite loss or gradient.
    """
    config, m, meter, spe = loop.config, loop.m, loop.meter, loop.spe
    vote = StepStopVote(loop.stop, m.mesh)
    pending = []

    def flush(keep: int = 0):
        nonlocal pending
        done, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        return _flush_metrics(config, done, step - keep, spe, loop.writer, meter, loop.ckpts)

    for batch in pipeline.prefetch(batches, lambda b: steplib.shard_batch(b, m.mesh), PREFETCH_DEPTH):
        lr = np.float32(steplib.learning_rate(config, spe, step))  # a host value: no sync with the device
        if not meter.is_compiled:
            meter.compiling()
        state, metrics = m.train_fn(state, batch, loop.root_rng, lr)
        step += 1
        if not meter.is_compiled:
            jax.block_until_ready(metrics)  # once per process, to time the compile apart
            meter.compiled(step)
        pending.append(metrics)
        if meter.due(step) or step % spe == 0:
            # Only the newest step pending (steps slower than a line a minute): read it, so every line has a loss.
            lagged = step % spe and len(pending) > METRICS_LAG
            losses = flush(keep=METRICS_LAG if lagged else 0)
            meter.report(step, epoch, config.num_epochs, losses, lr)
        stopping = vote.after(step)
        if stopping or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and step % spe):
            flush()
            if stopping:
                save_and_stop(loop.ckpts, step, state, progress, loop.stop, loop.workdir)
            loop.ckpts.save(checkpoint.LATEST, step, state, progress)
    flush()
    return state, step


def _flush_metrics(config, pending: list, step: int, spe: int, writer, meter, ckpts) -> float | None:
    """Pulls step metrics to the host, stops loudly on NaN/Inf, logs means to TensorBoard.

    Args:
      pending: the metrics of consecutive steps, the last of them `step`.

    Returns:
      The mean training loss of the pulled steps, or None when there were none.
    """
    if not pending:
        return None
    host = jax.device_get(pending)
    bad = next((k for k, m in enumerate(host) if m["nonfinite"]), None)
    if bad is not None:
        ckpts.wait()  # the last good checkpoint may still be writing in the background
        saved = ckpts.latest_step()
        kept = (f"the last good checkpoint (step {saved}) is kept" if saved is not None
                else "no checkpoint had been saved yet")
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step - len(host) + 1 + bad} (loss={host[bad]['loss']}); the "
            f"update was skipped and {kept}; lower --config.optim.lr or check the data")
    means = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
    means["train/lr"] = steplib.learning_rate(config, spe, step)
    if (img_s := meter.img_s()) is not None:
        means["train/img_per_s_running"] = img_s
    writer.scalars(step, means)
    return means["train/loss"]
