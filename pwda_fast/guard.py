"""The machinery around one training iteration that makes it all or nothing, without waiting for the
device (the method's stages are in adapt.py; this module knows nothing of them).

    guard.begin()                 # zero the gradients, snapshot what a forward pass changes
    guard.backward(loss)          # every stage's backward, through the fp16 loss scale
    result = guard.finish(losses, optimizers, lr)   # -> StepResult, still on the device
    result.read()                 # -> StepReport: one transfer, taken one step late by the loop

`finish` unscales the gradients (fp16), reduces the losses and one "all finite" flag over the ranks
(one all-reduce, which also carries a stop request under DDP), then either hands that flag to the
optimizers, which skip on it themselves (torch's fused SGD and Adam: `skips_on_device`), or reads it
once on the host; it puts back on the device what a skipped step changed (BatchNorm statistics, any
state the method registered) and updates the loss scale on the device. An fp16 gradient overflow is
an ordinary skipped step that also halves the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pwda_fast import distributed


class StepGuard:
    """One iteration's guard over `optimizers` (all of them step or none does).

    restored: the tensors a forward pass changes before the finite check (BatchNorm buffers, a running
    class weight), put back when the step is skipped. amp="fp16" adds one loss scaler for every
    optimizer: they step or skip as one, and a single scale mirrors that decision exactly (an
    overflow anywhere skips all of them and halves the scale once; its growth tracker counts the steps
    all took); per-optimizer scalers would count a step skipped for another network's overflow as
    one of their good steps.
    """

    def __init__(self, optimizers, restored: list[torch.Tensor], *, amp: str = "none",
                 device: torch.device | None = None, dist: distributed.Dist | None = None):
        self.opt = optimizers
        device = device or torch.device("cpu")
        self.dist = dist or distributed.Dist()
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.snapshot = Snapshot(restored)
        # Under DDP: this rank's stop request (SIGTERM), a device flag that rides in each step's
        # all-reduce, so that every rank learns of it one step late without a read of its own.
        self.stop_flag = torch.zeros((), device=device) if self.dist.enabled else None

    def request_stop(self) -> None:
        """Ask every rank to stop: carried by the next step's reduction (DDP); its StepReport says
        `stop`. In one process the caller's own flag is the whole story, and this does nothing."""
        if self.stop_flag is not None:
            self.stop_flag.fill_(1.0)  # a kernel queued on the stream, not a copy that waits

    def begin(self) -> None:
        for opt in self.opt:
            opt.zero_grad(set_to_none=True)
        self.snapshot.save()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def finish(self, losses: dict, stepping: list, lr: float) -> StepResult:
        """After every backward of the iteration: step `stepping` (a subset of the optimizers, e.g. G's
        alone in source-only mode) if every loss and gradient is finite on every rank, else skip and
        restore. Nothing here waits for the device once `skips_on_device`."""
        for opt in self.opt:  # a no-op without fp16; inf and nan survive the division
            self.scaler.unscale_(opt)
        means, finite, stop = self._reduce(losses)
        if self.skips_on_device():
            found_inf = (~finite).float()
            for opt in stepping:
                opt.found_inf, opt.grad_scale = found_inf, None
                opt.step()
        else:
            take = bool(finite.item())  # the one host sync
            for opt in stepping:
                opt.found_inf = opt.grad_scale = None
                if take:
                    opt.step()
        self.snapshot.restore_unless(finite)
        return StepResult(tuple(losses), means, finite, lr, self._update_scale(finite), stop)

    def skips_on_device(self) -> bool:
        """Whether the optimizers can take the skip decision as a device flag (their `found_inf`):
        torch's fused SGD and Adam can; foreach, single-tensor and apex optimizers cannot. G's first
        step goes through the host: fused SGD allocates its momentum uninitialised on a first step and
        would keep that garbage if the step were skipped (and optim.backbone_repeats restarts a fresh
        momentum per entry there)."""
        fused = all(isinstance(o, (torch.optim.SGD, torch.optim.Adam)) and o.defaults.get("fused")
                    for o in self.opt)
        momentum = any(group["momentum"] for group in self.opt.g.param_groups)
        return fused and (not momentum or all("momentum_buffer" in self.opt.g.state.get(p, {})
                                              for group in self.opt.g.param_groups
                                              for p in group["params"]))

    def _update_scale(self, finite: torch.Tensor) -> torch.Tensor | None:
        """-> (2,) float on the device: [skipped for a gradient overflow that lowered the scale to
        >= 1, the scale now]; None without fp16.

        Halves the loss scale if any gradient overflowed (the scaler's own check, which agrees on
        every rank: DDP has averaged the gradients), else counts a step towards doubling it. A step
        skipped only for a non-finite loss with finite gradients leaves the scale and its count of
        good steps as they were: the scale cannot be the cause, and no optimizer stepped. All on the
        device: the scaler's update and this correction need no host sync.
        """
        if not self.scaler.is_enabled():
            return None
        # The scaler's own device tensors (private, but the same in torch 2.11-2.14; get_scale() and
        # state_dict() would read them back to the host).
        scale, tracker = self.scaler._scale, self.scaler._growth_tracker
        scale_before, tracker_before = scale.clone(), tracker.clone()
        self.scaler.update()  # also clears the per-optimizer unscale records the next step needs clear
        lowered = scale < scale_before
        unchanged = ~finite & ~lowered
        scale.copy_(torch.where(unchanged, scale_before, scale))
        tracker.copy_(torch.where(unchanged, tracker_before, tracker))
        calibrating = ~finite & lowered & (scale >= 1.0)
        return torch.cat([calibrating.float().reshape(1), scale.float().reshape(1)])

    def _reduce(self, losses: dict):
        """-> ((K,) loss means over ranks, () every loss and gradient finite on every rank, () some rank
        asked to stop (None in one process)), all on the device; one all-reduce."""
        values = torch.stack([v.float() for v in losses.values()])
        total = values.sum()
        grads = [p.grad for opt in self.opt for group in opt.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            total = total + torch.stack(torch._foreach_norm(grads)).float().sum()
        return distributed.step_summary(values, torch.isfinite(total), self.dist, self.stop_flag)


class Snapshot:
    """The tensors a skipped step puts back (BatchNorm statistics, which change in the forward pass,
    and a method's running state such as MRNet's running class weight), kept as one flat copy per
    dtype for the whole run.

    `save` is one concatenation per dtype; `restore_unless(flag)` selects, on the device, the saved
    or the current values by a () bool tensor and copies them back with one multi-tensor copy: a few
    launches per step for R101's ~330 buffers, no host sync, and bitwise what was saved.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t.view(-1))
        self.groups = []
        for views in groups.values():
            n = sum(v.numel() for v in views)
            saved, current, chosen = (views[0].new_empty(n) for _ in range(3))
            parts = list(chosen.split([v.numel() for v in views]))
            self.groups.append((views, saved, current, chosen, parts))

    def save(self) -> None:
        for views, saved, *_ in self.groups:
            torch.cat(views, out=saved)

    def restore_unless(self, keep: torch.Tensor) -> None:
        """Put the saved values back where `keep` (a () bool tensor) is false."""
        for views, saved, current, chosen, parts in self.groups:
            torch.cat(views, out=current)
            torch.where(keep, current, saved, out=chosen)
            torch._foreach_copy_(views, parts)


@dataclass
class StepResult:
    """One iteration's outcome as the device will have it; `read` waits for it (one transfer)."""
    names: tuple[str, ...]
    means: torch.Tensor
    """(K,) the losses, means over ranks, in computation order"""
    finite: torch.Tensor
    """() bool: the optimizers stepped"""
    lr: float
    """G's learning rate in this iteration (its first parameter group's)"""
    scaler: torch.Tensor | None = None
    """fp16 only: (2,) float, [skipped for an overflow that lowered the scale to >= 1, the scale after]"""
    stop: torch.Tensor | None = None
    """DDP only: () bool, some rank had asked to stop when it launched this step"""

    def read(self) -> StepReport:
        parts = [self.means.float(), self.finite.float().reshape(1)]
        if self.scaler is not None:
            parts.append(self.scaler)
        if self.stop is not None:
            parts.append(self.stop.float().reshape(1))
        values = torch.cat(parts).tolist()
        k = len(self.names)
        calibrating, scale = False, None
        if self.scaler is not None:
            calibrating, scale = values[k + 1] == 1.0, values[k + 2]
        stop = self.stop is not None and values[-1] == 1.0
        return StepReport(dict(zip(self.names, values[:k])), values[k] == 1.0, calibrating, scale, self.lr,
                          stop)


@dataclass
class StepReport:
    losses: dict
    """{loss name: mean over ranks}, in computation order"""
    stepped: bool
    calibrating: bool
    """skipped for an fp16 overflow that lowered the loss scale to >= 1 (Trainer does not count it as
    a divergence)"""
    scale: float | None
    """the fp16 loss scale after the step (None without fp16)"""
    lr: float
    stop: bool = False
    """DDP: some rank asked to stop (SIGTERM) by the time it launched this step; every rank reads the
    same value, so all stop after the same step"""
