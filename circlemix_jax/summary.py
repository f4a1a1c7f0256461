"""TensorBoard event files without TensorFlow.

`flax.metrics.tensorboard` and clu import TensorFlow; the `tensorboard` package's
own `EventFileWriter` and protos write the same files with no TF installed.
"""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class SummaryWriter:
    """Writes scalars and images to `logdir` (only on process 0 in multi-host runs)."""

    def __init__(self, logdir: str, enabled: bool = True):
        self._writer = EventFileWriter(logdir) if enabled else None

    def _write(self, step: int, value: summary_pb2.Summary.Value) -> None:
        if self._writer is not None:
            event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary_pb2.Summary(value=[value]))
            self._writer.add_event(event)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Logs each {tag: value} at `step`."""
        for tag, v in values.items():
            self._write(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Logs one (H, W, 3) uint8 image as PNG."""
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
        h, w = image.shape[:2]
        img = summary_pb2.Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self._write(step, summary_pb2.Summary.Value(tag=tag, image=img))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
