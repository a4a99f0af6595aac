"""Networks: the generator G = C(F(x)) (MRNet or DeepLab-v2), D (output space), D_aux (feature space),
built from the model config and, when given, model.init_weights (models/init_weights.py reads it).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

from torch import nn

from pwda_fast.models.backbone import DilatedResNet
from pwda_fast.models.deeplab import DeepLabV2
from pwda_fast.models.discriminator import FeatureDiscriminator, OutputDiscriminator
from pwda_fast.models.init_weights import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    InitWeights,
    load_init_weights,
    read_init_weights,
    trained_record,
    trained_words,
    weights_layout,
)
from pwda_fast.models.mrnet import MRNet
from pwda_fast.models.ms_discriminator import MRNetDiscriminators, MultiScaleDiscriminator

__all__ = ["DeepLabV2", "MRNet", "OutputDiscriminator", "FeatureDiscriminator", "MRNetDiscriminators",
           "MultiScaleDiscriminator", "build_networks", "paper_discriminators",
           "build_generator", "resolve_model", "weights_layout", "read_init_weights", "load_init_weights",
           "InitWeights", "EXPORT_FORMAT", "EXPORT_VERSION", "trained_record", "trained_words"]

# Model keys that decide the generator's tensors and geometry: a warm start must agree on each.
# The head keys exist in MRNet only; bn and head_dropout may change (same tensors, other training).
_GENERATOR_KEYS = ("arch", "depth", "width", "num_classes", "stride_on")
_MRNET_HEAD_KEYS = ("head_width", "head_norm", "head_se")


@dataclasses.dataclass
class Nets:
    """The method's three networks by their checkpoint names: G, D and D_aux.

    d is the output-space adversary that adapt.adversary names: the paper's D (OutputDiscriminator)
    or MRNet's pair D1 + D2 (MRNetDiscriminators, one module, one optimizer); d_aux is the
    feature-space D_aux either way (trained only under DisMap weighting)."""
    g: nn.Module
    d: nn.Module
    d_aux: nn.Module

    NAMES = ("g", "d", "d_aux")

    def __iter__(self):
        return iter((self.g, self.d, self.d_aux))

    def items(self):
        return zip(self.NAMES, self)

    def state_dict(self) -> dict:
        """{"g": G's state_dict, "d": ..., "d_aux": ...}."""
        return {name: net.state_dict() for name, net in self.items()}

    def load_state_dict(self, state: dict, required=NAMES) -> None:
        """Load each network present in `state`; KeyError for a `required` one that is missing, and a
        RuntimeError that names the network when its weights do not fit."""
        for name, net in self.items():
            if name not in state:
                if name in required:
                    raise KeyError(name)
                continue
            try:
                net.load_state_dict(state[name])
            except RuntimeError as e:
                raise RuntimeError(f"{name}: {str(e).splitlines()[0][:200]}") from None


def _given(model_cfg, init: InitWeights | None) -> InitWeights | None:
    """The InitWeights the caller read; a ValueError where model.init_weights is set but was not read
    (engine.finalize reads it, once: no function here reads the file as a fallback)."""
    if init is None and model_cfg.init_weights:
        raise ValueError(f"model.init_weights {model_cfg.init_weights} was not read: pass its InitWeights "
                         "(read_init_weights, as engine.finalize does once per run)")
    return init


def paper_discriminators(model_cfg, feat_channels: int, kernels=None) -> tuple[nn.Module, nn.Module]:
    """The paper's D (AdaptSegNet's fully convolutional BCE D, model.disc_stride) and D_aux on the
    generator's `feat_channels` features, fresh; D_aux upsamples with kernels.upsample (ops.Kernels;
    None: "auto")."""
    return (OutputDiscriminator(model_cfg.num_classes, model_cfg.disc_width, model_cfg.disc_stride),
            FeatureDiscriminator(feat_channels, model_cfg.aux_disc_width,
                                 upsample=kernels.upsample if kernels is not None else None))


def build_networks(model_cfg, init: InitWeights | None = None, discriminators=paper_discriminators,
                   kernels=None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """ModelConfig -> (generator, output discriminator D, feature discriminator D_aux); D and D_aux from
    `discriminators(model_cfg, feat_channels, kernels)`: the paper's by default, an adversary's own
    (adversaries.get(adapt.adversary).discriminators) in training. kernels: the run's ops.Kernels
    (None: every op on "auto"), for the networks that call a fused op.

    `init`: model.init_weights as the caller read it (required when model.init_weights is set).
    stride_on "auto" is resolved here from it (resolve_model); a caller that saves the config should
    resolve it first (engine.finalize), so that the saved copy names the geometry it built.
    """
    init = _given(model_cfg, init)
    m = resolve_model(model_cfg, init)
    g = build_generator(m)
    if init is not None:
        load_init_weights(g, init)
    return (g, *discriminators(m, g.feat_channels, kernels))


def build_generator(model) -> DilatedResNet:
    """A ModelConfig, or the "model" dict of an exported generator.json, with stride_on resolved ->
    the generator with fresh weights (model.init_weights is not read: see build_networks)."""
    m = SimpleNamespace(**model) if isinstance(model, dict) else model
    if m.arch == "mrnet":
        return MRNet(m.num_classes, m.depth, m.width, m.bn, m.stride_on, m.head_width, m.head_norm,
                     m.head_se, m.head_dropout)
    if m.arch == "deeplabv2":
        return DeepLabV2(m.num_classes, m.depth, m.width, m.bn, m.stride_on)
    raise ValueError(f"model.arch must be 'mrnet' or 'deeplabv2'; got {m.arch!r}")


def resolve_model(model_cfg, init: InitWeights | None = None):
    """ModelConfig -> a copy with stride_on "auto" replaced by the geometry of model.init_weights
    (`init`: the file as the caller read it; required when model.init_weights is set).

    "Scale." or layer5/layer6 keys (DeepLab-v2, AdaptSegNet, MRNet) -> "1x1"; torchvision's
    resnet keys -> "3x3"; a warm start -> the stride_on it was trained with; no weights -> "1x1".
    An explicit "1x1"/"3x3" is kept as it is: load_init_weights refuses it if the file disagrees.
    A warm start whose generator keys (arch, depth, width, classes, stride, MRNet heads) differ
    from model_cfg's is refused with a ValueError listing them. The argument is not modified.
    """
    init = _given(model_cfg, init)
    if init is not None and init.model is not None:
        differ = generator_differences(init.model, model_cfg)
        if differ:
            listing = "; ".join(f"model.{k}: {old!r} there, {new!r} here" for k, (old, new) in differ.items())
            fix = " ".join(f"--model.{k}={json.dumps(old)}" for k, (old, _) in differ.items())
            raise ValueError(f"model.init_weights {init.path} holds a generator built with other model "
                             f"settings ({listing}); pass {fix} to warm-start from it, or give other "
                             "weights")
    if model_cfg.stride_on != "auto":
        return model_cfg
    return dataclasses.replace(model_cfg, stride_on=init.stride_on if init else "1x1")


def generator_differences(trained, model_cfg) -> dict[str, tuple]:
    """{key: (trained value, configured value)} for the generator keys where two ModelConfigs
    disagree; a configured stride_on "auto" agrees with any."""
    keys = _GENERATOR_KEYS + (_MRNET_HEAD_KEYS if trained.arch == model_cfg.arch == "mrnet" else ())
    return {k: (getattr(trained, k), getattr(model_cfg, k)) for k in keys
            if getattr(trained, k) != getattr(model_cfg, k)
            and not (k == "stride_on" and model_cfg.stride_on == "auto")}


