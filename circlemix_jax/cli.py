"""Command-line plumbing shared by every entry point.

- Flag parsing whose every failure is one line on stderr and exit 2: a missing
  or broken config file, a misspelled config field (with the closest name), a
  value of the wrong type.
- Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) only raise a flag that
  the training loop reads at its next step, so it can save and exit cleanly.
- The persistent XLA compilation cache, and joining a multi-process job.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence

from circlemix_jax.errors import EXIT_INTERRUPTED, EXIT_USAGE, InputError, exits_cleanly

# Exit codes after a stop signal: preemption is a normal end of a job on a TPU VM
# or SLURM (the scheduler reruns the same command), Ctrl-C follows the shell's 128+SIGINT.
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: EXIT_INTERRUPTED}


class StopRequest:
    """Set by a stop signal; the training loop polls it between steps.

    Attributes:
      signum: the first stop signal received, or None.
    """

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def handle(self, signum, frame) -> None:  # the signal module's handler signature
        if self.signum is not None:
            # A second signal means "now": Orbax writes each checkpoint to a temporary
            # folder and renames it, so stopping mid-save cannot leave half a checkpoint.
            print(f"\n{signal.Signals(signum).name} again: stopping without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_CODES.get(signum, 1))
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next step (send it again to stop at once)",
              file=sys.stderr, flush=True)


def install_stop_handlers(request: StopRequest | None = None) -> StopRequest:
    """Routes SIGTERM and SIGINT to `request` (a new one by default) and returns it.

    Called first thing in a CLI, so a signal during imports, decoding or the first
    compile is caught too, rather than killing the process with no message.
    """
    request = request or StopRequest()
    for sig in EXIT_CODES:
        signal.signal(sig, request.handle)
    return request


def configure_compilation_cache() -> None:
    """Persistent XLA cache: compiling B0 takes tens of seconds on a CPU, reruns start at once.

    Must run before the first JAX computation. `JAX_COMPILATION_CACHE_DIR` wins.
    """
    import jax  # keeps `--help` and flag errors fast

    from circlemix_jax.defaults import cache_root

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "xla"))
    # Every program, not only the slow ones: a run compiles dozens that take 0.1-2 s each (the
    # init, the eval step, small array ops), and reading them back is faster. They add a few
    # kB each to the cache.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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
    import jax  # must run before any other JAX call

    configure_compilation_cache()
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


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of --name=V or --name V in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str):
    """Loads `path[:arg]` the way ml_collections does, but with one-line errors.

    Returns:
      The ConfigDict that `get_config(arg)` (or `get_config()`) returns.

    Raises:
      ValueError: a one-line reason naming the file.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("_circlemix_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:  # any failure of a user's config file is input, not our bug
        raise ValueError(f"{path} cannot be loaded: {type(e).__name__}: {_one_line(e)}") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # e.g. an unknown config argument
        raise ValueError(f"{path}: get_config({arg!r}) failed: {_one_line(e)}") from None


def config_field_names(config) -> list[str]:
    """Every settable field of a ConfigDict by dotted name (sub-dicts too, for prefixes)."""
    names = []

    def walk(d, prefix):
        for k, v in d.items():
            names.append(prefix + k)
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(config.to_dict(), "")
    return names


def closest_field(field: str, known: Sequence[str]) -> list[str]:
    """The known field a misspelled one most likely meant (empty when none is close).

    Fields of the same section come first, and an abbreviation counts as close:
    `optim.learning_rate` finds `optim.lr`, whose letters are its words' initials.
    """
    section, _, leaf = field.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    initials = "".join(w[0] for w in leaf.split("_") if w)
    for name, full in siblings.items():
        if len(name) > 1 and (name == initials or "".join(w[0] for w in name.split("_") if w) == leaf):
            return [full]
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if near:
        return [siblings[near[0]]]
    return difflib.get_close_matches(field, known, n=1, cutoff=0.6)


def check_config_overrides(argv: Sequence[str], flag: str, config) -> None:
    """Refuses `--flag.FIELD=...` overrides that name no field of `config`, suggesting the closest.

    Raises:
      ValueError: one line naming the unknown field.
    """
    known = config_field_names(config)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        field = arg[len(flag) + 3:].split("=", 1)[0]
        if field not in known:
            close = closest_field(field, known)
            hint = f" (did you mean --{flag}.{close[0]}?)" if close else ""
            raise ValueError(f"unknown config field --{flag}.{field}{hint}")


def parse_flags(argv: Sequence[str], config_flags: Sequence[str] = ()) -> list[str]:
    """absl's flag parsing, where every failure is `error: ...` on one line and exit 2.

    Args:
      argv: the full command line.
      config_flags: names of `config_flags.DEFINE_config_file` flags: their files
        are loaded first, so a missing file, a syntax error, a bad config argument
        or a misspelled field is named in one line.

    Returns:
      The remaining positional arguments, as `flags.FLAGS(argv)` returns them.
    """
    from absl import app, flags

    asked = [a for a in argv[1:] if a in ("--help", "-h", "-?", "--helpshort", "--helpfull")]
    if asked:  # absl's own help exits 1, and must not need a --config
        app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)
    try:
        for name in config_flags:
            spec = _flag_value(argv, name)
            if spec is None:
                raise ValueError(f"missing --{name}=FILE, e.g. --{name}=configs/c5.py")
            check_config_overrides(argv, name, load_config_file(spec))
        return flags.FLAGS(argv)
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        message = _one_line(e) or type(e).__name__
        print(f"error: {message.removeprefix('error: ')}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def command(fn):
    """Makes `fn()` an absl main: one-line errors (`exits_cleanly`), no stray positional
    arguments, and Orbax's per-save INFO logs kept off the console."""

    @exits_cleanly
    @functools.wraps(fn)
    def main(argv):
        from absl import logging  # keeps importing this module light

        if len(argv) > 1:
            raise InputError(f"unexpected arguments {argv[1:]}: every option is a flag, --name=value")
        logging.set_verbosity(logging.WARNING)
        return fn()

    return main
