"""What a run prints while it trains: a bar on a terminal, plain lines in a log file.

Under nohup, SLURM or a TPU VM the output is a file, where a carriage-return
bar is unreadable; there a line is printed every `log_every` steps and at least
once a minute. Compile time is kept out of img/s and the ETA: it is printed on
its own line.
"""

from __future__ import annotations

import sys
import time

import jax

# A log file gets a line at least this often, however slow the steps.
MIN_LINE_INTERVAL_S = 60.0


def log(msg: str) -> None:
    """Prints on process 0 only, flushed (logs are often tailed while a run goes on)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


class Progress:
    """Step counter, throughput and ETA of one run's training.

    Args:
      total: steps of the whole run.
      start_step: the step training (re)starts from.
      batch_size: global batch size, for img/s.
      log_every: steps between lines in a log file.
    """

    def __init__(self, total: int, start_step: int, batch_size: int, log_every: int):
        self.total, self.batch_size, self.log_every = total, batch_size, max(1, log_every)
        self.tty = sys.stdout.isatty() and jax.process_index() == 0
        self._t0 = self._epoch_t0 = self._last_line = time.time()
        self._s0 = self._epoch_s0 = self._last_step = start_step
        self._compiled = False
        self._epoch_img_s = None

    def compiling(self) -> None:
        log("compiling the train step ...")
        self._compile_t0 = time.time()

    def compiled(self, step: int) -> None:
        """Marks the end of the first (compiling) step; timing starts after it."""
        log(f"compiled the train step in {time.time() - self._compile_t0:.1f} s")
        self._compiled = True
        self._t0 = self._epoch_t0 = self._last_line = time.time()
        self._s0 = self._epoch_s0 = step

    @property
    def is_compiled(self) -> bool:
        return self._compiled

    def start_epoch(self, step: int) -> None:
        self._epoch_t0, self._epoch_s0 = time.time(), step

    def due(self, step: int) -> bool:
        """Whether a progress line (or bar update) is due after `step`."""
        return step % self.log_every == 0 or time.time() - self._last_line >= MIN_LINE_INTERVAL_S

    def img_s(self) -> float | None:
        """Training images per second in this epoch so far (after compile), or None before any step."""
        steps = self._last_step - self._epoch_s0
        elapsed = time.time() - self._epoch_t0
        return steps * self.batch_size / elapsed if steps > 0 and elapsed > 0 else None

    def eta_s(self, step: int) -> float | None:
        """Seconds left, at the pace since the first compiled step (evaluation included)."""
        done = step - self._s0
        return (time.time() - self._t0) / done * (self.total - step) if done > 0 else None

    def report(self, step: int, epoch: int, num_epochs: int, loss: float | None, lr: float) -> None:
        """A bar on a terminal, a line in a log file."""
        self._last_step = step
        if jax.process_index() != 0:
            return
        img_s, eta = self.img_s(), self.eta_s(step)
        speed = f"{img_s:.1f} img/s" if img_s else "- img/s"
        left = f"ETA {_minutes(eta)}" if eta is not None else "ETA -"
        loss_s = f"loss {loss:.4f}" if loss is not None else "loss -"
        if self.tty:
            done = int(30 * step / max(self.total, 1))
            print(f"\repoch {epoch + 1}/{num_epochs} [{'#' * done}{'.' * (30 - done)}] step {step}/{self.total} "
                  f"{loss_s} {speed} {left}  ", end="", flush=True)
        else:
            print(f"step {step}/{self.total} (epoch {epoch + 1}/{num_epochs})  {loss_s}  lr {lr:.3g}  {speed}  "
                  f"elapsed {_minutes(time.time() - self._t0)}  {left}", flush=True)
        self._last_line = time.time()

    def train_done(self, step: int) -> None:
        """Marks the end of an epoch's training steps: its img/s leaves out the validation pass."""
        self._last_step = step
        self._epoch_img_s = self.img_s()

    def end_epoch(self, epoch: int, num_epochs: int, step: int, summary: str) -> float | None:
        """The epoch's line (validation summary, training throughput, ETA); returns the epoch's img/s."""
        img_s, eta = self._epoch_img_s, self.eta_s(step)
        if self.tty:
            print("\r", end="")
        log(f"epoch {epoch + 1}/{num_epochs}  {summary}  "
            f"{f'{img_s:.1f} img/s' if img_s else ''}  {f'ETA {_minutes(eta)}' if eta is not None else ''}".rstrip())
        self._last_line = time.time()
        return img_s
