"""A training run's folder (train.run_dir): the name of every file in it, and its JSON records.

    config.json          the resolved config, rewritten at every start (train.py)
    metrics.jsonl        one JSON line per logged step, and one per evaluation with "eval": true (logger.py)
    tensorboard/         TensorBoard events, with log.tensorboard=true (logger.py)
    final.json           the last evaluation's scores, written when the run ends (train.py)
    ckpt_<step:08d>.pt   training checkpoints, and `latest`, a text file naming one of them (checkpoint.py)
    best.pt, best.json   the networks and the scores of the evaluation with the highest target mIoU
                         (checkpoint.py)

Writers (train, logger, checkpoint) and readers (curves, ablate, weight_stats, the benchmarks) take the
names from here, so they cannot disagree. How checkpoints are written (atomically), checked and
resumed stays checkpoint.py's job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_CHECKPOINT = re.compile(r"^ckpt_(\d{8})\.pt$")


class RunFolder:
    """The files of the run folder at `path`, which need not exist yet."""

    CONFIG, METRICS, FINAL, TENSORBOARD = "config.json", "metrics.jsonl", "final.json", "tensorboard"
    LATEST, BEST, BEST_RECORD = "latest", "best.pt", "best.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / self.CONFIG
        self.metrics = self.path / self.METRICS
        self.final = self.path / self.FINAL
        self.tensorboard = self.path / self.TENSORBOARD
        self.latest = self.path / self.LATEST
        self.best = self.path / self.BEST
        self.best_record = self.path / self.BEST_RECORD

    def checkpoint(self, step: int) -> Path:
        return self.path / f"ckpt_{step:08d}.pt"

    @staticmethod
    def is_checkpoint(name: str) -> bool:
        """A bare training-checkpoint file name, ckpt_<8 digits>.pt: no folder, no "../"."""
        return _CHECKPOINT.match(name) is not None

    def checkpoints(self) -> list[Path]:
        """The training checkpoints in the folder, oldest first ([] when the folder does not exist)."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if self.is_checkpoint(p.name))

    def write_config(self, cfg) -> None:
        """cfg: the run's resolved config (config.Config); its to_json() becomes config.json."""
        self.config.write_text(cfg.to_json())

    def read_config(self) -> dict | None:
        """config.json as a dict; None when the folder has none."""
        return json.loads(self.config.read_text()) if self.config.is_file() else None

    def append_metrics(self, record: dict) -> None:
        """One line of metrics.jsonl: {"step": int, name: value, ...}."""
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def drop_metrics_after(self, step: int) -> None:
        """Remove the metrics.jsonl lines of steps after `step` (what a crashed run logged past the
        checkpoint it resumes from), so that each step is logged once."""
        if not self.metrics.is_file():
            return
        keep = [ln for ln in self.metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.metrics.write_text("".join(ln + "\n" for ln in keep))

    def read_metrics(self) -> tuple[list[dict], list[dict]]:
        """metrics.jsonl -> (training lines, evaluation lines), each sorted by step (stably: the lines
        of one step keep their order); FileNotFoundError naming the file when there is none."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.metrics} does not exist; {self.path} is not the run_dir of a "
                                    "pwda_fast.train run, or the run has logged nothing yet")
        lines = [json.loads(ln) for ln in self.metrics.read_text().splitlines() if ln.strip()]
        train = sorted((r for r in lines if not r.get("eval")), key=lambda r: r["step"])
        evals = sorted((r for r in lines if r.get("eval")), key=lambda r: r["step"])
        return train, evals

    def write_final(self, result: dict) -> None:
        """The last evaluation's scores (inference.evaluate_model's result, with the "build" that ran:
        Engine.build) -> final.json."""
        self.final.write_text(json.dumps(result, indent=2))

    def read_final(self) -> dict:
        return json.loads(self.final.read_text())
