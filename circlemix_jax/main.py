"""Command line: train (or resume) one stage on one fold.

    python -m circlemix_jax.main --config configs/c5.py [--workdir DIR] [--config.fold=K] [--config.FIELD=VALUE]

Multi-process (one process per host, e.g. a TPU pod or several GPU nodes): run the
same command in every process, adding `--distributed` where JAX can detect the
cluster (Cloud TPU VMs, SLURM, Open MPI), or else `--coordinator=HOST:PORT
--num_processes=N --process_id=I` (or the env vars JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Exit codes: 0 done (or preempted by SIGTERM after saving a checkpoint), 2 bad
input or config, 3 a NaN/Inf in the loss or gradients.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from circlemix_jax import defaults
from circlemix_jax.errors import EXIT_USAGE, InputError, exits_cleanly

EXIT_NONFINITE = 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/c5.py or configs/c5.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default runs/<stage>/<method>/fold<k>.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process job, detecting the cluster "
                                 "(Cloud TPU VM, SLURM, Open MPI); implied by the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 of a multi-process job "
                                   "(default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (default $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 (default $JAX_PROCESS_ID).")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from None


def maybe_initialize_distributed(force: bool = False, coordinator: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins a multi-process job (TPU pod slice, multi-node GPU) when launched as one.

    JAX itself reads only JAX_COORDINATOR_ADDRESS from the environment and
    detects the rest on known clusters; JAX_NUM_PROCESSES and JAX_PROCESS_ID are
    read here so a plain `N processes on some hosts` launch works too.

    Args:
      force: initialize even with no sign of a multi-process launch (cluster auto-detection).
      coordinator: HOST:PORT of process 0; default $JAX_COORDINATOR_ADDRESS.
      num_processes: default $JAX_NUM_PROCESSES.
      process_id: default $JAX_PROCESS_ID.

    Raises:
      InputError: an incomplete or inconsistent multi-process launch.
    """
    import jax  # noqa: PLC0415 - must run before any other JAX call

    # Compiling B0 takes tens of seconds on a CPU; a persistent cache makes reruns start at once.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        from circlemix_jax.synthetic import cache_root  # noqa: PLC0415

        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # GKE TPU pods
    if not (force or coordinator or (num_processes or 1) > 1 or process_id or multi_tpu):
        return
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, TypeError) as e:
        raise InputError(f"cannot join the multi-process job ({e}); give --coordinator=HOST:PORT "
                         "--num_processes=N --process_id=I, or run on a cluster JAX detects") from None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # On CPU each process gets its own cache key for the same program and only process 0
        # writes the cache, so process 0 would start at once and process 1 compile for a minute;
        # gloo gives up on a collective whose peer is 30 s late. Compiling in both keeps them in step.
        jax.config.update("jax_enable_compilation_cache", False)


@exits_cleanly
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every save at INFO; keep the console to our own progress lines.
    logging.set_verbosity(logging.WARNING)
    maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from circlemix_jax import train  # noqa: PLC0415 - after distributed init

    config = _CONFIG.value
    try:
        train.train_and_evaluate(config, _WORKDIR.value or defaults.default_workdir(config))
    except FloatingPointError as e:
        # Not a bug to debug from a traceback: the message names the step and the way out.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NONFINITE)


def _parse(argv):
    """absl's flag parsing, but a bad flag or config field is one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse)


if __name__ == "__main__":
    run()
