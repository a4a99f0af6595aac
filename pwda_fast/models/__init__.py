"""Networks: the DeepLab-v2 generator G = C(F(x)), D (output space) and D_aux (feature space)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pwda_fast.models.deeplab import DeepLabV2
from pwda_fast.models.discriminator import FeatureDiscriminator, OutputDiscriminator

__all__ = ["DeepLabV2", "OutputDiscriminator", "FeatureDiscriminator", "build_networks",
           "load_init_weights"]

# Published heads that are not ours to load when the class count differs (ImageNet fc, VOC/COCO heads).
_HEAD_KEYS = ("fc.", "layer5.", "layer6.", "aux_head.", "main_head.")


def build_networks(model_cfg) -> tuple[nn.Module, nn.Module, nn.Module]:
    """ModelConfig -> (generator, output discriminator D, feature discriminator D_aux)."""
    g = DeepLabV2(model_cfg.num_classes, model_cfg.depth, model_cfg.width, model_cfg.bn)
    if model_cfg.init_weights:
        load_init_weights(g, model_cfg.init_weights)
    d = OutputDiscriminator(model_cfg.num_classes, model_cfg.disc_width)
    d_aux = FeatureDiscriminator(g.feat_channels, model_cfg.aux_disc_width)
    return g, d, d_aux


def _our_name(key: str) -> str:
    """Published key -> our module name: strips "module."/"Scale." and renames AdaptSegNet heads."""
    for prefix in ("module.", "Scale."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("layer5."):
        return "aux_head." + key[len("layer5."):]
    if key.startswith("layer6."):
        return "main_head." + key[len("layer6."):]
    return key


def load_init_weights(model: DeepLabV2, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet / DeepLab weights: torchvision ResNet keys or the DeepLab-v2 "Scale." layout.

    Every backbone tensor must be present with the right shape; heads (fc, VOC/COCO classifiers)
    load only where their shapes fit. Returns {"loaded": [...], "skipped": [...]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_weights: {path} does not exist; give a local .pth file "
                                "(torchvision ResNet or DeepLab-v2 'Scale.' layout)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    ours = model.state_dict()
    loaded, skipped, unexpected, mismatched = {}, [], [], []
    for key, value in state.items():
        name = _our_name(key)
        if name not in ours:
            (skipped if key.split(".")[0] + "." in _HEAD_KEYS or name.startswith(_HEAD_KEYS)
             else unexpected).append(key)
        elif ours[name].shape != value.shape:
            if name.startswith(_HEAD_KEYS):
                skipped.append(key)
            else:
                mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(ours[name].shape)}")
        else:
            loaded[name] = value
    missing = [k for k in ours if k not in loaded and not k.startswith(_HEAD_KEYS)
               and not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"{len(missing)} backbone tensors missing, first: {missing[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, first: {mismatched[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:5]}")
    if problems:
        raise ValueError(f"model.init_weights {path} does not fit DeepLabV2(depth/width of the "
                         f"config): " + "; ".join(problems))
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "skipped": skipped}
