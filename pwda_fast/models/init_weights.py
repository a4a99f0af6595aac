"""model.init_weights, read once: published weights (ImageNet, DeepLab-v2, AdaptSegNet, MRNet), or a
warm start from a pwda_fast training checkpoint (ckpt_*.pt, best.pt) or exported generator (generator.pt
with its generator.json, written by pwda_fast.export); and loading them into a generator by name.

engine.build reads the file once (read_init_weights) and hands the InitWeights to resolve_model and
build_networks: a ~170 MB file is not read again for each question asked of it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pwda_fast import config, tensorfile
from pwda_fast.models.backbone import DilatedResNet

# Published heads that are not ours to load when the class count differs (ImageNet fc, VOC/COCO heads).
_HEAD_KEYS = ("fc.", "layer5.", "layer6.", "aux_head.", "main_head.")
# Where each weights layout puts a bottleneck's stride.
_STRIDE_OF_LAYOUT = {"caffe": "1x1", "torchvision": "3x3"}
# The input normalisation each published layout was trained with (pwda_fast.data.normalization).
_NORMALIZE_OF_LAYOUT = {"caffe": "caffe", "torchvision": "imagenet"}
_LAYOUT_WORDS = {"caffe": "the Caffe / DeepLab-v2 layout (stride on the bottleneck's 1x1 conv)",
                 "torchvision": "torchvision's layout (stride on the bottleneck's 3x3 conv)"}
# generator.json's "format" and the newest "version" this code reads (pwda_fast.export writes them).
EXPORT_FORMAT = "pwda_fast.generator"
EXPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InitWeights:
    """A model.init_weights file as read (weights_only): the generator's tensors and what the file
    says about how they were trained."""
    path: Path
    state: dict[str, torch.Tensor]
    """Tensors by the file's key names (published layouts are renamed when loaded: _our_name)."""
    layout: str | None
    """"caffe" or "torchvision" (published weights, told by their keys), "pwda" (a pwda_fast
    checkpoint or exported generator: a warm start), None (keys that say neither)."""
    model: config.ModelConfig | None = None
    """"pwda": the model section the generator was built with (stride_on resolved)."""
    trained_normalize: str | None = None
    """"pwda": the data.normalize it was trained with."""
    trained: dict | None = None
    """"pwda": trained_record of its run (steps, domains, mode, weighting, mIoU when known)."""

    @property
    def stride_on(self) -> str:
        if self.model is not None:
            return self.model.stride_on
        return _STRIDE_OF_LAYOUT[self._known_layout()]

    @property
    def normalize(self) -> str:
        """"caffe" | "imagenet": the input normalisation these weights expect."""
        if self.trained_normalize is not None:
            return self.trained_normalize
        return _NORMALIZE_OF_LAYOUT[self._known_layout()]

    def _known_layout(self) -> str:
        if self.layout is None:
            raise ValueError(f"model.init_weights {self.path}: cannot tell its layout from its keys (no "
                             "'Scale.' prefix, no layer5/layer6 heads, no torchvision 'fc'; an exported "
                             "generator.pt needs its generator.json beside it); set model.stride_on "
                             "('1x1' Caffe, '3x3' torchvision) and data.normalize ('caffe' or "
                             "'imagenet') explicitly")
        return self.layout


def trained_record(cfg: config.Config, steps: int, miou: float | None = None) -> dict:
    """How a generator was trained, in a few words: {"steps", "source", "target", "mode",
    "weighting", "miou"} (miou None when not known)."""
    return {"steps": steps, "source": cfg.data.source, "target": cfg.data.target,
            "mode": cfg.adapt.mode, "weighting": cfg.adapt.weighting, "miou": miou}


def trained_words(record: dict) -> str:
    """A trained_record -> "trained 600 steps, adapt (gen+dis), toy -> toy, target mIoU 41.20"."""
    r = record
    what = f"{r.get('mode')} ({r.get('weighting')})" if r.get("mode") == "adapt" else r.get("mode")
    miou = f", target mIoU {r['miou']:.2f}" if r.get("miou") is not None else ""
    return f"trained {r.get('steps')} steps, {what}, {r.get('source')} -> {r.get('target')}{miou}"


def weights_layout(path: str | Path) -> str | None:
    """Initial-weights file -> "caffe" | "torchvision" | "pwda"; None when there is no file ("").

    "caffe": DeepLab-v2 "Scale." keys, or AdaptSegNet / MRNet checkpoints (heads named layer5,
    layer6); these expect BGR 0-255 mean-subtracted inputs and stride on the 1x1 conv.
    "torchvision": plain resnet keys with the ImageNet "fc" (RGB / 255, ImageNet mean and std;
    stride on the 3x3 conv). "pwda": a pwda_fast checkpoint or exported generator, which names its
    own geometry and normalisation. A file whose keys say neither is refused with what to set instead.
    """
    if not path:
        return None
    init = read_init_weights(path)
    init._known_layout()
    return init.layout


def read_init_weights(path: str | Path) -> InitWeights:
    """Read a model.init_weights file (never unpickling code: weights_only) -> InitWeights.

    Accepts a .pth of tensors (optionally under "state_dict"), a pwda_fast training checkpoint
    ({"g", "config", "step", ...}: only "g" is kept) or an exported generator.pt whose generator.json
    lies beside it. Missing file: FileNotFoundError; unreadable one: ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_weights: {path} does not exist; give a local .pth file "
                                "(torchvision ResNet or DeepLab-v2 'Scale.' layout, or a pwda_fast "
                                "checkpoint or exported generator.pt)")
    return _read(path)


def _read(path: Path) -> InitWeights:
    obj = tensorfile.load(path, what=f"model.init_weights {path}", kind="PyTorch weights file",
                          error=ValueError, refused="give a file of tensors only: a state_dict, as "
                          "torch.save(model.state_dict(), F) writes it, not a whole pickled model")
    if not isinstance(obj, dict):
        raise ValueError(f"model.init_weights {path}: holds a {type(obj).__name__}, not a dict of tensors")
    if "g" in obj and "config" in obj:  # a pwda_fast training checkpoint (ckpt_*.pt, best.pt)
        try:
            cfg = config.from_dict(obj["config"])
        except (config.ConfigError, AttributeError) as e:
            raise ValueError(f"model.init_weights {path}: a pwda_fast checkpoint whose config this "
                             f"version cannot read ({e})") from None
        miou = obj.get("best", {}).get("miou")
        return InitWeights(path, obj["g"], "pwda", cfg.model, cfg.data.normalize,
                           trained_record(cfg, obj.get("step", 0), miou))
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    layout = _layout_of(obj)
    return (_exported(path, obj) if layout is None else None) or InitWeights(path, obj, layout)


def _exported(path: Path, state: dict) -> InitWeights | None:
    """An exported generator.pt and the generator.json beside it (pwda_fast.export) -> InitWeights
    (a warm start); None when no JSON of that format lies beside it."""
    described = path.with_suffix(".json")
    try:
        meta = json.loads(described.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        return None
    try:
        if meta.get("version", 0) > EXPORT_VERSION:
            raise ValueError(f"format version {meta['version']} is newer than this pwda_fast reads "
                             f"({EXPORT_VERSION}); upgrade pwda_fast")
        model = config.from_dict({"model": meta["model"]}).model
        normalize, trained = meta["input"]["normalization"], meta["trained"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"model.init_weights {path}: {described.name} beside it does not describe "
                         f"this generator ({why}); export it again with pwda-export") from None
    return InitWeights(path, state, "pwda", model, normalize, trained)


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


def load_init_weights(model: DilatedResNet, weights: InitWeights | str | Path) -> dict[str, list[str]]:
    """Load initial weights (as read by read_init_weights, or a file to read) into DeepLabV2 or MRNet
    by name.

    Published weights (ImageNet / DeepLab / AdaptSegNet / MRNet): every backbone tensor must be
    present with the right shape; heads (fc, VOC/COCO classifiers, another generator's heads) load
    only where names and shapes fit. A warm start (pwda_fast checkpoint or exported generator) loads
    every tensor, heads included, or is refused. A file whose geometry puts the stride elsewhere
    than model.stride_on is refused. Returns {"loaded": [...], "skipped": [...]}.
    """
    init = weights if isinstance(weights, InitWeights) else read_init_weights(weights)
    path = init.path
    if init.layout is not None and init.stride_on != model.stride_on:
        where = (_LAYOUT_WORDS[init.layout] if init.layout in _LAYOUT_WORDS
                 else f"a generator trained with stride_on = \"{init.stride_on}\"")
        raise ValueError(f"model.init_weights {path} is in {where}, but the config "
                         f"sets model.stride_on = \"{model.stride_on}\"; set model.stride_on = "
                         f"\"{init.stride_on}\" (or \"auto\") to build the geometry these weights were "
                         "trained in")
    if init.layout == "pwda":
        try:
            model.load_state_dict(init.state)
        except RuntimeError as e:  # torch lists every missing, unexpected and misshapen tensor
            why = "; ".join(ln.strip() for ln in str(e).splitlines()[1:])
            raise ValueError(f"model.init_weights {path} does not fit {type(model).__name__} of the "
                             f"config: {why[:300]}") from None
        return {"loaded": sorted(init.state), "skipped": []}
    ours = model.state_dict()
    loaded, skipped, unexpected, mismatched = {}, [], [], []
    for key, value in init.state.items():
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
