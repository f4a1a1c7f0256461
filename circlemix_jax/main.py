"""Command line: train (or resume) one stage on one fold.

    python -m circlemix_jax.main --config configs/c5.py [--workdir DIR] [--config.fold=K] [--config.FIELD=VALUE]

Stages (one config file each): configs/c5.py (five classes), configs/nc2.py,
configs/c3.py, configs/c2.py (children, fine-tuned from C5's best checkpoint),
configs/binary.py (global sclerosis vs the rest).

Config arguments, after ':' and comma-separated: smoke (a tiny run), scratch
(the recipe without ImageNet weights), and a method: baseline, mixup, cutmix,
circlemix. Example: --config=configs/binary.py:scratch,circlemix

Most-used fields: data.manifest (CSV path,label,subject[,center]; '' = the
built-in synthetic set), fold, split (subject_kfold | leave_one_center_out),
seed (initialisation) and split_seed, data.image_size, num_epochs, batch_size,
optim.lr, mix.method, model.init_from (converted ImageNet weights), eval.tta,
eval.decision (argmax | prior | val). --print_config prints every field of the
resolved config and exits without touching the workdir.

Multi-process (one process per host, e.g. a TPU pod or several GPU nodes): run the
same command in every process, adding `--distributed` where JAX can detect the
cluster (Cloud TPU VMs, SLURM, Open MPI), or else `--coordinator=HOST:PORT
--num_processes=N --process_id=I` (or the env vars JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Exit codes: 0 done, or stopped by SIGTERM (preemption) after saving a
checkpoint; 130 stopped by SIGINT (Ctrl-C) after saving; 2 bad input or config,
with the workdir left as it was; 3 a NaN/Inf in the loss or gradients.
Rerunning the same command resumes.
"""

from __future__ import annotations

# Catch SIGTERM and SIGINT before anything slow (imports, decoding, the first compile),
# so a stop at any moment ends with a message and the right exit code, not a bare kill.
from circlemix_jax.cli import EXIT_CODES, install_stop_handlers  # isort: skip

STOP = install_stop_handlers() if __name__ == "__main__" else None

import sys  # noqa: E402

from circlemix_jax import cli, defaults  # noqa: E402

EXIT_NONFINITE = 3


def run() -> None:
    """CLI entry (`python -m circlemix_jax.main`, `circlemix-train`); flags are defined
    here so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/c5.py or configs/c5.py:smoke.", lock_config=True)
    print_config = flags.DEFINE_bool("print_config", False, "Print the resolved config (every field, after the "
                                     "overrides) and exit without touching the workdir.")
    workdir_flag = flags.DEFINE_string("workdir", None, "Run folder; default runs/<stage>/<method>/fold<k> "
                                       "(.../seed<S>/fold<k> with --config.seed=S other than 0).")
    distributed = flags.DEFINE_bool("distributed", False, "Join a multi-process job, detecting the cluster "
                                    "(Cloud TPU VM, SLURM, Open MPI); implied by the three flags below.")
    coordinator = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 of a multi-process job "
                                      "(default $JAX_COORDINATOR_ADDRESS).")
    num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the job (default $JAX_NUM_PROCESSES).")
    process_id = flags.DEFINE_integer("process_id", None,
                                      "This process, 0..num_processes-1 (default $JAX_PROCESS_ID).")

    @cli.command
    def main() -> None:
        cli.maybe_initialize_distributed(distributed.value, coordinator.value, num_processes.value, process_id.value)
        from circlemix_jax import train  # after distributed init

        config = config_flag.value
        workdir = workdir_flag.value or defaults.default_workdir(config)
        if print_config.value:
            print(config.to_json_best_effort(indent=1, sort_keys=True))
            print(f"# workdir: {workdir}")
            return
        stop = STOP or install_stop_handlers()  # an entry-point script imports this module, then calls run()
        try:
            train.train_and_evaluate(config, workdir, stop=stop)
        except train.Stopped as e:
            saved = (f"saved a checkpoint at step {e.step} in {e.workdir}" if e.step is not None
                     else f"stopped before training began, nothing to save in {e.workdir}")
            print(f"{stop.name}: {saved}; rerun the same command to resume", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODES[e.signum])
        except FloatingPointError as e:
            # Not a bug to debug from a traceback: the message names the step and the way out.
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_NONFINITE)

    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config_flags=("config",)))


if __name__ == "__main__":
    run()
