"""One PWDA iteration: the paper's three stages, in AdaptSegNet's order (docs/METHOD.md).

1. Segmenter: CE on the labelled source batch, main head + lambda_seg * aux head (with MRNet's recipe:
   per-batch class weights and hard-pixel selection).
2. Generator: on the target batch, G's forward; the adversary (adapt.adversary, adversaries/), its
   discriminators frozen, gives G's adversarial loss (the paper's: lambda_adv * L(y=0), the pixel-
   weighted BCE of D's map, plus lambda_aux * BCE(D_aux(F(x_t)), 0)); MRNet's memory KL from
   adapt.memory_start on.
3. Discriminators: on detached outputs, the adversary's discriminator loss (the paper's: BCE(D(G(x_s)),
   0) + L(y=1) for D, BCE(D_aux(F(x_s)), 0) + BCE(D_aux(F(x_t)), 1) for D_aux).
Around them, guard.StepGuard makes the iteration all or nothing without waiting for the device: if
every loss and gradient is finite on every rank, all three optimizers step; else none does and what the
forward passes changed is put back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pwda_fast import adversaries, distributed, ops, reference
from pwda_fast.config import AdaptConfig, OptimConfig
from pwda_fast.guard import StepGuard, StepResult
from pwda_fast.models import Nets
from pwda_fast.precision import autocast
from pwda_fast.reference import upsample_to


def poly_lr(base: float, step: int, iters: int, power: float) -> float:
    return base * (1 - step / iters) ** power


@dataclass
class Schedule:
    """Learning rates by step: poly decay over optim.poly_iters or `iters` (all three networks), after
    an optional linear warm-up of G (and with optim.warmup_d of D and D_aux) from warmup_start times
    the rate over warmup_iters (MRNet's recipe for G, CLAN's preheat for both; the decay is not
    re-based after the warm-up; docs/METHOD.md)."""
    optim: OptimConfig
    iters: int

    def lr_g(self, step: int) -> float:
        return self._lr(self.optim.lr, step, warm=True)

    def lr_d(self, step: int) -> float:
        return self._lr(self.optim.lr_d, step, warm=self.optim.warmup_d)

    def _lr(self, base: float, step: int, warm: bool) -> float:
        o = self.optim
        if warm and step < o.warmup_iters:
            return base * (o.warmup_start + (1 - o.warmup_start) * step / o.warmup_iters)
        return poly_lr(base, step, self.horizon, o.power)

    @property
    def horizon(self) -> int:
        """The poly decay's length: optim.poly_iters, or train.iters when that is 0."""
        return self.optim.poly_iters or self.iters


class Adapter:
    """Runs one iteration over a source and a target batch; owns nothing but references.

    nets may be DDP-wrapped or compiled; optimizers hold the bare networks' parameters. The adversary
    (adapt.adversary) gives stages 2 and 3 their adversarial losses; `guard` (guard.StepGuard) zeroes,
    checks, steps or skips, restores and scales. amp="fp16" runs every backward on the loss times one
    dynamic loss scale (the guard's).
    """

    def __init__(self, nets: Nets, optimizers, adapt_cfg: AdaptConfig, schedule: Schedule, *,
                 amp: str = "none", channels_last: bool = False, loss_kernel: ops.FirstCall | None = None,
                 device: torch.device | None = None, dist: distributed.Dist | None = None,
                 num_classes: int = 19):
        self.nets, self.opt, self.cfg, self.schedule = nets, optimizers, adapt_cfg, schedule
        device = device or torch.device("cpu")
        self.device, self.dist = device, dist or distributed.Dist()
        self.adapt = adapt_cfg.mode == "adapt"
        self.autocast = lambda: autocast(device.type, amp)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.adversary = adversaries.get(adapt_cfg.adversary)(
            nets, adapt_cfg, autocast=self.autocast, memory_format=self.memory_format,
            loss_kernel=loss_kernel or ops.LOSS.first_call("torch"))
        # BatchNorm running statistics change in the forward pass, before the finite check: the
        # backbone's with model.bn "train" or "stats", BN heads (model.head_norm = "bn") with any
        # model.bn. One inf activation would otherwise poison every later step through them.
        # num_batches_tracked too: BN with momentum=None averages over it.
        buffers = [b for net in nets for b in net.buffers()]
        # MRNet's running "often" class weight (adapt.often_balance); part of the checkpoint.
        self.often = (torch.ones(num_classes, device=device)
                      if adapt_cfg.class_balance and adapt_cfg.often_balance else None)
        self.guard = StepGuard(optimizers, buffers + ([self.often] if self.often is not None else []),
                               amp=amp, device=device, dist=self.dist)

    def state_dict(self) -> dict:
        """{"often": (K,) tensor or None, "scaler": the loss scaler's state ({} unless amp=fp16)}."""
        return {"often": self.often, "scaler": self.guard.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.often is not None and state.get("often") is not None:
            self.often.copy_(state["often"])
        if state.get("scaler"):  # a checkpoint written without fp16 leaves the fresh scaler as it is
            self.guard.scaler.load_state_dict(state["scaler"])

    def request_stop(self) -> None:
        self.guard.request_stop()

    def set_lr(self, step: int) -> float:
        """Set the three optimizers' learning rates for `step` -> G's first group's (the backbone's).
        A learning rate held as a device tensor (train.cuda_graphs: a captured optimizer step reads it
        there) is filled in place."""
        lr_g, lr_d = self.schedule.lr_g(step), self.schedule.lr_d(step)
        lrs = [(group, lr_g * group.get("lr_mult", 1.0)) for group in self.opt.g.param_groups]
        lrs += [(group, lr_d) for opt in (self.opt.d, self.opt.d_aux) for group in opt.param_groups]
        for group, lr in lrs:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lrs[0][1]

    def phase(self, step: int) -> tuple:
        """What the iteration decides in Python from the step number: the adversary's (the paper's
        preheat of the weighting) and whether the memory term counts. Equal phases run the same
        kernels."""
        return self.adversary.phase(step), self.cfg.memory and step >= self.cfg.memory_start

    def cast_cache(self):
        """The region over the three stages in which autocast keeps its weight casts.

        The weights do not change until the optimizers step, so G's casts to bf16 / fp16 made in
        stage 1 serve stage 2 too (one cast per weight per iteration, not one per stage): autocast
        drops its cache only when its outermost region ends, and this enclosing region, disabled,
        changes no numerics. Frozen weights (D, D_aux in stage 2) are never cached by autocast.
        """
        return torch.autocast(self.device.type, enabled=False)

    def launch(self, step: int, source: dict, target: dict | None) -> StepResult:
        """One iteration, queued on the device without waiting for it (guard.StepGuard: the skip
        decision, the restore and the loss scale's update happen on the device once every optimizer
        can skip there). `target` may be None in source_only mode. -> its StepResult, to be read
        (one transfer) when the caller can wait."""
        return self.iteration(step, source, target, self.set_lr(step))

    def iteration(self, step: int, source: dict, target: dict | None, lr: float) -> StepResult:
        """`launch` once the learning rates are set: what train.cuda_graphs captures."""
        self.guard.begin()
        losses = {}
        with self.cast_cache():
            src = self.segmenter_stage(source, losses)
            if self.adapt:
                tgt = self.generator_stage(target, losses, step)
                self.discriminator_stage(src, tgt, losses, step)
        return self.guard.finish(losses, list(self.opt) if self.adapt else [self.opt.g], lr)

    def _input(self, batch: dict) -> torch.Tensor:
        return batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def segmenter_stage(self, source: dict, losses: dict) -> dict:
        """Stage 1: CE on the source. Gradients stay local until stage 2's backward syncs them."""
        g, a = self.nets.g, self.cfg
        x_s, y_s = self._input(source), source["label"].to(self.device, non_blocking=True)
        size = tuple(x_s.shape[2:])
        with g.no_sync() if self.adapt and self.dist.enabled else contextlib.nullcontext():
            with self.autocast():
                aux_s, main_s, feat_s = g(x_s)
            main_s = upsample_to(main_s.float(), size)
            weights = None
            if a.class_balance:
                weights, often = reference.class_balance_weights(y_s, main_s.shape[1], a.class_balance_max,
                                                                 self.often)
                if often is not None:
                    self.often.copy_(often)
            aux_s = upsample_to(aux_s.float(), size)
            loss_seg = reference.multi_level_seg_loss(aux_s, main_s, y_s, a.lambda_seg, weights,
                                                      a.hard_pixels)
            self.guard.backward(loss_seg)
        losses["seg"] = loss_seg.detach()
        aux_s = aux_s.detach() if self.adversary.reads_aux_head else None
        return {"main": main_s.detach(), "aux": aux_s, "feat": feat_s.detach()}

    def generator_stage(self, target: dict, losses: dict, step: int = 0) -> dict:
        """Stage 2: G's forward on the target; the adversary's generator loss with its discriminators
        frozen; the memory term (MRNet) from adapt.memory_start on. -> the detached outputs, with what
        the adversary keeps for stage 3."""
        x_t = self._input(target)
        size = tuple(x_t.shape[2:])
        with self.adversary.frozen():
            with self.autocast():
                aux_t, main_t, feat_t = self.nets.g(x_t)
                aux_t, main_t = upsample_to(aux_t.float(), size), upsample_to(main_t.float(), size)
            tgt = {"main": main_t, "aux": aux_t, "feat": feat_t}
            loss_g, for_stage_3 = self.adversary.generator_loss(tgt, losses, step)
            loss_g = loss_g + self._memory_term(aux_t, main_t, step, losses)
            self.guard.backward(loss_g)
        if not self.adversary.reads_aux_head:
            del tgt["aux"]
        return {**{k: v.detach() for k, v in tgt.items()}, **for_stage_3}

    def _memory_term(self, aux_t, main_t, step: int, losses: dict) -> torch.Tensor:
        """MRNet's memory KL on the target heads (image-size logits), logged from the first step and
        weighted from memory_start on (MRNet: lambda 0 before 15k); 0 * aux without memory."""
        if not self.cfg.memory:
            # Keeps the aux head in this backward's graph so DDP reduces its stage-1 gradient.
            return 0.0 * aux_t.mean()
        loss_mem = reference.memory_kl(aux_t, main_t)
        losses["mem"] = loss_mem.detach()
        return (self.cfg.lambda_mem if step >= self.cfg.memory_start else 0.0) * loss_mem

    def discriminator_stage(self, src: dict, tgt: dict, losses: dict, step: int = 0) -> None:
        """Stage 3: the adversary's discriminator loss on detached outputs."""
        self.guard.backward(self.adversary.discriminator_loss(src, tgt, losses, step))
