"""The objects of one training run, built one way for the entry point, the benchmarks and the tests.

    config -> finalize (model.init_weights read once, what it decides resolved: a new, final config)
           -> seed -> networks (device, memory format) -> optimizers -> DDP / compile -> Adapter

`build` returns an Engine: the bare networks (what checkpoints hold), their optimizers, the resolved
weighted-loss backend and the Adapter that runs one iteration on the (possibly wrapped) networks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from pwda_fast import adversaries, config, distributed, graphs, models, ops
from pwda_fast.adapt import Adapter, Nets, Schedule


@dataclass
class Optimizers:
    """SGD for G, Adam for D and D_aux; they always step (or skip) together."""
    g: torch.optim.Optimizer
    d: torch.optim.Optimizer
    d_aux: torch.optim.Optimizer

    def __iter__(self):
        return iter((self.g, self.d, self.d_aux))

    def state_dict(self) -> dict:
        """The three optimizers' states as an eager run holds them, even where train.cuda_graphs holds
        learning rates in device tensors and made Adam capturable (a checkpoint resumes with or without
        graphs, on any device: a capturable Adam refuses CPU parameters; the capture sets it again)."""
        state = {"opt_g": self.g.state_dict(), "opt_d": self.d.state_dict(),
                 "opt_d_aux": self.d_aux.state_dict()}
        for opt_state in state.values():
            for group in opt_state["param_groups"]:
                if torch.is_tensor(group["lr"]):
                    group["lr"] = group["lr"].item()
                if group.get("capturable"):
                    group["capturable"] = False
        return state

    def load_state_dict(self, state: dict) -> None:
        for opt, key in zip(self, ("opt_g", "opt_d", "opt_d_aux")):
            opt.load_state_dict(state[key])


class RepeatingSGD(torch.optim.SGD):
    """SGD whose parameter groups may say "repeats": k: each step updates such a group's tensors k
    times in a row, exactly as torch.optim.SGD(foreach=False) does for a tensor listed k times (one
    update per entry, from the parameter and momentum the previous entry left, the same gradient;
    on the very first step every entry starts its momentum from the gradient, since the state is read
    before the loop). The optimizer, its state and its checkpoints hold each tensor once, and any
    implementation (single-tensor, foreach, fused) runs it. optim.backbone_repeats."""

    @torch.no_grad()
    def step(self, closure=None):
        rounds = max(group.get("repeats", 1) for group in self.param_groups)
        params = [group["params"] for group in self.param_groups]
        fresh = {p for ps in params for p in ps if "momentum_buffer" not in self.state.get(p, {})}
        try:
            for r in range(rounds):
                for group, ps in zip(self.param_groups, params):
                    group["params"] = ps if group.get("repeats", 1) > r else []
                    for p in group["params"] if r else ():
                        if p in fresh:
                            self.state[p].pop("momentum_buffer", None)
                super().step()
        finally:
            for group, ps in zip(self.param_groups, params):
                group["params"] = ps


def build_optimizers(optim_cfg: config.OptimConfig, nets: Nets) -> Optimizers:
    """SGD for G (heads at head_lr_mult), Adam for D and D_aux; torch's fused implementations (CUDA
    and CPU) by default: one kernel per step, and they skip a non-finite step on the device flag the
    guard hands them, so the step never waits for the device (guard.StepGuard.skips_on_device)."""
    o = optim_cfg
    groups = nets.g.param_groups(o.lr, o.head_lr_mult, repeats=o.backbone_repeats)
    sgd = {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay, "nesterov": o.nesterov}
    adam = {"lr": o.lr_d, "betas": tuple(o.betas)}
    if o.impl == "apex" and o.backbone_repeats:
        raise config.ConfigError("optim.backbone_repeats needs torch's SGD; use optim.impl=auto or torch")
    if o.impl == "apex":
        try:
            import apex.optimizers as apex_opt
        except ImportError as e:
            raise config.ConfigError("optim.impl=apex needs NVIDIA apex built from source with its "
                                     f"CUDA extensions (import apex.optimizers failed: {e}); "
                                     "use optim.impl=auto") from None
        return Optimizers(apex_opt.FusedSGD(groups, **sgd), apex_opt.FusedAdam(nets.d.parameters(), **adam),
                          apex_opt.FusedAdam(nets.d_aux.parameters(), **adam))
    if o.impl == "torch":
        fast = {}  # torch's own default per device
    else:
        fast = {"fused": True}
    return Optimizers(RepeatingSGD(groups, **sgd, **fast),
                      torch.optim.Adam(nets.d.parameters(), **adam, **fast),
                      torch.optim.Adam(nets.d_aux.parameters(), **adam, **fast))


@dataclass
class Engine:
    nets: Nets
    """The bare networks: what checkpoints hold and evaluation runs."""
    optimizers: Optimizers
    adapter: Adapter | graphs.GraphedAdapter
    """Runs one iteration on the networks as training wraps them (DDP, torch.compile)."""
    kernels: ops.Kernels
    """Every op's backend as resolved from kernels.* on this device, handed to what calls it."""
    cfg: config.Config
    """The final config the engine was built from (engine.finalize)."""

    @property
    def backend(self) -> str:
        """The weighted-loss backend the step uses now: kernels.loss resolved on this device, or "torch"
        after a fused kernel failed on its first call (ops.FirstCall)."""
        return self.kernels.loss.backend

    def build(self) -> dict:
        """What decides a run's last bits beyond its config (config.SAME_METHOD keys choose some of it):
        each op's backend as the calls use it now, the compiled extension's file (sha256), torch and its
        CUDA, the device (the GPU's name on CUDA), the thread count and the CPU's kernels. A weighted
        run is chaotic in those bits (docs/RESULTS.md), so checkpoints, final.json and study records
        carry this."""
        device = next(self.nets.g.parameters()).device
        return {"kernels": self.kernels.names(), "ext": ops.ext_digest(), "torch": str(torch.__version__),
                "cuda": torch.version.cuda or "",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}


def _wrap(cfg: config.Config, nets: Nets, device: torch.device, dist: distributed.Dist, log) -> Nets:
    if dist.enabled:
        g = nets.g
        if cfg.model.bn == "train" and device.type == "cuda":
            g = nn.SyncBatchNorm.convert_sync_batchnorm(g)
        elif cfg.model.bn == "train":  # torch's SyncBatchNorm raises on CPU tensors
            log("model.bn=train on CPU: BatchNorm statistics are per process (no SyncBatchNorm)")
        ids = [device.index] if device.type == "cuda" else None
        nets = Nets(*(nn.parallel.DistributedDataParallel(m, device_ids=ids)
                      for m in (g, nets.d, nets.d_aux)))
    if cfg.train.compile:
        nets = Nets(torch.compile(nets.g), nets.d, nets.d_aux)
    return nets


@dataclass(frozen=True)
class Final:
    """A run's config made final (finalize): what the init weights decide is resolved in `cfg`, and the
    weights are read, once, into `init`. Nothing writes into it afterwards."""
    cfg: config.Config
    init: models.InitWeights | None


def finalize(cfg: config.Config) -> Final:
    """The one place where a config becomes final: model.init_weights read (the file can be a ~170 MB
    checkpoint: once per start), then `resolve`. The argument is not modified."""
    init = models.read_init_weights(cfg.model.init_weights) if cfg.model.init_weights else None
    return Final(resolve(cfg, init), init)


def resolve(cfg: config.Config, init: models.InitWeights | None) -> config.Config:
    """A copy of `cfg` with the settings that follow model.init_weights made concrete: the bottleneck
    stride placement and the input normalisation of the weights' layout ("caffe" for DeepLab-v2 /
    AdaptSegNet / MRNet weights, "imagenet" for torchvision's or without weights).

    A warm start (a pwda_fast checkpoint or exported generator) takes both from the run that trained
    it; a generator key or an explicit data.normalize that disagrees with that run is a ConfigError.
    `init`: the weights as finalize read them (None without model.init_weights).
    """
    try:
        model = models.resolve_model(cfg.model, init)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    normalize = cfg.data.normalize
    if init is not None and init.layout == "pwda" and normalize not in ("auto", init.normalize):
        raise config.ConfigError(
            f"model.init_weights {init.path} was trained on data.normalize = {init.normalize!r} inputs, "
            f"but the config sets {normalize!r}; pass --data.normalize={init.normalize} (or auto)")
    if normalize == "auto":
        normalize = init.normalize if init is not None else "imagenet"
    return dataclasses.replace(copy.deepcopy(cfg), model=model,
                               data=dataclasses.replace(copy.deepcopy(cfg.data), normalize=normalize))


def check_trainable(cfg: config.Config) -> None:
    """Refuse settings that cannot train: BatchNorm with frozen affine parameters ("stats", "frozen")
    on random weights keeps every layer's scale at its initial value (the paper preset from scratch
    reached a segmentation loss of 2.3e5 at step 1 and NaN after)."""
    if cfg.model.bn in ("stats", "frozen") and not cfg.model.init_weights:
        raise config.ConfigError(
            f"model.bn={cfg.model.bn} freezes BatchNorm's affine parameters, which only trains from "
            "pretrained weights: give model.init_weights=FILE (DeepLab-v2 'Scale.' weights, e.g. "
            "DeepLab_resnet_pretrained_init-f81d91e8.pth, a torchvision ResNet, or a pwda_fast "
            "checkpoint or exported generator.pt to warm-start from), or train from scratch with "
            "--model.bn=train")


def build(run: config.Config | Final, device: torch.device, dist: distributed.Dist | None = None, *,
          backend: str | None = None, log=lambda msg: None) -> Engine:
    """Seed (train.seed + rank), build, place and wrap the networks; backend None = kernels.loss.
    run: a Final (training: finalized once by its entry point), or a Config, finalized here. The
    Engine's `cfg` is the final config."""
    final = run if isinstance(run, Final) else finalize(run)
    cfg, init = final.cfg, final.init
    dist = dist or distributed.Dist()
    torch.manual_seed(cfg.train.seed + dist.rank)
    kernels = ops.resolve_kernels(dataclasses.replace(cfg.kernels, loss=backend or cfg.kernels.loss), device)
    discriminators = adversaries.get(cfg.adapt.adversary).discriminators
    nets = Nets(*models.build_networks(cfg.model, init, discriminators, kernels=kernels))
    if init is not None and init.layout == "pwda":
        log(f"warm start from {init.path} ({models.trained_words(init.trained)}): its generator weights; "
            "D, D_aux, the optimizers and the step start fresh")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    for net in nets:
        net.to(device, memory_format=fmt).train()
    optimizers = build_optimizers(cfg.optim, nets)
    adapter = Adapter(_wrap(cfg, nets, device, dist, log), optimizers, cfg.adapt,
                      Schedule(cfg.optim, cfg.train.iters), amp=cfg.train.amp,
                      channels_last=cfg.train.channels_last, loss_kernel=kernels.loss, device=device,
                      dist=dist, num_classes=cfg.model.num_classes)
    if cfg.train.cuda_graphs:
        check_graphable(cfg, device, dist)
        adapter = graphs.GraphedAdapter(adapter)
    return Engine(nets, optimizers, adapter, kernels, cfg)


def check_graphable(cfg: config.Config, device: torch.device, dist: distributed.Dist) -> None:
    """train.cuda_graphs runs where a captured iteration is exactly the eager one: else ConfigError."""
    t = cfg.train
    problems = [why for bad, why in [
        (device.type != "cuda", f"a CUDA device (this run is on {device.type})"),
        (dist.enabled, "one process (DDP's gradient hooks are not captured)"),
        (t.compile, "train.compile = false"),
        (t.amp == "fp16", "train.amp none or bf16 (the fp16 loss scaler is not captured)"),
        (cfg.optim.impl != "auto", "optim.impl = auto (the fused optimizers skip on a device flag)"),
    ] if bad]
    if problems:
        raise config.ConfigError("train.cuda_graphs needs " + "; ".join(problems))
