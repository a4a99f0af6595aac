"""Networks: the generator G = C(F(x)) (MRNet or DeepLab-v2), D (output space), D_aux (feature space)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from pwda_fast.models.backbone import DilatedResNet
from pwda_fast.models.deeplab import DeepLabV2
from pwda_fast.models.discriminator import FeatureDiscriminator, OutputDiscriminator
from pwda_fast.models.mrnet import MRNet

__all__ = ["DeepLabV2", "MRNet", "OutputDiscriminator", "FeatureDiscriminator", "build_networks",
           "resolve_model", "weights_layout", "load_init_weights"]

# Published heads that are not ours to load when the class count differs (ImageNet fc, VOC/COCO heads).
_HEAD_KEYS = ("fc.", "layer5.", "layer6.", "aux_head.", "main_head.")
# Where each weights layout puts a bottleneck's stride.
_STRIDE_OF_LAYOUT = {"caffe": "1x1", "torchvision": "3x3"}
_LAYOUT_WORDS = {"caffe": "the Caffe / DeepLab-v2 layout (stride on the bottleneck's 1x1 conv)",
                 "torchvision": "torchvision's layout (stride on the bottleneck's 3x3 conv)"}


def build_networks(model_cfg) -> tuple[nn.Module, nn.Module, nn.Module]:
    """ModelConfig -> (generator, output discriminator D, feature discriminator D_aux).

    stride_on "auto" is resolved here from model.init_weights (resolve_model); a caller that saves
    the config should resolve it first, so that the saved copy names the geometry it built.
    """
    m = resolve_model(model_cfg)
    if m.arch == "mrnet":
        g = MRNet(m.num_classes, m.depth, m.width, m.bn, m.stride_on, m.head_width, m.head_norm,
                  m.head_se, m.head_dropout)
    elif m.arch == "deeplabv2":
        g = DeepLabV2(m.num_classes, m.depth, m.width, m.bn, m.stride_on)
    else:
        raise ValueError(f"model.arch must be 'mrnet' or 'deeplabv2'; got {m.arch!r}")
    if m.init_weights:
        load_init_weights(g, m.init_weights)
    d = OutputDiscriminator(m.num_classes, m.disc_width)
    d_aux = FeatureDiscriminator(g.feat_channels, m.aux_disc_width)
    return g, d, d_aux


def resolve_model(model_cfg):
    """ModelConfig -> a copy with stride_on "auto" replaced by the geometry of model.init_weights.

    "Scale." or layer5/layer6 keys (DeepLab-v2, AdaptSegNet, MRNet) -> "1x1"; torchvision's
    resnet keys -> "3x3"; no weights -> "1x1". An explicit "1x1"/"3x3" is kept as it is:
    load_init_weights refuses it if the file disagrees. The argument is not modified.
    """
    if model_cfg.stride_on != "auto":
        return model_cfg
    layout = weights_layout(model_cfg.init_weights)
    return dataclasses.replace(model_cfg, stride_on=_STRIDE_OF_LAYOUT[layout] if layout else "1x1")


def weights_layout(path: str | Path) -> str | None:
    """Initial-weights file -> "caffe" | "torchvision"; None when there is no file ("").

    "caffe": DeepLab-v2 "Scale." keys, or AdaptSegNet / MRNet checkpoints (heads named layer5,
    layer6); these expect BGR 0-255 mean-subtracted inputs and stride on the 1x1 conv.
    "torchvision": plain resnet keys with the ImageNet "fc" (RGB / 255, ImageNet mean and std;
    stride on the 3x3 conv). A file whose keys say neither is refused with what to set instead.
    """
    if not path:
        return None
    layout = _layout_of(_read_weights(path))
    if layout is None:
        raise ValueError(f"model.init_weights {path}: cannot tell its layout from its keys (no "
                         "'Scale.' prefix, no layer5/layer6 heads, no torchvision 'fc'); set "
                         "model.stride_on ('1x1' Caffe, '3x3' torchvision) and data.normalize "
                         "('caffe' or 'imagenet') explicitly")
    return layout


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A .pth of tensors (optionally under "state_dict"); never unpickles code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_weights: {path} does not exist; give a local .pth file "
                                "(torchvision ResNet or DeepLab-v2 'Scale.' layout)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _layout_of(state: dict) -> str | None:
    """Keys -> "caffe" | "torchvision" | None (our own generator's keys, or keys that say neither)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state]
    if any(k.startswith(("Scale.", "layer5.", "layer6.")) for k in keys):
        return "caffe"
    if "fc.weight" in keys and "conv1.weight" in keys:
        return "torchvision"
    return None


def _our_name(key: str) -> str:
    """Published key -> our module name: strips "module."/"Scale." and renames the heads
    (AdaptSegNet and MRNet both call the aux head layer5 and the main head layer6)."""
    for prefix in ("module.", "Scale."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("layer5."):
        return "aux_head." + key[len("layer5."):]
    if key.startswith("layer6."):
        return "main_head." + key[len("layer6."):]
    return key


def load_init_weights(model: DilatedResNet, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet / DeepLab / AdaptSegNet / MRNet weights into DeepLabV2 or MRNet by name.

    Every backbone tensor must be present with the right shape; heads (fc, VOC/COCO classifiers,
    another generator's heads) load only where names and shapes fit. A file whose layout puts the
    stride elsewhere than model.stride_on is refused. Returns {"loaded": [...], "skipped": [...]}.
    """
    state = _read_weights(path)
    layout = _layout_of(state)
    if layout is not None and _STRIDE_OF_LAYOUT[layout] != model.stride_on:
        want = _STRIDE_OF_LAYOUT[layout]
        raise ValueError(f"model.init_weights {path} is in {_LAYOUT_WORDS[layout]}, but the config "
                         f"sets model.stride_on = \"{model.stride_on}\"; set model.stride_on = "
                         f"\"{want}\" (or \"auto\") to build the geometry these weights were "
                         "trained in")
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
        raise ValueError(f"model.init_weights {path} does not fit {type(model).__name__}(depth/width "
                         f"of the config): " + "; ".join(problems))
    model.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "skipped": skipped}
