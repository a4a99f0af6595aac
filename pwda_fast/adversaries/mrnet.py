"""MRNet's own adversary as published (adapt.adversary = "mrnet"; layumi/Seg-Uncertainty trainer_ms.py):
two multi-scale LSGAN discriminators, D1 on the aux head and D2 on the main head, with a gradient
penalty on the real input, and no pixel weighting (docs/METHOD.md)."""

from __future__ import annotations

import torch
from torch import nn

from pwda_fast import reference
from pwda_fast.adversaries.base import Adversary, adversarial_cause, unwrap
from pwda_fast.models import FeatureDiscriminator, MRNetDiscriminators


class MRNetAdversary(Adversary):
    name = "mrnet"
    trains = ("d",)
    reads_aux_head = True  # D1 scores the aux head

    @staticmethod
    def discriminators(model_cfg, feat_channels: int, kernels=None) -> tuple[nn.Module, nn.Module]:
        # D_aux is built (the checkpoint keeps its key) but never called.
        return (MRNetDiscriminators(model_cfg.num_classes, model_cfg.ms_disc_stride, model_cfg.ms_disc_width),
                FeatureDiscriminator(feat_channels, model_cfg.aux_disc_width))

    @staticmethod
    def check(adapt_cfg) -> list[str]:
        if adapt_cfg.mode == "adapt" and adapt_cfg.weighting != "none":
            return [f"adapt.adversary 'mrnet' runs MRNet's own discriminators, which weight no pixel; "
                    f"set adapt.weighting = 'none' (got {adapt_cfg.weighting!r})"]
        return []

    @staticmethod
    def governs(cfg, term: str) -> str | None:
        return adversarial_cause(cfg, term, ("lambda_mrnet_main", "lambda_mrnet_aux"))

    def generator_loss(self, tgt: dict, losses: dict, step: int) -> tuple[torch.Tensor, dict]:
        """trainer_ms.py gen_update: G pulls D1's scores of softmax(aux) and D2's of softmax(main),
        image-size logits, toward "real" (LSGAN, calc_gen_loss): lambda_mrnet_aux * L_gen(D1) +
        lambda_mrnet_main * L_gen(D2), logged as "adv_aux" and "adv"."""
        d, fmt = unwrap(self.nets.d), self.memory_format
        with self.autocast():
            maps_aux, maps_main = d(torch.softmax(tgt["aux"], 1).contiguous(memory_format=fmt),
                                    torch.softmax(tgt["main"], 1).contiguous(memory_format=fmt))
        loss_adv, loss_adv_aux = reference.lsgan_gen_loss(maps_main), reference.lsgan_gen_loss(maps_aux)
        losses["adv"], losses["adv_aux"] = loss_adv.detach(), loss_adv_aux.detach()
        return self.cfg.lambda_mrnet_main * loss_adv + self.cfg.lambda_mrnet_aux * loss_adv_aux, {}

    def discriminator_loss(self, src: dict, tgt: dict, losses: dict, step: int) -> torch.Tensor:
        """trainer_ms.py dis_update: on detached image-size outputs, D1 scores softmax(aux_t) as fake and
        D2 softmax(main_t), both against the source's softmax(0.5 * aux_s + main_s) as real; each
        minimises calc_dis_loss (LSGAN, gradient penalty on the real input), logged as "d_aux" (D1) and
        "d" (D2). Fake and real go through each D as one batch (D has no normalisation, so each image's
        scores are its own)."""
        n_t = tgt["main"].shape[0]
        real = reference.fused_probs(src["aux"], src["main"]).requires_grad_()  # a leaf: the penalty's input
        inputs = [torch.cat([torch.softmax(tgt[k], 1), real]).contiguous(memory_format=self.memory_format)
                  for k in ("aux", "main")]
        with self.autocast():
            maps_aux, maps_main = self.nets.d(*inputs)
        loss_d_aux, loss_d = (reference.lsgan_dis_loss([m[:n_t] for m in maps], [m[n_t:] for m in maps], real)
                              for maps in (maps_aux, maps_main))
        losses["d"], losses["d_aux"] = loss_d.detach(), loss_d_aux.detach()
        return loss_d + loss_d_aux
