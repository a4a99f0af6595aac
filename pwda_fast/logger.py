"""Training logs: metrics.jsonl always, TensorBoard scalars and pictures when log.tensorboard=true.

Only rank 0 writes (`enabled`); every rank still checks that TensorBoard can be imported, so a missing
package stops all processes with the same error instead of leaving the others waiting at a barrier.
TensorBoard events go to run_dir/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pwda_fast import config


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise config.ConfigError(
            "log.tensorboard=true needs the tensorboard package: pip install -e '.[tensorboard]' "
            f"(or pip install tensorboard), or set log.tensorboard=false (import error: {e})") from None
    return SummaryWriter


class MetricsLogger:
    """Appends one JSON line per record to run_dir/metrics.jsonl and mirrors numbers to TensorBoard.

    purge_step: the step the run continues from (0 for a fresh run); metrics.jsonl lines and
    TensorBoard events a crashed run wrote past it are dropped, so each step is logged once.
    """

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, images: int = 1,
                 purge_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.images, self.writer = enabled, images, None
        if enabled and purge_step is not None and self.path.is_file():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln and json.loads(ln)["step"] <= purge_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            writer_class = _summary_writer_class()
            if enabled:
                self.writer = writer_class(log_dir=str(Path(run_dir) / "tensorboard"),
                                           purge_step=purge_step or None)

    def write(self, record: dict) -> None:
        """record: {"step": int, name: number, ...}; "eval": true marks an evaluation (tags eval/...)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        group = "eval" if record.get("eval") else "train"
        for key, value in record.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in ("step", "eval") and is_number and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, record["step"])
        if group == "eval":  # evaluations are rare: make them visible without waiting for the flush timer
            self.writer.flush()

    def figures(self, step: int, g: torch.nn.Module, d_aux: torch.nn.Module, val_dataset, cfg) -> None:
        """Predictions and Fig. 2 weighting maps of the first `images` target-val images, to TensorBoard.

        g and d_aux are the bare (not DDP-wrapped) networks; their train/eval modes are restored.
        """
        if self.writer is None or not self.images:
            return
        from pwda_fast import visualize  # drawing code is needed only when pictures are logged

        modes = (g.training, d_aux.training)
        g.eval()
        d_aux.eval()
        try:
            for i in range(min(self.images, len(val_dataset))):
                item = visualize.drop_empty_label(val_dataset[i])
                pred_fig, maps_fig, _, _ = visualize.render_image(g, d_aux, cfg, item)
                self.writer.add_image(f"target_{i}/prediction", np.asarray(pred_fig), step, dataformats="HWC")
                self.writer.add_image(f"target_{i}/weighting_maps", np.asarray(maps_fig), step,
                                      dataformats="HWC")
        finally:
            g.train(modes[0])
            d_aux.train(modes[1])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
