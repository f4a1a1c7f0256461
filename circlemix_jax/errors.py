"""User-facing errors: bad input ends in one line and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT


class InputError(Exception):
    """A problem with what the user gave us (file, row, field), not a bug.

    The message must name the culprit: a path, a manifest row or a config field.
    """


def first_few(items, n: int = 5) -> str:
    """The first `n` items joined by commas, and how many more: a message names culprits without flooding."""
    items = [str(i) for i in items]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def exits_cleanly(fn: F) -> F:
    """Decorates a CLI entry: `InputError` becomes `error: ...` on stderr and exit 2, Ctrl-C exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, without a traceback about stdout.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except KeyboardInterrupt:
            # Commands without a training loop have nothing to save: Ctrl-C ends them at once.
            print("\ninterrupted (SIGINT); nothing was written", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]
