"""Export a trained generator for inference without pwda_fast's training code.

    pwda-export --checkpoint runs/gta5_to_cityscapes/best.pt --out exported/
    pwda-export --checkpoint FILE --out DIR --format onnx          # needs the export extra

The checkpoint is any ckpt_*.pt of a run, or its best.pt. Both formats write DIR/generator.json: the
model config that rebuilds the network (pwda_fast.models.build_generator), the 19 Cityscapes class
names and colours, the input normalisation, the output stride, which output is the prediction, and
how the generator was trained.

- state_dict: DIR/generator.pt, the generator's tensors and nothing else (loads with weights_only=True;
  also a model.init_weights for a warm start). generator(x) -> (aux, main, features) at output stride
  8; the prediction is the main head's logits upsampled to the input size (bilinear,
  align_corners=True), as pwda-evaluate's single protocol scores it.
- onnx: DIR/generator.onnx, input "image" (N, 3, H, W) float32 normalised as generator.json says, any
  N, H, W; output "logits" (N, 19, H, W): that prediction, already upsampled (argmax over dim 1 gives
  trainIds). Before the command returns, onnxruntime runs it on CPU at two sizes against torch.

Exit codes: 0 done, 1 the ONNX check failed, 2 a missing or unusable checkpoint or missing packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pwda_fast import checkpoint, config, models
from pwda_fast.data import normalization
from pwda_fast.data.labels import CLASSES, IGNORE, PALETTE

FORMATS = ("state_dict", "onnx")
OUTPUT_STRIDE = 8  # the dilated ResNet's: 512x1024 -> 65x129 (ceil-mode max-pool)
# The ONNX check's bound on max |onnxruntime - torch|: this fraction of the largest |logit|, plus
# ONNX_FLOOR for logits near 0. fp32 kernels that sum in another order differ by about 2e-6 of the
# logit scale (toy MRNet: 6.7e-8 at logits up to 0.03).
ONNX_TOLERANCE, ONNX_FLOOR = 1e-4, 1e-6
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(RuntimeError):
    """A checkpoint or environment the export cannot use; the message says what to do."""


class OnnxMismatch(ExportError):
    """The ONNX file's logits differ from torch's by more than ONNX_TOLERANCE allows."""


class Prediction(nn.Module):
    """image (N, 3, H, W) normalised -> the main head's logits (N, K, H, W), upsampled to the image
    size bilinearly with align_corners=True (pwda_fast.inference.predict, fp32)."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        _, main, _ = self.g(image)
        return F.interpolate(main, size=image.shape[-2:], mode="bilinear", align_corners=True)


def load_generator(path: str | Path) -> tuple[nn.Module, config.Config, dict]:
    """A training checkpoint or best.pt -> (generator in eval mode on CPU, its config, the file's
    {"step", "best"} entries). ExportError for a missing file or one that is not a pwda_fast checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--checkpoint {path} does not exist; give a ckpt_*.pt or best.pt of a run folder")
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    if not isinstance(state, dict) or "g" not in state or "config" not in state:
        raise ExportError(f"{path} is not a pwda_fast training checkpoint (no generator 'g' and 'config' "
                          "in it); give a ckpt_*.pt or best.pt written by pwda-train")
    try:
        nets, cfg = checkpoint.networks_from_state(state, torch.device("cpu"))
    except (ValueError, RuntimeError) as e:  # ConfigError is a ValueError
        raise ExportError(f"{path}: its generator cannot be rebuilt by this version "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return nets.g, cfg, {"step": state.get("step", 0), "best": state.get("best", {})}


def description(cfg: config.Config, info: dict, fmt: str) -> dict:
    """generator.json: everything needed to rebuild, feed and read the exported generator."""
    norm = normalization.get(cfg.data.normalize)
    order = "BGR" if norm.bgr else "RGB"
    if fmt == "onnx":
        outputs = {"file": "generator.onnx",
                   "input": "image: (N, 3, H, W) float32, normalised as 'input' says",
                   "output": "logits: (N, num_classes, H, W) float32, the main head's logits upsampled "
                             "to the input size (bilinear, align_corners=True); argmax over dim 1 = trainId"}
    else:
        outputs = {"file": "generator.pt",
                   "forward": "generator(x) -> (aux, main, features): aux and main logits "
                              "(N, num_classes, h, w) at the output stride, features (N, C, h, w) of the "
                              "last layer",
                   "prediction": "main: upsample its logits to the input size (bilinear, "
                                 "align_corners=True), argmax over dim 1 = trainId",
                   "fused": "MRNet's protocol scores softmax(0.5 * aux + main) summed over scales 1 and "
                            "1.25 and horizontal flips"}
    return {
        "format": models.EXPORT_FORMAT,
        "version": models.EXPORT_VERSION,
        "model": {**dataclasses.asdict(cfg.model), "init_weights": ""},
        "num_classes": cfg.model.num_classes,
        "classes": list(CLASSES),
        "palette": PALETTE.tolist(),
        "ignore_index": IGNORE,
        "input": {"normalization": norm.name, "channel_order": order, "pixel_range": [0, 255],
                  "mean": list(norm.mean), "std": list(norm.std),
                  "formula": f"x = (pixels_{order} - mean) / std per channel, pixels in 0-255, "
                             "then (N, 3, H, W) float32",
                  "trained_size": {"width": cfg.data.target_size[0], "height": cfg.data.target_size[1]},
                  "interpolation": cfg.data.interpolation},
        "output_stride": OUTPUT_STRIDE,
        "outputs": outputs,
        "trained": models.trained_record(cfg, info["step"], info["best"].get("miou")),
    }


def normalised_images(cfg: config.Config, n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) float32: random 0-255 pixels normalised as the generator was trained."""
    rgb = np.random.default_rng(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)
    return torch.from_numpy(normalization.apply(rgb, cfg.data.normalize)).permute(0, 3, 1, 2).contiguous()


def export_onnx(g: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Prediction(g) -> ONNX at `path` (one file), dynamic batch, height and width.

    torch.onnx's torch.export-based exporter (its default since torch 2.9; needs onnxscript).
    """
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    # The exporter warns once per torchvision op it cannot register when torchvision is absent;
    # the generator uses none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    program = torch.onnx.export(Prediction(g).eval(), (example,), dynamo=True, input_names=["image"],
                                output_names=["logits"], dynamic_shapes=(dims,), verbose=False)
    program.save(str(path), external_data=False)


def check_onnx(g: nn.Module, path: Path, images: list[torch.Tensor]) -> list[dict]:
    """onnxruntime (CPU) vs torch on each image batch -> [{"shape", "max_diff", "bound", "ok"}]:
    ok when max |diff| <= bound = ONNX_TOLERANCE * largest |torch logit| + ONNX_FLOOR."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model, checks = Prediction(g).eval(), []
    for x in images:
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"image": x.numpy()})[0]
        if got.shape != expected.shape:
            checks.append({"shape": list(x.shape), "max_diff": float("inf"), "bound": 0.0, "ok": False})
            continue
        diff = float(np.abs(got - expected).max())
        bound = ONNX_TOLERANCE * float(np.abs(expected).max()) + ONNX_FLOOR
        checks.append({"shape": list(x.shape), "max_diff": diff, "bound": bound, "ok": diff <= bound})
    return checks


def check_sizes(cfg: config.Config) -> list[tuple[int, int, int]]:
    """(N, H, W) of the two ONNX checks: the val size at batch 2, and an odd smaller size at batch 1."""
    w, h = cfg.data.target_size
    return [(2, h, w), (1, h * 3 // 4 + 1, w * 3 // 4 + 3)]


def export(checkpoint_path: str | Path, out: str | Path, fmt: str = "state_dict", log=print) -> list[Path]:
    """Write the export of `fmt` into `out` -> the files written. ExportError: unusable checkpoint or
    missing packages; OnnxMismatch when the onnxruntime check of "onnx" fails."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx":
        missing = [m for m in _ONNX_PACKAGES if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install 'pwda_fast[export]' "
                              f"(or pip install {' '.join(missing)})")
    g, cfg, info = load_generator(checkpoint_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        weights = out / "generator.pt"
        torch.save(dict(g.state_dict()), weights)
    else:
        weights = out / "generator.onnx"
        h, w = check_sizes(cfg)[0][1:]
        export_onnx(g, weights, normalised_images(cfg, 2, h, w))
        images = [normalised_images(cfg, *size, seed=i + 1) for i, size in enumerate(check_sizes(cfg))]
        checks = check_onnx(g, weights, images)
        for c in checks:
            log(f"onnx check (onnxruntime vs torch, CPU) at {'x'.join(map(str, c['shape']))}: max |diff| "
                f"{c['max_diff']:.2e}, bound {c['bound']:.2e} ({ONNX_TOLERANCE:g} of the largest logit): "
                f"{'ok' if c['ok'] else 'FAILED'}")
        if not all(c["ok"] for c in checks):
            raise OnnxMismatch(f"{weights} does not reproduce the torch generator (see the checks above); "
                              "it is kept for inspection, do not use it")
    meta = description(cfg, info, fmt)
    described = out / "generator.json"
    described.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {weights} and {described.name} ({cfg.model.arch}-{cfg.model.depth}, "
        f"{models.trained_words(meta['trained'])}, {meta['input']['normalization']} inputs)")
    return [weights, described]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pwda-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a ckpt_*.pt or best.pt written by pwda-train")
    parser.add_argument("--out", required=True, help="output folder (created; files in it are replaced)")
    parser.add_argument("--format", choices=FORMATS, default="state_dict",
                        help="state_dict (generator.pt) or onnx (generator.onnx); both add generator.json "
                             "(default state_dict)")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.format)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, OnnxMismatch) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
