"""The paper's weighting maps (eqs. 3-6, docs/METHOD.md §1) as whole maps over target images.

reference.py holds the equations, per pixel; this module composes them into the maps of the paper's
Fig. 2 from a generator's main-head logits and D_aux's logits, at image size and with a run's adapt
settings, exactly as training weights its adversarial loss. The pictures (pictures.py) and the Fig. 2
statistics (weight_stats.py) read the maps from here (target_maps), computed as training computes them:
on a batch of target images with BatchNorm on that batch's statistics (batch_statistics). It imports
no network class and nothing of the loop.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pwda_fast import reference


def constants(adapt_cfg) -> dict[str, float]:
    """Eqs. 3-6's constants from an AdaptConfig: {"threshold": T, "floor", "mu"}, as the reference's
    and the ops' keyword arguments."""
    return {"threshold": adapt_cfg.threshold, "floor": adapt_cfg.floor, "mu": adapt_cfg.mu}


def uses_dis(adapt_cfg) -> bool:
    """True where w carries DisMap, sigmoid(a) (eq. 6: adapt.weighting = "gen+dis"); else w is eq. 4's
    d + mu, which a run that does not weight (weighting "none", source-only) would have used."""
    return adapt_cfg.weighting == "gen+dis"


def trains_aux(adapt_cfg) -> bool:
    """True where D_aux and F's feature-level adversarial term (eq. 8) train: adapt.weighting "gen+dis",
    and "gen+aux", which keeps them but leaves sigmoid(a) out of w."""
    return adapt_cfg.weighting in ("gen+dis", "gen+aux")


@torch.no_grad()
def maps(main_logits: torch.Tensor, aux_logits: torch.Tensor, size, adapt_cfg) -> dict[str, torch.Tensor]:
    """The weighting maps of a batch of target images of size (H, W) = `size`.

    main_logits (N, C, h, w): G's main head; aux_logits (N, 1, ha, wa): D_aux's logits, at feature or
    image size. Both are upsampled to (H, W) as training does (bilinear, align_corners=True) ->
    {"logits": (N, C, H, W) and "aux": (N, 1, H, W), float32, the upsampled inputs;
    "gen": (N, H, W) d of eq. 3 (GenMap); "dis": (N, H, W) sigmoid(aux) (DisMap);
    "weight": (N, H, W) w, eq. 6 when uses_dis(adapt_cfg), else eq. 4}: the map that weighted this
    run's adversarial loss.
    """
    logits = reference.upsample_to(main_logits.float(), size)
    aux = reference.upsample_to(aux_logits.float(), size)
    k = constants(adapt_cfg)
    return {"logits": logits, "aux": aux,
            "gen": reference.generation_confidence(logits, threshold=k["threshold"], floor=k["floor"]),
            "dis": torch.sigmoid(aux[:, 0]),
            "weight": reference.pixel_weights(logits, aux if uses_dis(adapt_cfg) else None, **k)}


def d_aux_logits(d_aux: nn.Module, feat: torch.Tensor, size, aux_at: str) -> torch.Tensor:
    """D_aux's logits on layer4 features (N, F, h, w): at image size `size` (adapt.aux_at = "image",
    the paper) or at feature size ("feature"). Training and the weighting maps both use it."""
    return d_aux(feat, size) if aux_at == "image" else d_aux(feat)


@contextlib.contextmanager
def batch_statistics(*nets: nn.Module):
    """The networks as the generator stage runs them, for a measurement that changes nothing: train
    mode (BatchNorm normalises by the batch's statistics where model.bn has training do so; a frozen
    backbone keeps its own eval BatchNorm), dropout off (a measurement draws no random numbers), and
    every buffer (running statistics, num_batches_tracked) and train/eval mode restored afterwards."""
    modes = [(m, m.training) for net in nets for m in net.modules()]
    saved = [(b, b.clone()) for net in nets for b in net.buffers()]
    try:
        for net in nets:
            net.train()
            for m in net.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
        yield
    finally:
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def target_maps(g: nn.Module, d_aux: nn.Module, images: torch.Tensor, adapt_cfg) -> dict[str, torch.Tensor]:
    """maps() of a batch of target images (N, 3, H, W) as the generator stage weights them: G and
    D_aux under batch_statistics, so BatchNorm sees this batch as it sees a training batch (a batch of
    one image normalises by that image's own statistics)."""
    size = tuple(images.shape[2:])
    with batch_statistics(g, d_aux):
        _, main, feat = g(images)
        return maps(main, d_aux_logits(d_aux, feat, size, adapt_cfg.aux_at), size, adapt_cfg)
