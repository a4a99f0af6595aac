"""One PWDA iteration: the paper's three stages, in AdaptSegNet's order (docs/METHOD.md).

1. Segmenter: CE on the labelled source batch, main head + lambda_seg * aux head (with MRNet's recipe:
   per-batch class weights and hard-pixel selection).
2. Generator: D and D_aux frozen; on the target batch G minimises lambda_adv * L(y=0), the pixel-
   weighted BCE of D's map, and F minimises lambda_aux * BCE(D_aux(F(x_t)), 0), D_aux seeing the
   encodings at image size; MRNet's memory KL from adapt.memory_start on.
3. Discriminators: on detached outputs, D minimises BCE(D(G(x_s)), 0) + L(y=1) and D_aux minimises
   BCE(D_aux(F(x_s)), 0) + BCE(D_aux(F(x_t)), 1).
With adapt.adversary = "mrnet" stages 2 and 3 run MRNet's own adversary instead (MRNet as published:
its LSGAN D1 on the aux head and D2 on the main head, no weighting; docs/METHOD.md).
Then, if every loss and gradient is finite on every rank, all three optimizers step; else none does.
The returned losses are means over ranks (one all-reduce carries them and the finite flag).
With train.amp=fp16 every backward runs on the loss times one dynamic loss scale, and the gradients
are unscaled before that check: an fp16 gradient overflow is an ordinary skipped step that also
halves the scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pwda_fast import distributed, ops, reference
from pwda_fast.config import AdaptConfig, OptimConfig
from pwda_fast.models import Nets
from pwda_fast.precision import autocast
from pwda_fast.reference import upsample_to

SOURCE, TARGET = 0.0, 1.0


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def poly_lr(base: float, step: int, iters: int, power: float) -> float:
    return base * (1 - step / iters) ** power


def d_aux_logits(d_aux: nn.Module, feat: torch.Tensor, size, aux_at: str) -> torch.Tensor:
    """D_aux's logits on layer4 features (N, F, h, w): at image size `size` (adapt.aux_at = "image",
    the paper) or at feature size ("feature"). Training and the weighting-map pictures both use it."""
    return d_aux(feat, size) if aux_at == "image" else d_aux(feat)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@dataclass
class Schedule:
    """Learning rates by step: poly decay over optim.poly_iters or `iters` (all three networks), after
    an optional linear warm-up of G from warmup_start * lr over warmup_iters (MRNet's recipe, where
    the decay is not re-based after the warm-up; docs/METHOD.md)."""
    optim: OptimConfig
    iters: int

    def lr_g(self, step: int) -> float:
        o = self.optim
        if step < o.warmup_iters:
            return o.lr * (o.warmup_start + (1 - o.warmup_start) * step / o.warmup_iters)
        return poly_lr(o.lr, step, self.horizon, o.power)

    def lr_d(self, step: int) -> float:
        return poly_lr(self.optim.lr_d, step, self.horizon, self.optim.power)

    @property
    def horizon(self) -> int:
        """The poly decay's length: optim.poly_iters, or train.iters when that is 0."""
        return self.optim.poly_iters or self.iters


class Adapter:
    """Runs one iteration over a source and a target batch; owns nothing but references.

    nets may be DDP-wrapped or compiled; optimizers hold the bare networks' parameters.
    A skipped step leaves every state it could touch as it was: the optimizers do not step, and what
    changes before the finite check is put back (the networks' buffers, the running class weight).
    amp="fp16" adds a gradient scaler; `calibrating` then says whether the last step was skipped
    for a gradient overflow that the scaler answered by halving its scale to a value >= 1: what a
    scale that starts too high for the gradients does in the first steps of a run.
    """

    def __init__(self, nets: Nets, optimizers, adapt_cfg: AdaptConfig, schedule: Schedule, *,
                 amp: str = "none", channels_last: bool = False, backend: str = "torch",
                 device: torch.device | None = None, dist: distributed.Dist | None = None,
                 num_classes: int = 19):
        self.nets, self.opt, self.a, self.schedule = nets, optimizers, adapt_cfg, schedule
        device = device or torch.device("cpu")
        self.device, self.dist = device, dist or distributed.Dist()
        self.loss_backend = ops.FirstCall(backend, "the fused weighted adversarial loss")
        self.adapt = adapt_cfg.mode == "adapt"
        self.use_aux = self.adapt and adapt_cfg.weighting == "gen+dis"
        # MRNet's own adversary in nets.d (models.MRNetDiscriminators) instead of the paper's D.
        self.mrnet = self.adapt and adapt_cfg.adversary == "mrnet"
        # Eq. (3)-(6)'s constants, as every weighted loss and weight map of the step takes them.
        self.weight_kw = dict(threshold=adapt_cfg.threshold, floor=adapt_cfg.floor, mu=adapt_cfg.mu)
        self.autocast = lambda: autocast(device.type, amp)
        # One scaler for the three networks, not one per optimizer: they step or skip as one, and a
        # single scale mirrors that decision exactly (an overflow anywhere skips all three and halves
        # the scale once; its growth tracker counts the steps all three took). Per-optimizer scalers
        # would count a step skipped for another network's overflow as one of their good steps.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.calibrating = False
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # BatchNorm running statistics change in the forward pass, before the finite check: the
        # backbone's with model.bn "train" or "stats", BN heads (model.head_norm = "bn") with any
        # model.bn. One inf activation would otherwise poison every later step through them.
        # num_batches_tracked too: BN with momentum=None averages over it.
        self.buffers = [b for net in nets for b in net.buffers()]
        # MRNet's running "often" class weight (adapt.often_balance); part of the checkpoint.
        self.often = (torch.ones(num_classes, device=device)
                      if adapt_cfg.class_balance and adapt_cfg.often_balance else None)
        self.restored = self.buffers + ([self.often] if self.often is not None else [])
        self.snapshot = Snapshot(self.restored)
        # Under DDP: this rank's stop request (SIGTERM), a device flag that rides in each step's
        # all-reduce, so that every rank learns of it one step late without a read of its own.
        self.stop_flag = torch.zeros((), device=device) if self.dist.enabled else None

    def request_stop(self) -> None:
        """Ask every rank to stop: carried by the next launched step's reduction (DDP); its StepReport
        says `stop`. In one process the caller's own flag is the whole story, and this does nothing."""
        if self.stop_flag is not None:
            self.stop_flag.fill_(1.0)  # a kernel queued on the stream, not a copy that waits

    def state_dict(self) -> dict:
        """{"often": (K,) tensor or None, "scaler": the loss scaler's state ({} unless amp=fp16)}."""
        return {"often": self.often, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.often is not None and state.get("often") is not None:
            self.often.copy_(state["often"])
        if state.get("scaler"):  # a checkpoint written without fp16 leaves the fresh scaler as it is
            self.scaler.load_state_dict(state["scaler"])

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
        """What the iteration decides in Python from the step number: whether pixels are weighted
        (the preheat) and whether the memory term counts. Equal phases run the same kernels."""
        return self.weighting_on(step), self.a.memory and step >= self.a.memory_start

    def cast_cache(self):
        """The region over the three stages in which autocast keeps its weight casts.

        The weights do not change until the optimizers step, so G's casts to bf16 / fp16 made in
        stage 1 serve stage 2 too (one cast per weight per iteration, not one per stage): autocast
        drops its cache only when its outermost region ends, and this enclosing region, disabled,
        changes no numerics. Frozen weights (D, D_aux in stage 2) are never cached by autocast.
        """
        return torch.autocast(self.device.type, enabled=False)

    def weighting_on(self, step: int) -> bool:
        """Pixel weighting in this iteration: adapt.weighting is not "none" and the preheat is over."""
        return self.a.weighting != "none" and step >= self.a.preheat_iters

    def _adv_loss(self, seg_logits, disc_logits, aux_logits, label: float, weighted: bool,
                  normalized: bool = False) -> torch.Tensor:
        """The output-space adversarial term: plain BCE (not weighted) or the pixel-weighted L, with
        the weights rescaled to mean 1 when normalized (L / mean(w): mean(w) is a constant in z).

        disc_logits and aux_logits come at D's and D_aux's native resolution: BCE upsamples D's map
        to the image size first, the fused weighted loss samples both maps bilinearly in-kernel.
        """
        if not weighted:
            return reference.domain_bce(upsample_to(disc_logits, seg_logits.shape[2:]), label)
        loss = self.loss_backend(lambda backend: ops.weighted_adv_loss(
            seg_logits, disc_logits, aux_logits, label=label, backend=backend, **self.weight_kw))
        if not normalized:
            return loss
        return loss / ops.pixel_weights(seg_logits, aux_logits, **self.weight_kw).mean()

    def step(self, step: int, source: dict, target: dict | None) -> tuple[dict, bool]:
        """-> ({loss name: float}, stepped): `launch`, then wait for its numbers. `target` may be None
        in source_only mode."""
        report = self.launch(step, source, target).read()
        self.calibrating = report.calibrating
        return report.losses, report.stepped

    def launch(self, step: int, source: dict, target: dict | None) -> StepResult:
        """One iteration, queued on the device without waiting for it: the skip decision, the restore
        of what a skipped step changed and the loss scale's update all happen on the device when every
        optimizer can skip there (torch's fused SGD and Adam, once G's momentum exists; see
        `skips_on_device`). Otherwise the decision waits for the device once, as it always did."""
        return self.iteration(step, source, target, self.set_lr(step))

    def iteration(self, step: int, source: dict, target: dict | None, lr: float) -> StepResult:
        """`launch` once the learning rates are set: what train.cuda_graphs captures."""
        for opt in self.opt:
            opt.zero_grad(set_to_none=True)
        self.snapshot.save()
        losses = {}
        with self.cast_cache():
            src = self.segmenter_stage(source, losses)
            if self.adapt:
                tgt = self.generator_stage(target, losses, step)
                self.discriminator_stage(src, tgt, losses, step)
        for opt in self.opt:  # a no-op without fp16; inf and nan survive the division
            self.scaler.unscale_(opt)
        means, finite, stop = self._reduce(losses)
        stepping = list(self.opt) if self.adapt else [self.opt.g]
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

    def _input(self, batch: dict) -> torch.Tensor:
        return batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def segmenter_stage(self, source: dict, losses: dict) -> dict:
        """Stage 1: CE on the source. Gradients stay local until stage 2's backward syncs them."""
        g = self.nets.g
        x_s, y_s = self._input(source), source["label"].to(self.device, non_blocking=True)
        size = tuple(x_s.shape[2:])
        with g.no_sync() if self.adapt and self.dist.enabled else contextlib.nullcontext():
            with self.autocast():
                aux_s, main_s, feat_s = g(x_s)
            main_s = upsample_to(main_s.float(), size)
            weights = None
            if self.a.class_balance:
                weights, often = reference.class_balance_weights(y_s, main_s.shape[1],
                                                                 self.a.class_balance_max, self.often)
                if often is not None:
                    self.often.copy_(often)
            aux_s = upsample_to(aux_s.float(), size)
            loss_seg = reference.multi_level_seg_loss(aux_s, main_s, y_s, self.a.lambda_seg, weights,
                                                      self.a.hard_pixels)
            self.scaler.scale(loss_seg).backward()
        losses["seg"] = loss_seg.detach()
        aux_s = aux_s.detach() if self.mrnet else None  # MRNet's D stage fuses the source heads
        return {"main": main_s.detach(), "feat": feat_s.detach(), "aux": aux_s}

    def generator_stage(self, target: dict, losses: dict, step: int = 0) -> dict:
        """Stage 2: G fools the frozen D (pixel-weighted, eq. 6) and F fools the frozen D_aux; the
        memory term (MRNet) counts from adapt.memory_start on.

        D and D_aux are called unwrapped, so DDP does not wait for gradients they do not get here.
        """
        if self.mrnet:
            return self._mrnet_generator_stage(target, losses, step)
        d, d_aux = _unwrap(self.nets.d), _unwrap(self.nets.d_aux)
        x_t = self._input(target)
        size = tuple(x_t.shape[2:])
        set_requires_grad(d, False)
        set_requires_grad(d_aux, False)
        with self.autocast():
            aux_t, main_t, feat_t = self.nets.g(x_t)
            main_t = upsample_to(main_t.float(), size)
            z_t = d(torch.softmax(main_t, dim=1)).float()  # D's native resolution
            a_low = d_aux_logits(d_aux, feat_t, size, self.a.aux_at).float() if self.use_aux else None
        # The weighting map is a constant (adapt.weight_grad = "detached"): seg and aux logits enter
        # the loss detached; the weighted loss takes D's map (and D_aux's with aux_at=feature) at native
        # resolution, upsampled in-kernel. "flowing" (CLAN) differentiates through w on the torch path.
        weight_aux = a_low.detach() if a_low is not None else None
        weighted = self.weighting_on(step)
        if weighted and self.a.weight_grad == "flowing":
            loss_adv = reference.weighted_adv_loss(main_t, z_t, a_low, label=SOURCE, detach_weights=False,
                                                   **self.weight_kw)
        else:
            loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, SOURCE, weighted)
        loss_g = self.a.lambda_adv * loss_adv
        losses["adv"] = loss_adv.detach()
        if self.use_aux:
            loss_adv_aux = reference.domain_bce(upsample_to(a_low, size), SOURCE)
            loss_g = loss_g + self.a.lambda_aux * loss_adv_aux
            losses["adv_aux"] = loss_adv_aux.detach()
        loss_g = loss_g + self._memory_term(upsample_to(aux_t.float(), size), main_t, step, losses)
        self.scaler.scale(loss_g).backward()
        set_requires_grad(d, True)
        set_requires_grad(d_aux, True)
        return {"main": main_t.detach(), "feat": feat_t.detach(), "weight_aux": weight_aux}

    def _memory_term(self, aux_t, main_t, step: int, losses: dict) -> torch.Tensor:
        """MRNet's memory KL on the target heads (image-size logits), logged from the first step and
        weighted from memory_start on (MRNet: lambda 0 before 15k); 0 * aux without memory."""
        if not self.a.memory:
            # Keeps the aux head in this backward's graph so DDP reduces its stage-1 gradient.
            return 0.0 * aux_t.mean()
        loss_mem = reference.memory_kl(aux_t, main_t)
        losses["mem"] = loss_mem.detach()
        return (self.a.lambda_mem if step >= self.a.memory_start else 0.0) * loss_mem

    def _mrnet_generator_stage(self, target: dict, losses: dict, step: int) -> dict:
        """Stage 2 with MRNet's adversary (trainer_ms.py gen_update): on the target, G pulls D1's scores
        of softmax(aux) and D2's of softmax(main), image-size logits, toward "real" (LSGAN,
        calc_gen_loss): lambda_mrnet_aux * L_gen(D1) + lambda_mrnet_main * L_gen(D2), logged as "adv_aux"
        and "adv"; plus the memory term. D1 and D2 frozen, called unwrapped."""
        d = _unwrap(self.nets.d)
        x_t = self._input(target)
        size = tuple(x_t.shape[2:])
        set_requires_grad(d, False)
        with self.autocast():
            aux_t, main_t, _ = self.nets.g(x_t)
            aux_t, main_t = upsample_to(aux_t.float(), size), upsample_to(main_t.float(), size)
            maps_aux, maps_main = d(torch.softmax(aux_t, 1).contiguous(memory_format=self.memory_format),
                                    torch.softmax(main_t, 1).contiguous(memory_format=self.memory_format))
        loss_adv, loss_adv_aux = reference.lsgan_gen_loss(maps_main), reference.lsgan_gen_loss(maps_aux)
        losses["adv"], losses["adv_aux"] = loss_adv.detach(), loss_adv_aux.detach()
        loss_g = self.a.lambda_mrnet_main * loss_adv + self.a.lambda_mrnet_aux * loss_adv_aux
        loss_g = loss_g + self._memory_term(aux_t, main_t, step, losses)
        self.scaler.scale(loss_g).backward()
        set_requires_grad(d, True)
        return {"main": main_t.detach(), "aux": aux_t.detach()}

    def discriminator_stage(self, src: dict, tgt: dict, losses: dict, step: int = 0) -> None:
        """Stage 3: D and D_aux on detached outputs; source and target in one batch (no BN in D). D's
        target term is weighted as adapt.d_target says (eq. 9 by default)."""
        if self.mrnet:
            return self._mrnet_discriminator_stage(src, tgt, losses)
        n_s, size = src["main"].shape[0], tuple(src["main"].shape[2:])
        probs = torch.cat([torch.softmax(src["main"], 1), torch.softmax(tgt["main"], 1)])
        with self.autocast():
            z = self.nets.d(probs.contiguous(memory_format=self.memory_format)).float()
        weighted = self.weighting_on(step) and self.a.d_target != "unweighted"
        loss_d = reference.domain_bce(upsample_to(z[:n_s], size), SOURCE) + self._adv_loss(
            tgt["main"], z[n_s:], tgt["weight_aux"], TARGET, weighted, self.a.d_target == "normalized")
        losses["d"] = loss_d.detach()
        if self.use_aux:
            with self.autocast():
                a = d_aux_logits(self.nets.d_aux, torch.cat([src["feat"], tgt["feat"]]), size, self.a.aux_at)
            a = upsample_to(a.float(), size)
            loss_d_aux = reference.domain_bce(a[:n_s], SOURCE) + reference.domain_bce(a[n_s:], TARGET)
            losses["d_aux"] = loss_d_aux.detach()
            loss_d = loss_d + loss_d_aux
        self.scaler.scale(loss_d).backward()

    def _mrnet_discriminator_stage(self, src: dict, tgt: dict, losses: dict) -> None:
        """Stage 3 with MRNet's adversary (trainer_ms.py dis_update): on detached image-size outputs, D1
        scores softmax(aux_t) as fake and D2 softmax(main_t), both against the source's
        softmax(0.5 * aux_s + main_s) as real; each minimises calc_dis_loss (LSGAN, gradient penalty
        on the real input), logged as "d_aux" (D1) and "d" (D2). Fake and real go through each D as
        one batch (D has no normalisation, so each image's scores are its own)."""
        n_t = tgt["main"].shape[0]
        real = reference.fused_probs(src["aux"], src["main"]).requires_grad_()  # a leaf: the penalty's input
        inputs = [torch.cat([torch.softmax(tgt[k], 1), real]).contiguous(memory_format=self.memory_format)
                  for k in ("aux", "main")]
        with self.autocast():
            maps_aux, maps_main = self.nets.d(*inputs)
        loss_d_aux, loss_d = (reference.lsgan_dis_loss([m[:n_t] for m in maps], [m[n_t:] for m in maps], real)
                              for maps in (maps_aux, maps_main))
        losses["d"], losses["d_aux"] = loss_d.detach(), loss_d_aux.detach()
        self.scaler.scale(loss_d + loss_d_aux).backward()

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
    and MRNet's running class weight), kept as one flat copy per dtype for the whole run.

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
