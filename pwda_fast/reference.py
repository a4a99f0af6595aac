"""Pure-torch reference of the method: the spec every fast backend is tested against.

Each function here is the plain, readable form of one equation of the paper (Tian, Qu, Payeur,
"Unsupervised Pixel-Wise Weighted Adversarial Domain Adaptation"), as written in DESIGN.md §2.
Fast backends (`csrc/`, `kernels/`) keep the same names and must agree with these functions.

Shapes: seg logits x (N, C, H, W); discriminator logit z and auxiliary logit a (N, 1, H, W), or
(N, 1, h, w) with h <= H, w <= W: weighted_adv_loss then upsamples them bilinearly (align_corners=True)
to (H, W) first, as DESIGN.md §2 prescribes for D's and D_aux's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def generation_confidence(seg_logits: torch.Tensor, *, threshold: float = 0.9,
                          floor: float = 0.01) -> torch.Tensor:
    """Eq. (3): d = floor where p* > T, else exp(-p*), with p* = max_c softmax(x)_c.

    seg_logits (N, C, H, W) -> (N, H, W) float32. T >= 1 turns the floor off (p* <= 1 always).
    """
    p_max = torch.softmax(seg_logits.float(), dim=1).amax(dim=1)  # (N, H, W)
    d = torch.exp(-p_max)
    return torch.where(p_max > threshold, torch.full_like(d, floor), d)


def pixel_weights(seg_logits: torch.Tensor, aux_logits: torch.Tensor | None = None, *,
                  threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1) -> torch.Tensor:
    """Eqs. (4) and (6): w = (d + mu) * sigmoid(a), or d + mu without D_aux.

    seg_logits (N, C, H, W), aux_logits (N, 1, H, W) or None -> (N, H, W) float32, no gradient:
    the weights are the paper's constant "weighting map".
    """
    with torch.no_grad():
        w = generation_confidence(seg_logits, threshold=threshold, floor=floor) + mu
        if aux_logits is not None:
            w = w * torch.sigmoid(aux_logits.float()[:, 0])
    return w


def bce_with_logits(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Element-wise stable BCE against a constant domain label: max(z,0) - z*y + log(1+exp(-|z|))."""
    z = logits.float()
    return z.clamp_min(0) - z * label + torch.log1p(torch.exp(-z.abs()))


def upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=True to `size` (AdaptSegNet / CLAN); x itself when already that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def weighted_adv_loss(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                      aux_logits: torch.Tensor | None = None, *, label: float,
                      threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1) -> torch.Tensor:
    """L = mean over N*H*W pixels of w * BCE(z, y); gradient flows into disc_logits only.

    seg_logits (N, C, H, W), disc_logits (N, 1, h, w), aux_logits (N, 1, ha, wa) or None -> () float32.
    Lower-resolution D / D_aux maps are first upsampled to (H, W) with `upsample_to`.
    """
    size = seg_logits.shape[2:]
    disc_logits = upsample_to(disc_logits, size)
    if aux_logits is not None:
        aux_logits = upsample_to(aux_logits.detach(), size)
    w = pixel_weights(seg_logits, aux_logits, threshold=threshold, floor=floor, mu=mu)
    return (w * bce_with_logits(disc_logits[:, 0], label)).mean()


def domain_bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Unweighted BCE of a discriminator map against a domain label (source 0, target 1)."""
    return bce_with_logits(logits, label).mean()


def seg_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Source cross-entropy, void pixels (255) ignored; 0 (not NaN) when a crop is all void.

    logits (N, C, H, W) at label resolution, labels (N, H, W) int64.
    """
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp_min(1)


def multi_level_seg_loss(aux_logits: torch.Tensor, main_logits: torch.Tensor,
                         labels: torch.Tensor, lambda_seg: float) -> torch.Tensor:
    """Stage 1 (eq. 1, multi-level): CE(main) + lambda_seg * CE(aux head on layer3)."""
    return seg_ce(main_logits, labels) + lambda_seg * seg_ce(aux_logits, labels)


def memory_kl(aux_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """MRNet memory regularisation: KL of each head toward the detached fused prediction.

    The fused target is softmax(0.5 * p1 + p2) with p1 the aux head and p2 the main head logits.
    Returns the per-pixel KL, summed over classes and the two heads, averaged over pixels.
    """
    with torch.no_grad():
        target = torch.softmax(0.5 * aux_logits.float() + main_logits.float(), dim=1)
    kl = 0.0
    for logits in (aux_logits, main_logits):
        log_p = torch.log_softmax(logits.float(), dim=1)
        kl = kl + F.kl_div(log_p, target, reduction="none").sum(dim=1).mean()
    return kl
