"""Skipped steps: counted, explained, and a run stopped when too many come in a row.

A step is skipped (no optimizer steps, the networks' statistics put back) when a loss or gradient is
non-finite on any rank (guard.StepGuard). One skip is ordinary; train.max_skips of them in a row mean
the run has diverged, and the error says which loss went first and what most likely caused it.
"""

from __future__ import annotations

import math

from pwda_fast import adversaries, config
from pwda_fast.guard import StepReport


class NonFiniteError(RuntimeError):
    pass


class SkipCounter:
    """Counts skipped steps; `record` raises NonFiniteError at train.max_skips in a row.

    Every skip counts once in `skipped`. An fp16 overflow that halved the loss scale to 1 or more
    (StepReport.calibrating) does not count towards train.max_skips: the scale starts high on
    purpose and finds its level that way, at most 16 halvings from 65536 to 1. Overflowing below
    scale 1 means the gradients themselves exceed fp16's range, so those skips count like any other.
    """

    def __init__(self, cfg: config.Config, log, skipped: int = 0):
        self.cfg, self.log = cfg, log
        self.skipped, self.consecutive = skipped, 0
        self.streak_start: tuple[int, str | None] = (0, None)  # (step, first non-finite loss) of a streak

    def record(self, step: int, report: StepReport) -> None:
        if report.stepped:
            self.consecutive = 0
            return
        self.skipped += 1
        if report.calibrating:
            self.log(f"step {step}: fp16 gradient overflow; loss scale lowered to {report.scale:g}, "
                     f"skipped all three optimizer steps ({self.skipped} skipped in all)")
            return
        self.consecutive += 1
        losses = report.losses
        bad = ", ".join(f"{k}={v:.3g}" for k, v in losses.items())
        if self.consecutive == 1:  # the losses come in computation order: the first bad one went first
            self.streak_start = step, next((k for k, v in losses.items() if not math.isfinite(v)), None)
        self.log(f"step {step}: non-finite loss or gradient ({bad}); skipped all three "
                 f"optimizer steps ({self.consecutive} in a row, {self.skipped} in all)")
        if self.consecutive >= self.cfg.train.max_skips:
            first_step, term = self.streak_start
            raise NonFiniteError(
                f"{self.consecutive} consecutive non-finite steps from step {first_step} (first non-finite: "
                f"{f'the {term} loss' if term else 'a gradient, with finite losses'}; last: {bad}). "
                f"Likely causes: {'; '.join(likely_causes(self.cfg, term))}")


def likely_causes(cfg: config.Config, term: str | None) -> list[str]:
    """What most likely made a run diverge, from its config and the first loss that went non-finite."""
    adversarial = adversaries.get(cfg.adapt.adversary).governs(cfg, term) if term else None
    causes = []
    if adversarial:
        causes.append(adversarial)
    elif term == "mem":
        causes.append(f"MRNet's memory term diverged first: lower adapt.lambda_mem "
                      f"(now {cfg.adapt.lambda_mem:g}) or optim.lr (now {cfg.optim.lr:g})")
    else:
        causes.append(f"the segmenter diverged first: lower optim.lr (now {cfg.optim.lr:g})")
    if not cfg.model.init_weights:
        causes.append(f"the generator starts from random weights (no model.init_weights) with model.bn="
                      f"{cfg.model.bn}" + ("" if cfg.model.bn == "train" else
                                           ", which needs pretrained weights: set model.bn=train"))
    if cfg.train.amp != "none":
        causes.append(f"train.amp={cfg.train.amp}: retry with train.amp=none")
    causes.append("a bad file: data.validate=full checks every file")
    return causes
