"""Command line: train (or resume) one stage on one fold.

    python -m circlemix_jax.main --config configs/c5.py [--workdir DIR] [--config.fold=K] [--config.FIELD=VALUE]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from circlemix_jax import defaults
from circlemix_jax.errors import EXIT_USAGE, exits_cleanly

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/c5.py or configs/c5.py:smoke.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default runs/<stage>/<method>/fold<k>.")


def maybe_initialize_distributed() -> None:
    """Joins a multi-process job (TPU pod slice, multi-node GPU) when launched as one."""
    import jax  # noqa: PLC0415 - must run before any other JAX call

    multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or multi_tpu:
        jax.distributed.initialize()


@exits_cleanly
def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every save at INFO; keep the console to our own progress lines.
    logging.set_verbosity(logging.WARNING)
    maybe_initialize_distributed()
    from circlemix_jax import train  # noqa: PLC0415 - after distributed init

    config = _CONFIG.value
    train.train_and_evaluate(config, _WORKDIR.value or defaults.default_workdir(config))


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
