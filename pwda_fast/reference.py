"""Pure-torch reference of the method: the spec every fast backend is tested against.

Each function here is the plain, readable form of one equation of the paper (Tian, Qu, Payeur,
"Unsupervised Pixel-Wise Weighted Adversarial Domain Adaptation") or of MRNet's recipe the paper
builds on, as written in docs/METHOD.md.
Fast backends (`csrc/`, `kernels/`) keep the same names and must agree with these functions.

Shapes: seg logits x (N, C, H, W); discriminator logit z and auxiliary logit a (N, 1, H, W), or
(N, 1, h, w) with h <= H, w <= W: weighted_adv_loss then upsamples them bilinearly (align_corners=True)
to (H, W) first, as docs/METHOD.md prescribes for D's and D_aux's outputs.
"""

from __future__ import annotations

import contextlib

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
                  threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1,
                  detach: bool = True) -> torch.Tensor:
    """Eqs. (4) and (6): w = (d + mu) * sigmoid(a), or d + mu without D_aux.

    seg_logits (N, C, H, W), aux_logits (N, 1, H, W) or None -> (N, H, W) float32, no gradient:
    the weights are a constant "weighting map" (our reading; the paper is silent); detach=False lets
    the gradient flow through them into both logits (adapt.weight_grad = "flowing", as CLAN's code).
    """
    with torch.no_grad() if detach else contextlib.nullcontext():
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


def upsample_leaky_relu(x: torch.Tensor, size, slope: float = 0.2) -> torch.Tensor:
    """leaky_relu(upsample(x, size)): D_aux's first activation at image size (models/discriminator.py).
    x (N, C, h, w) -> (N, C, *size), bilinear with align_corners=True."""
    return F.leaky_relu(upsample_to(x, size), slope)


def weighted_adv_loss(seg_logits: torch.Tensor, disc_logits: torch.Tensor,
                      aux_logits: torch.Tensor | None = None, *, label: float,
                      threshold: float = 0.9, floor: float = 0.01, mu: float = 0.1,
                      detach_weights: bool = True) -> torch.Tensor:
    """L = mean over N*H*W pixels of w * BCE(z, y); gradient flows into disc_logits only (also into
    seg_logits and aux_logits through w with detach_weights=False).

    seg_logits (N, C, H, W), disc_logits (N, 1, h, w), aux_logits (N, 1, ha, wa) or None -> () float32.
    Lower-resolution D / D_aux maps are first upsampled to (H, W) with `upsample_to`.
    """
    size = seg_logits.shape[2:]
    disc_logits = upsample_to(disc_logits, size)
    if aux_logits is not None:
        aux_logits = upsample_to(aux_logits.detach() if detach_weights else aux_logits, size)
    w = pixel_weights(seg_logits, aux_logits, threshold=threshold, floor=floor, mu=mu, detach=detach_weights)
    return (w * bce_with_logits(disc_logits[:, 0], label)).mean()


def domain_bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Unweighted BCE of a discriminator map against a domain label (source 0, target 1)."""
    return bce_with_logits(logits, label).mean()


def seg_ce(logits: torch.Tensor, labels: torch.Tensor,
           class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Source cross-entropy, void pixels (255) ignored; 0 (not NaN) when a crop is all void.

    logits (N, C, H, W) at label resolution, labels (N, H, W) int64, class_weights (C,) or None:
    the weighted mean sum(w_y * nll) / sum(w_y) over non-void pixels, as torch's weighted CE.
    """
    loss = F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    valid = labels != IGNORE_INDEX
    if class_weights is None:
        return loss / valid.sum().clamp_min(1)
    # The denominator by integer indexing with void pixels weighted 0: a boolean-mask index
    # (class_weights[labels[valid]]) is a nonzero, which waits for the device (tests/test_host_syncs.py).
    picked = class_weights[labels.clamp(0, class_weights.shape[0] - 1)]
    return loss / torch.where(valid, picked, 0.0).sum().clamp_min(1e-12)


def class_balance_weights(labels: torch.Tensor, num_classes: int, max_value: float,
                          often: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MRNet's per-batch class weights for the source CE (its trainer's update_class_criterion).

    labels (N, H, W) -> (weights (C,), updated `often` (C,) or None). A class with fewer than
    64*64*N pixels in the batch weighs max_value, others 1. With `often` (a running weight, ones at
    the start) the weights are also multiplied by 0.9 * often + 0.1 * (max_value where the class is
    absent from this batch, else 1), which becomes the new `often`.
    """
    # Counted by a scatter into a void bin, not bincount of the non-void pixels: both of those wait
    # for the device (the mask's size, bincount's max), and the training step must not.
    flat = labels.flatten().long()
    bins = torch.where((flat >= 0) & (flat < num_classes), flat, num_classes)
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device).scatter_add_(
        0, bins, torch.ones_like(bins))[:num_classes]
    rare = counts < 64 * 64 * labels.shape[0]
    weights = torch.where(rare, max_value, 1.0).float()
    if often is None:
        return weights, None
    often = 0.9 * often + 0.1 * torch.where(counts == 0, max_value, 1.0).float()
    return weights * often, often


def hard_pixel_labels(logits: torch.Tensor, labels: torch.Tensor, percentile: float,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MRNet's hard-pixel selection: labels with the pixels whose (weighted) CE is below the
    `percentile`-th percentile of all N*H*W pixels (void ones counting as 0) set to void.

    logits (N, C, H, W), labels (N, H, W) -> (N, H, W); percentile 80 keeps about the hardest 20%.
    """
    with torch.no_grad():
        loss = F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=IGNORE_INDEX,
                               reduction="none")
        cut = torch.quantile(loss.flatten(), percentile / 100.0)
        return torch.where(loss < cut, torch.full_like(labels, IGNORE_INDEX), labels)


def multi_level_seg_loss(aux_logits: torch.Tensor, main_logits: torch.Tensor, labels: torch.Tensor,
                         lambda_seg: float, class_weights: torch.Tensor | None = None,
                         hard_percentile: float = 0.0) -> torch.Tensor:
    """Stage 1 (eq. 1, multi-level): CE(main) + lambda_seg * CE(aux head on layer3).

    Optionally MRNet's class weights and hard-pixel selection, the latter per head on its own loss.
    """
    def ce(logits):
        y = hard_pixel_labels(logits, labels, hard_percentile, class_weights) if hard_percentile else labels
        return seg_ce(logits, y, class_weights)

    return ce(main_logits) + lambda_seg * ce(aux_logits)


def fused_probs(aux_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """softmax(0.5 * aux + main) over classes: (N, C, H, W) logits -> (N, C, H, W) float32. The
    prediction MRNet feeds its discriminators as "real" (trainer_ms.py dis_update) and distils into
    both heads (memory_kl)."""
    return torch.softmax(0.5 * aux_logits.float() + main_logits.float(), dim=1)


def memory_kl(aux_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """MRNet memory regularisation: KL of each head toward the detached fused prediction.

    The fused target is softmax(0.5 * p1 + p2) with p1 the aux head and p2 the main head logits.
    Returns the per-pixel KL, summed over classes and the two heads, averaged over pixels.
    """
    with torch.no_grad():
        target = fused_probs(aux_logits, main_logits)
    kl = 0.0
    for logits in (aux_logits, main_logits):
        log_p = torch.log_softmax(logits.float(), dim=1)
        kl = kl + F.kl_div(log_p, target, reduction="none").sum(dim=1).mean()
    return kl


# -- MRNet's own adversary (adapt.adversary = "mrnet"; models/ms_discriminator.py) --------------------
# layumi/Seg-Uncertainty model/ms_discriminator.py, MsImageDis with gan_type 'lsgan'. `maps` are the
# per-scale score maps a MultiScaleDiscriminator returns: [(N, 1, H_s, W_s)] (raw, no sigmoid).

MRNET_PENALTY = 0.01  # MsImageDis.LAMBDA: weight of the gradient penalty on the real inputs


def lsgan_gen_loss(maps: list[torch.Tensor]) -> torch.Tensor:
    """calc_gen_loss: sum over scales of 2 * mean((D(fake) - 1)^2): G pulls its target outputs'
    scores to the "real" label 1. -> () float32."""
    return sum(2.0 * ((m.float() - 1.0) ** 2).mean() for m in maps)


def lsgan_dis_loss(fake_maps: list[torch.Tensor], real_maps: list[torch.Tensor], real_input: torch.Tensor,
                   penalty: float = MRNET_PENALTY) -> torch.Tensor:
    """calc_dis_loss: sum over scales of mean(D(fake)^2) + mean((D(real) - 1)^2) + penalty * R_s, where
    R_s = mean over images of sum over (C, H, W) of (d sum(D(real)_s) / d real_input)^2 (compute_grad2,
    one gradient per scale, taken with create_graph so that D's update descends through it too).

    real_input: the (N, K, H, W) tensor D saw at its first scale, a leaf with requires_grad; real_maps
    must have been computed from it. -> () float32.
    """
    loss = 0.0
    for fake, real in zip(fake_maps, real_maps):
        (grad,) = torch.autograd.grad(real.float().sum(), real_input, create_graph=True)
        reg = grad.float().pow(2).flatten(1).sum(1).mean()
        loss = loss + (fake.float() ** 2).mean() + ((real.float() - 1.0) ** 2).mean() + penalty * reg
    return loss
