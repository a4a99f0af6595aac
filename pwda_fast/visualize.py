"""Pictures of a run: predictions in the Cityscapes palette, the paper's weighting maps, training curves.

    python -m pwda_fast.visualize --checkpoint FILE [--source-only FILE] [--images N | PATH ...] --out DIR
    python -m pwda_fast.visualize --curves RUN_DIR --out DIR

Per target image two PNGs: <name>_pred.png (image | ground truth | source-only | adapted, as in the
paper's Fig. 4) and <name>_maps.png (the three maps of Fig. 2: the generation-confidence map d of
eq. 3, the discrimination-confidence map sigmoid(D_aux), and the weight w of eq. 6 the run trained
with). `--curves` writes curves.png: every loss and the target mIoU over steps, from metrics.jsonl.
`--images N` takes the first N images of the checkpoint's target val set; paths of images from that
set get their ground truth, other images are shown without it. Drawn with PIL alone (no matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pwda_fast import checkpoint, config, evaluate, ops, reference
from pwda_fast.data import build_val
from pwda_fast.data.labels import IGNORE, colorize
from pwda_fast.data.loader import MEAN, STD, SegmentationDataset
from pwda_fast.models import build_networks

TITLE_H, GAP, BAR_H = 18, 4, 28  # pixels: panel title strip, space between panels, colour bar + labels
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)

# Nine evenly spaced samples of matplotlib's "viridis": perceptually uniform and readable in grey,
# so dark = low weight and bright = high weight whatever the display.
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                     (40, 174, 128), (94, 201, 98), (170, 220, 50), (253, 231, 37)], np.float32)


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 viridis, `lo` dark, `hi` bright (clipped outside)."""
    t = np.clip((np.asarray(values, np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    pos = t * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (pos - i)[..., None]
    return np.rint(_VIRIDIS[i] * (1 - frac) + _VIRIDIS[i + 1] * frac).astype(np.uint8)


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@dataclass
class Panel:
    """One picture in a row: (h, w, 3) uint8 RGB, a title, and for colour-mapped floats their range."""
    title: str
    rgb: np.ndarray
    value_range: tuple[float, float] | None = None


def compose(panels: list[Panel], zoom: int = 1) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Panels side by side, each under its title and, when it has a value range, over a colour bar.

    Every panel must have the same (h, w); each is enlarged `zoom` times by pixel repetition, so
    class colours stay exact. Returns the image and each panel's top-left corner (x, y).
    """
    h, w = panels[0].rgb.shape[:2]
    ph, pw = h * zoom, w * zoom
    bars = any(p.value_range for p in panels)
    canvas = Image.new("RGB", (len(panels) * pw + (len(panels) - 1) * GAP,
                               TITLE_H + ph + (BAR_H if bars else 0)), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    corners = []
    for k, panel in enumerate(panels):
        if panel.rgb.shape[:2] != (h, w):
            raise ValueError(f"panel {panel.title!r} is {panel.rgb.shape[:2]}, the first is {(h, w)}")
        x = k * (pw + GAP)
        draw.text((x + 2, 2), panel.title, fill=INK, font=font)
        canvas.paste(Image.fromarray(panel.rgb).resize((pw, ph), Image.NEAREST), (x, TITLE_H))
        corners.append((x, TITLE_H))
        if panel.value_range:
            lo, hi = panel.value_range
            ramp = colormap(np.linspace(lo, hi, pw)[None].repeat(8, 0), lo, hi)
            canvas.paste(Image.fromarray(ramp), (x, TITLE_H + ph + 2))
            draw.text((x, TITLE_H + ph + 11), f"{lo:g}", fill=INK, font=font)
            label = f"{hi:g}"
            draw.text((x + pw - draw.textlength(label, font=font), TITLE_H + ph + 11), label,
                      fill=INK, font=font)
    return canvas, corners


def auto_zoom(height: int) -> int:
    """Enlarge small images (the toy domains are 96 px high) to at least 192 px; never shrink."""
    return max(1, 192 // height)


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) network input -> (H, W, 3) uint8, undoing the loader's mean/std."""
    pixels = image.detach().cpu().float().numpy().transpose(1, 2, 0) * STD + MEAN
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def label_at(label: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h0, w0) trainIds at the label's stored resolution -> (H, W) uint8 at the image's (nearest)."""
    ids = Image.fromarray(label.cpu().numpy().astype(np.uint8))
    return np.asarray(ids.resize((size[1], size[0]), Image.NEAREST))


def load_networks(path: str | Path, device: torch.device):
    """A training checkpoint -> (G, D_aux, config), both networks in eval mode."""
    state = checkpoint.load(path)
    cfg = config.from_dict(state["config"])
    # The checkpoint holds every weight; the run's init file need not exist on this machine.
    cfg.model.init_weights = ""
    g, _, d_aux = build_networks(cfg.model)
    g.load_state_dict(state["g"])
    d_aux.load_state_dict(state["d_aux"])
    return g.to(device).eval(), d_aux.to(device).eval(), cfg


@torch.no_grad()
def weighting_maps(g, d_aux, image: torch.Tensor, adapt_cfg) -> dict[str, torch.Tensor]:
    """The maps of the paper's Fig. 2 for a batch of target images, as training computes them.

    image (N, 3, H, W) -> {"logits": (N, C, H, W) main-head logits upsampled to the image,
    "aux": (N, 1, H, W) D_aux logits of the layer4 features upsampled the same way,
    "gen": (N, H, W) d of eq. 3, "dis": (N, H, W) sigmoid(aux), "weight": (N, H, W) w of eq. 6}.
    The weight uses sigmoid(aux) only when the run trained with it (adapt.weighting = "gen+dis"),
    so it is exactly the map that weighted this run's adversarial loss.
    """
    size = tuple(image.shape[2:])
    _, main, feat = g(image)
    logits = reference.upsample_to(main.float(), size)
    aux = reference.upsample_to(d_aux(feat).float(), size)
    t, floor, mu = adapt_cfg.threshold, adapt_cfg.floor, adapt_cfg.mu
    weight = ops.pixel_weights(logits, aux if adapt_cfg.weighting == "gen+dis" else None,
                               threshold=t, floor=floor, mu=mu)
    return {"logits": logits, "aux": aux,
            "gen": reference.generation_confidence(logits, threshold=t, floor=floor),
            "dis": torch.sigmoid(aux[:, 0]), "weight": weight}


def map_panels(maps: dict[str, torch.Tensor], adapt_cfg, index: int = 0) -> list[Panel]:
    """Fig. 2's three panels for image `index` of `maps` (from weighting_maps)."""
    a = adapt_cfg
    gen, dis, weight = (maps[k][index].cpu().numpy() for k in ("gen", "dis", "weight"))
    if a.weighting == "gen+dis":
        w_title = f"w = (d + {a.mu:g}) * sigmoid(a)"
    else:
        w_title = f"w = d + {a.mu:g} ({'unused: ' if a.weighting == 'none' else ''}weighting={a.weighting})"
    dis_title = "sigmoid(D_aux)" + ("" if a.weighting == "gen+dis" else f" (untrained: {a.weighting})")
    return [Panel(f"d, eq. 3 (T={a.threshold:g})", colormap(gen, 0.0, 1.0), (0.0, 1.0)),
            Panel(dis_title, colormap(dis, 0.0, 1.0), (0.0, 1.0)),
            Panel(w_title, colormap(weight, 0.0, 1.0 + a.mu), (0.0, 1.0 + a.mu))]


def prediction_panels(image: torch.Tensor, label: np.ndarray | None, adapted: np.ndarray,
                      source_only: np.ndarray | None = None) -> list[Panel]:
    """image (3, H, W) normalised; label and predictions (H, W) trainIds -> Fig. 4's row."""
    panels = [Panel("target image", to_rgb(image))]
    if label is not None:
        panels.append(Panel("ground truth", colorize(label)))
    if source_only is not None:
        panels.append(Panel("source-only", colorize(source_only)))
    panels.append(Panel("adapted", colorize(adapted)))
    return panels


@torch.no_grad()
def predict_ids(g, image: torch.Tensor) -> np.ndarray:
    """image (N, 3, H, W) -> (N, H, W) uint8 trainIds of the main head at image resolution."""
    return evaluate.predict(g, image, tuple(image.shape[2:])).argmax(1).cpu().numpy().astype(np.uint8)


def target_images(cfg, images: list[str]) -> list[tuple[str, dict]]:
    """`--images` -> [(name, {"image": (3, H, W), "label": (h0, w0) int64 or None})].

    ["N"] picks the first N images of the target val set; paths are resized like that set's images
    and get their ground truth when they belong to it.
    """
    size = cfg.data.target_size
    if len(images) == 1 and images[0].isdigit():
        val = build_val(cfg.data)
        count = min(int(images[0]), len(val))
        return [(_name(val.pairs[i][0]), drop_empty_label(val[i])) for i in range(count)]
    try:
        val = build_val(cfg.data)
        known = {Path(img).resolve(): i for i, (img, _) in enumerate(val.pairs)}
    except (FileNotFoundError, ValueError):  # no val set on this machine: pictures without labels
        val, known = None, {}
    items = []
    for text in images:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--images: {path} is not a file (give image paths or a count)")
        index = known.get(path.resolve())
        item = val[index] if index is not None else SegmentationDataset([(path, None)], size=size,
                                                                        train=False)[0]
        items.append((_name(path), drop_empty_label(item)))
    return items


def _name(image: str | Path) -> str:
    """frankfurt_000000_000294_leftImg8bit.png -> frankfurt_000000_000294 (names of the output PNGs)."""
    return Path(image).stem.removesuffix("_leftImg8bit")


def drop_empty_label(item: dict) -> dict:
    """A dataset item whose label is all void (an image without ground truth) gets label None."""
    label = item["label"]
    return {"image": item["image"], "label": None if bool((label == IGNORE).all()) else label}


def render_image(g, d_aux, cfg, item: dict, source_only=None, zoom: int = 0):
    """One target image -> (prediction figure, maps figure, maps dict, adapted (H, W) trainIds).

    item: {"image": (3, H, W) normalised, "label": (h0, w0) trainIds or None}; zoom 0 = auto_zoom.
    """
    device = next(g.parameters()).device
    image = item["image"][None].to(device)
    size = tuple(image.shape[2:])
    maps = weighting_maps(g, d_aux, image, cfg.adapt)
    adapted = maps["logits"].argmax(1)[0].cpu().numpy().astype(np.uint8)
    label = label_at(item["label"], size) if item["label"] is not None else None
    source = predict_ids(source_only, image)[0] if source_only is not None else None
    zoom = zoom or auto_zoom(size[0])
    pred_fig, _ = compose(prediction_panels(item["image"], label, adapted, source), zoom)
    maps_fig, _ = compose(map_panels(maps, cfg.adapt), zoom)
    return pred_fig, maps_fig, maps, adapted


# --- training curves ---------------------------------------------------------------------------

LOSS_KEYS = ("seg", "adv", "adv_aux", "d", "d_aux", "mem")
CURVE_W, CURVE_H, MARGIN_L, MARGIN_B = 360, 200, 58, 22


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl -> (training lines, eval lines), each sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; --curves needs the run_dir of a pwda_fast.train run")
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    train = sorted((r for r in lines if not r.get("eval")), key=lambda r: r["step"])
    evals = sorted((r for r in lines if r.get("eval")), key=lambda r: r["step"])
    return train, evals


def _plot(draw: ImageDraw.ImageDraw, x0: int, y0: int, title: str, xs: list, ys: list,
          colour: tuple, font) -> None:
    """One line chart in the CURVE_W x CURVE_H box at (x0, y0): axes, min/max ticks, the polyline."""
    points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    draw.text((x0 + MARGIN_L, y0 + 2), title, fill=INK, font=font)
    left, right, top, bottom = x0 + MARGIN_L, x0 + CURVE_W - 10, y0 + 20, y0 + CURVE_H - MARGIN_B
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK)
    if not points:
        draw.text((left + 8, (top + bottom) // 2), "no finite values", fill=INK, font=font)
        return
    (x_lo, x_hi), (y_lo, y_hi) = ((min(v), max(v)) for v in zip(*points))
    if y_hi - y_lo < 1e-12:  # a flat series: centre it instead of dividing by zero
        y_lo, y_hi = y_lo - 0.5 * (abs(y_lo) or 1.0), y_hi + 0.5 * (abs(y_hi) or 1.0)
    x_span = (x_hi - x_lo) or 1

    def at(x, y):
        return (left + (x - x_lo) / x_span * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    # Enough significant digits that the three ticks differ (d_aux sits near 1.386 for long stretches).
    digits = 3 + max(0, math.ceil(math.log10(max(abs(y_lo), abs(y_hi)) / (y_hi - y_lo))))
    for value in (y_lo, (y_lo + y_hi) / 2, y_hi):
        _, py = at(x_lo, value)
        draw.line([(left - 3, py), (left, py)], fill=INK)
        text = f"{value:.{digits}g}"
        draw.text((left - 5 - draw.textlength(text, font=font), py - 6), text, fill=INK, font=font)
    for step in sorted({x_lo, x_hi}):
        px, _ = at(step, y_lo)
        text = str(step)
        draw.text((px - draw.textlength(text, font=font) / 2, bottom + 4), text, fill=INK, font=font)
    xy = [at(x, y) for x, y in points]
    if len(xy) > 1:
        draw.line(xy, fill=colour, width=2)
    for px, py in xy if len(xy) <= 30 else []:  # dots only where they stay readable
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)


def plot_curves(run_dir: str | Path, out: str | Path) -> Path:
    """metrics.jsonl of `run_dir` -> out/curves.png: one chart per loss and one of target mIoU."""
    train, evals = read_metrics(run_dir)
    charts = [(f"loss {k}", [r["step"] for r in train if k in r], [float(r[k]) for r in train if k in r])
              for k in LOSS_KEYS if any(k in r for r in train)]
    charts.append(("target mIoU (%)", [r["step"] for r in evals], [float(r["miou"]) for r in evals]))
    cols = 2
    rows = math.ceil(len(charts) / cols)
    canvas = Image.new("RGB", (cols * CURVE_W, rows * CURVE_H + 24), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    draw.text((6, 4), f"{run_dir}  (x: training step)", fill=INK, font=font)
    palette = [tuple(int(c) for c in _VIRIDIS[i]) for i in (0, 2, 4, 6, 1, 3, 5)]
    for k, (title, xs, ys) in enumerate(charts):
        r, c = divmod(k, cols)
        colour = (200, 30, 30) if title.startswith("target") else palette[k % len(palette)]
        _plot(draw, c * CURVE_W, 24 + r * CURVE_H, title, xs, ys, colour, font)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    canvas.save(out / "curves.png")
    return out / "curves.png"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwda_fast.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a ckpt_*.pt of an adapted run (holds G and D_aux)")
    parser.add_argument("--source-only", help="a ckpt_*.pt of a source-only run, shown beside it")
    parser.add_argument("--images", nargs="+", default=["4"],
                        help="a count N (the first N target-val images) or image paths (default 4)")
    parser.add_argument("--target-root", help="the target dataset's root, if not where the run had it")
    parser.add_argument("--zoom", type=int, default=0, help="pixel-repeat factor (0 = auto)")
    parser.add_argument("--curves", help="a run_dir: plot its metrics.jsonl to OUT/curves.png")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.curves:
        parser.error("give --checkpoint FILE (pictures) and/or --curves RUN_DIR (training curves)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.curves:
            print(f"wrote {plot_curves(args.curves, out)}")
        if args.checkpoint:
            g, d_aux, cfg = load_networks(args.checkpoint, device)
            if args.target_root:
                cfg.data.target_root, cfg.data.target_prepared = args.target_root, ""
            source = evaluate.load_generator(args.source_only, device)[0] if args.source_only else None
            for name, item in target_images(cfg, args.images):
                pred_fig, maps_fig, _, _ = render_image(g, d_aux, cfg, item, source, args.zoom)
                pred_fig.save(out / f"{name}_pred.png")
                maps_fig.save(out / f"{name}_maps.png")
                print(f"wrote {out / f'{name}_pred.png'} and {name}_maps.png")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
