"""Public ops, each in its own module with its backend table; one resolver for all.

    ops.weighted_adv_loss(seg_logits, disc_logits, aux_logits=None, *, label, ..., backend="auto")
    ops.pixel_weights(seg_logits, aux_logits=None, *, threshold, floor, mu)
    ops.upsample_leaky_relu(x, size, *, slope=0.2, backend="auto")
    ops.LOSS, ops.UPSAMPLE       the ops' backend tables: .names, .problem(backend, device_type),
                                 .available(), .resolve(backend, device), .first_call(backend, device)
    ops.resolve_kernels(kernels_cfg, device)  -> Kernels: every op's backend resolved once, as FirstCall
    ops.ext_digest()                          the compiled extension's sha256 (12 hex digits)

An explicit backend that cannot run raises with the reason; only "auto" falls back. Training resolves
the config's kernels.* once (resolve_kernels) and hands each FirstCall to what calls the op: a fused
kernel that fails on its first call falls back to "torch" with one warning instead of ending the run.

Adding an op: its kernels (kernels/ or csrc/), one module here (public function, custom op, fake,
autograd, and its OpBackends registered), a KernelsConfig field named by the table's `key`, and the
FirstCall from Kernels handed to the module that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pwda_fast.ops.backends import OPS, FirstCall, OpBackends, ext_digest
from pwda_fast.ops.loss import LOSS, check_inputs, pixel_weights, weighted_adv_loss
from pwda_fast.ops.upsample import UPSAMPLE, upsample_leaky_relu

__all__ = ["LOSS", "OPS", "UPSAMPLE", "FirstCall", "Kernels", "OpBackends", "check_inputs", "ext_digest",
           "pixel_weights", "resolve_kernels", "upsample_leaky_relu", "weighted_adv_loss"]


@dataclass(frozen=True)
class Kernels:
    """Every op's backend for one run, resolved once (resolve_kernels), as its callers use it."""
    loss: FirstCall
    """ops.weighted_adv_loss (kernels.loss): handed to the adversary."""
    upsample: FirstCall
    """ops.upsample_leaky_relu (kernels.upsample): handed to D_aux."""

    def names(self) -> dict[str, str]:
        """{"loss": backend, "upsample": backend} as the calls use them now (after any fallback)."""
        return {f.name: getattr(self, f.name).backend for f in fields(self)}


def resolve_kernels(kernels_cfg, device: torch.device | str = "cpu") -> Kernels:
    """kernels.* (KernelsConfig) -> Kernels for `device`: "auto" made concrete, an explicit backend
    that cannot run raises RuntimeError with its reason."""
    return Kernels(**{table.key: table.first_call(getattr(kernels_cfg, table.key), device)
                      for table in OPS.values()})
