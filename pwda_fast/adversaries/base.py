"""What an adversary is to the Adapter (adversaries/__init__.py lists them)."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable

import torch
from torch import nn

from pwda_fast.models import Nets

SOURCE, TARGET = 0.0, 1.0  # domain labels of every discriminator


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def unwrap(module: nn.Module) -> nn.Module:
    """A DDP-wrapped module's own module: called unwrapped, it does not make DDP wait for gradients
    that a stage does not give it."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def adversarial_cause(cfg, term: str, lambdas: tuple[str, str]) -> str | None:
    """The diagnosis of a non-finite adversarial term (adv, adv_aux, d, d_aux): the generator stage's
    two weights `lambdas` (adapt.*) and the discriminators' rate, with their values; None otherwise."""
    if term not in ("adv", "adv_aux", "d", "d_aux"):
        return None
    values = [getattr(cfg.adapt, name) for name in lambdas]
    return (f"the adversarial terms diverged first: lower adapt.{lambdas[0]} / adapt.{lambdas[1]} "
            f"(now {values[0]:g} / {values[1]:g}) or optim.lr_d (now {cfg.optim.lr_d:g})")


class Adversary(abc.ABC):
    """The adversarial half of one iteration, over the networks as training wraps them.

    The outputs it receives are dicts of image-size logits: "main" and "aux" (N, C, H, W) float32 and
    "feat" (N, F, h, w), the generator's features; in stage 2 attached to G's graph, in stage 3
    detached, with whatever `generator_loss` returned for stage 3 merged into the target's dict.
    """

    name = ""
    trains: tuple[str, ...] = ()
    """The networks among ("d", "d_aux") that this adversary trains (the others only load and save)."""
    reads_aux_head = False
    """Stage 3 reads the aux head's outputs ("aux"); else the Adapter drops them after stage 2 (two
    image-size logit maps, ~160 MB at the paper's batch 2 at 512x1024)."""

    def __init__(self, nets: Nets, adapt_cfg, *, autocast: Callable, memory_format, loss_kernel):
        self.nets, self.cfg, self.autocast = nets, adapt_cfg, autocast
        # The fused weighted loss as resolved for the run (ops.Kernels.loss): call it with
        # `self.loss_kernel(lambda backend: ops.weighted_adv_loss(..., backend=backend), grad_of)`.
        self.memory_format, self.loss_kernel = memory_format, loss_kernel

    # -- what a subclass defines ----------------------------------------------------------------------

    @staticmethod
    @abc.abstractmethod
    def discriminators(model_cfg, feat_channels: int, kernels=None) -> tuple[nn.Module, nn.Module]:
        """-> (d, d_aux) with fresh weights: the checkpoint's "d" and "d_aux". kernels: the run's
        ops.Kernels (None: "auto"), for a network that calls a fused op."""

    @staticmethod
    def check(adapt_cfg) -> list[str]:
        """The config problems this adversary has with the other adapt.* keys (ConfigError text)."""
        return []

    @staticmethod
    def governs(cfg, term: str) -> str | None:
        """For a loss term that went non-finite first (adv, adv_aux, d, d_aux), what most likely caused
        it and which setting to lower, with its value; None for a term that is not its own."""
        return None

    def phase(self, step: int):
        """What this adversary decides in Python from the step number (a CUDA graph captures it)."""
        return None

    @abc.abstractmethod
    def generator_loss(self, tgt: dict, losses: dict, step: int) -> tuple[torch.Tensor, dict]:
        """Stage 2, the discriminators frozen: the generator's adversarial loss on the target (logged
        into `losses`) -> (loss, what stage 3 needs from this stage)."""

    @abc.abstractmethod
    def discriminator_loss(self, src: dict, tgt: dict, losses: dict, step: int) -> torch.Tensor:
        """Stage 3, on detached outputs: the discriminators' loss (logged into `losses`)."""

    # -- shared ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def frozen(self):
        """Stage 2: the discriminators take no gradient (and are called unwrapped)."""
        nets = [unwrap(getattr(self.nets, name)) for name in self.trains]
        for net in nets:
            set_requires_grad(net, False)
        try:
            yield
        finally:
            for net in nets:
                set_requires_grad(net, True)
