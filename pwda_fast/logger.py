"""Training logs: metrics.jsonl always, TensorBoard scalars and images when log.tensorboard=true.

Only rank 0 writes (`enabled`); every rank still checks that TensorBoard can be imported, so a missing
package stops all processes with the same error instead of leaving the others waiting at a barrier.
TensorBoard events go to run_dir/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pwda_fast.run_folder import RunFolder


class LoggerError(RuntimeError):
    """A logging set-up that cannot work here (a missing package); the message says what to do."""


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise LoggerError(
            "log.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
            f"(or pip install tensorboard), or set log.tensorboard=false (import error: {e})") from None
    return SummaryWriter


class MetricsLogger:
    """Appends one JSON line per record to run_dir/metrics.jsonl and mirrors numbers to TensorBoard.

    purge_step: the step the run continues from (0 for a fresh run); metrics.jsonl lines and
    TensorBoard events a crashed run wrote past it are dropped, so each step is logged once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, purge_step: int | None = None):
        self.folder = RunFolder(run_dir)
        self.enabled, self.writer = enabled, None
        if enabled and purge_step is not None:
            self.folder.drop_metrics_after(purge_step)
        if tensorboard:
            writer_class = _summary_writer_class()
            if enabled:
                self.writer = writer_class(log_dir=str(self.folder.tensorboard),
                                           purge_step=purge_step or None)

    def write(self, record: dict) -> None:
        """record: {"step": int, name: number, ...}; "eval": true marks an evaluation (tags eval/...)."""
        if not self.enabled:
            return
        self.folder.append_metrics(record)
        if self.writer is None:
            return
        group = "eval" if record.get("eval") else "train"
        for key, value in record.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in ("step", "eval") and is_number and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])
        if group == "eval":  # evaluations are rare: make them visible without waiting for the flush timer
            self.writer.flush()

    @property
    def tensorboard(self) -> bool:
        """True where pictures would be recorded (rank 0 with log.tensorboard on)."""
        return self.writer is not None

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """{tag: (H, W, 3) uint8} -> TensorBoard images at `step`."""
        if self.writer is None:
            return
        for tag, rgb in images.items():
            self.writer.add_image(tag, rgb, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
