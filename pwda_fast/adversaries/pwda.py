"""The paper's adversary (adapt.adversary = "pwda"): AdaptSegNet's fully convolutional BCE D on the
main head's softmax, the feature-level D_aux (eq. 8), and the pixel weighting of eqs. 3-9
(adapt.weighting: none / gen / gen+dis, and gen+aux: D_aux trained but out of w; docs/METHOD.md)."""

from __future__ import annotations

import torch

from pwda_fast import ops, reference, weighting
from pwda_fast.adversaries.base import SOURCE, TARGET, Adversary, adversarial_cause, unwrap
from pwda_fast.models import paper_discriminators
from pwda_fast.reference import upsample_to
from pwda_fast.weighting import d_aux_logits


class PaperAdversary(Adversary):
    name = "pwda"
    trains = ("d", "d_aux")

    def __init__(self, nets, adapt_cfg, **kw):
        super().__init__(nets, adapt_cfg, **kw)
        # D_aux and its loss (eq. 8) with gen+dis and gen+aux; sigmoid(a) in w (eq. 6) with gen+dis only.
        self.use_aux = weighting.trains_aux(adapt_cfg)
        self.aux_in_w = weighting.uses_dis(adapt_cfg)
        # Eq. (3)-(6)'s constants, as every weighted loss and weight map of the step takes them.
        self.weight_kw = weighting.constants(adapt_cfg)

    discriminators = staticmethod(paper_discriminators)

    @staticmethod
    def governs(cfg, term: str) -> str | None:
        return adversarial_cause(cfg, term, ("lambda_adv", "lambda_aux"))

    def weighting_on(self, step: int) -> bool:
        """Pixel weighting in this iteration: adapt.weighting is not "none" and the preheat is over."""
        return self.cfg.weighting != "none" and step >= self.cfg.preheat_iters

    def phase(self, step: int):
        return self.weighting_on(step)

    def _adv_loss(self, seg_logits, disc_logits, aux_logits, label: float, weighted: bool,
                  normalized: bool = False) -> torch.Tensor:
        """The output-space adversarial term: plain BCE (not weighted) or the pixel-weighted L, with
        the weights rescaled to mean 1 when normalized (L / mean(w): mean(w) is a constant in z).

        disc_logits and aux_logits come at D's and D_aux's native resolution: BCE upsamples D's map
        to the image size first, the fused weighted loss samples both maps bilinearly in-kernel.
        """
        if not weighted:
            return reference.domain_bce(upsample_to(disc_logits, seg_logits.shape[2:]), label)
        loss = self.loss_kernel(lambda backend: ops.weighted_adv_loss(
            seg_logits, disc_logits, aux_logits, label=label, backend=backend, **self.weight_kw),
            grad_of=(disc_logits,))
        if not normalized:
            return loss
        return loss / ops.pixel_weights(seg_logits, aux_logits, **self.weight_kw).mean()

    def generator_loss(self, tgt: dict, losses: dict, step: int) -> tuple[torch.Tensor, dict]:
        """G fools the frozen D, pixel-weighted (eq. 6), and F fools the frozen D_aux (eq. 8)."""
        a = self.cfg
        d, d_aux = unwrap(self.nets.d), unwrap(self.nets.d_aux)
        main_t, size = tgt["main"], tuple(tgt["main"].shape[2:])
        with self.autocast():
            z_t = d(torch.softmax(main_t, dim=1)).float()  # D's native resolution
            a_low = d_aux_logits(d_aux, tgt["feat"], size, a.aux_at).float() if self.use_aux else None
        # The weighting map is a constant (adapt.weight_grad = "detached"): seg and aux logits enter
        # the loss detached; the weighted loss takes D's map (and D_aux's with aux_at=feature) at native
        # resolution, upsampled in-kernel. "flowing" (CLAN) differentiates through w on the torch path.
        weight_aux = a_low.detach() if a_low is not None and self.aux_in_w else None
        weighted = self.weighting_on(step)
        if weighted and a.weight_grad == "flowing":
            loss_adv = reference.weighted_adv_loss(main_t, z_t, a_low if self.aux_in_w else None,
                                                   label=SOURCE, detach_weights=False, **self.weight_kw)
        else:
            loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, SOURCE, weighted)
        loss_g = a.lambda_adv * loss_adv
        losses["adv"] = loss_adv.detach()
        if self.use_aux:
            loss_adv_aux = reference.domain_bce(upsample_to(a_low, size), SOURCE)
            loss_g = loss_g + a.lambda_aux * loss_adv_aux
            losses["adv_aux"] = loss_adv_aux.detach()
        return loss_g, {"weight_aux": weight_aux}

    def discriminator_loss(self, src: dict, tgt: dict, losses: dict, step: int) -> torch.Tensor:
        """D and D_aux on detached outputs; source and target in one batch (no BN in D). D's target term
        is weighted as adapt.d_target says (eq. 9 by default)."""
        a = self.cfg
        n_s, size = src["main"].shape[0], tuple(src["main"].shape[2:])
        probs = torch.cat([torch.softmax(src["main"], 1), torch.softmax(tgt["main"], 1)])
        with self.autocast():
            z = self.nets.d(probs.contiguous(memory_format=self.memory_format)).float()
        weighted = self.weighting_on(step) and a.d_target != "unweighted"
        loss_d = reference.domain_bce(upsample_to(z[:n_s], size), SOURCE) + self._adv_loss(
            tgt["main"], z[n_s:], tgt["weight_aux"], TARGET, weighted, a.d_target == "normalized")
        losses["d"] = loss_d.detach()
        if self.use_aux:
            with self.autocast():
                logits = d_aux_logits(self.nets.d_aux, torch.cat([src["feat"], tgt["feat"]]), size, a.aux_at)
            logits = upsample_to(logits.float(), size)
            loss_d_aux = (reference.domain_bce(logits[:n_s], SOURCE)
                          + reference.domain_bce(logits[n_s:], TARGET))
            losses["d_aux"] = loss_d_aux.detach()
            loss_d = loss_d + loss_d_aux
        return loss_d
