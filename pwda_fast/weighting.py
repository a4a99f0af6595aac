"""The paper's weighting maps (eqs. 3-6, docs/METHOD.md §1) as whole maps over target images.

reference.py holds the equations, per pixel; this module composes them into the maps of the paper's
Fig. 2 from a generator's main-head logits and D_aux's logits, at image size and with a run's adapt
settings, exactly as training weights its adversarial loss. The pictures (pictures.py) and the Fig. 2
statistics (weight_stats.py) read the maps from here. It imports no network and nothing of the loop:
who runs G and D_aux (and where D_aux sees the features, adapt.aux_at) hands it their outputs.
"""

from __future__ import annotations

import torch

from pwda_fast import reference


def constants(adapt_cfg) -> dict[str, float]:
    """Eqs. 3-6's constants from an AdaptConfig: {"threshold": T, "floor", "mu"}, as the reference's
    and the ops' keyword arguments."""
    return {"threshold": adapt_cfg.threshold, "floor": adapt_cfg.floor, "mu": adapt_cfg.mu}


def uses_dis(adapt_cfg) -> bool:
    """True where w carries DisMap, sigmoid(a) (eq. 6: adapt.weighting = "gen+dis"); else w is eq. 4's
    d + mu, which a run that does not weight (weighting "none", source-only) would have used."""
    return adapt_cfg.weighting == "gen+dis"


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
