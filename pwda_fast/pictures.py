"""Pictures of predictions and of the paper's weighting maps, drawn with PIL alone (no matplotlib).

compose() lays out Panels (an RGB array, a title, a colour bar for floats); the maps of the paper's
Fig. 2 come from weighting.target_maps, as training computes them; render_image() draws one target
image's prediction row (Fig. 4) and maps row; training_figures() gives TensorBoard its pictures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pwda_fast import inference, weighting
from pwda_fast.data import normalization
from pwda_fast.data.labels import IGNORE, colorize

TITLE_H, GAP, BAR_H = 18, 4, 28  # pixels: panel title strip, space between panels, colour bar + labels
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)

# Nine evenly spaced samples of matplotlib's "viridis": perceptually uniform and readable in grey,
# so dark = low weight and bright = high weight whatever the display.
VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                     (40, 174, 128), (94, 201, 98), (170, 220, 50), (253, 231, 37)], np.float32)


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8 viridis, `lo` dark, `hi` bright (clipped outside)."""
    t = np.clip((np.asarray(values, np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    pos = t * (len(VIRIDIS) - 1)
    i = np.minimum(pos.astype(np.int64), len(VIRIDIS) - 2)
    frac = (pos - i)[..., None]
    return np.rint(VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac).astype(np.uint8)


def load_font(size: int = 12) -> ImageFont.ImageFont:
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
    draw, font = ImageDraw.Draw(canvas), load_font()
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


def to_rgb(image: torch.Tensor, normalize: str) -> np.ndarray:
    """A (3, H, W) network input normalised by `normalize` (the run's data.normalize) -> (H, W, 3)
    uint8 RGB: a "caffe" input is BGR, so undoing the wrong normalisation would swap red and blue."""
    pixels = normalization.undo(image.detach().cpu().float().numpy().transpose(1, 2, 0), normalize)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def label_at(label: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h0, w0) trainIds at the label's stored resolution -> (H, W) uint8 at the image's (nearest)."""
    ids = Image.fromarray(label.cpu().numpy().astype(np.uint8))
    return np.asarray(ids.resize((size[1], size[0]), Image.NEAREST))


def map_panels(maps: dict[str, torch.Tensor], adapt_cfg, index: int = 0) -> list[Panel]:
    """Fig. 2's three panels for image `index` of `maps` (from weighting.target_maps)."""
    a = adapt_cfg
    gen, dis, weight = (maps[k][index].cpu().numpy() for k in ("gen", "dis", "weight"))
    if weighting.uses_dis(a):
        w_title = f"w = (d + {a.mu:g}) * sigmoid(a)"
    else:
        w_title = f"w = d + {a.mu:g} ({'unused: ' if a.weighting == 'none' else ''}weighting={a.weighting})"
    dis_title = "sigmoid(D_aux)" + ("" if weighting.uses_dis(a) else f" (not in w: {a.weighting})"
                                    if weighting.trains_aux(a) else f" (untrained: {a.weighting})")
    return [Panel(f"d, eq. 3 (T={a.threshold:g})", colormap(gen, 0.0, 1.0), (0.0, 1.0)),
            Panel(dis_title, colormap(dis, 0.0, 1.0), (0.0, 1.0)),
            Panel(w_title, colormap(weight, 0.0, 1.0 + a.mu), (0.0, 1.0 + a.mu))]


def prediction_panels(image: torch.Tensor, label: np.ndarray | None, adapted: np.ndarray,
                      source_only: np.ndarray | None = None, *, normalize: str) -> list[Panel]:
    """image (3, H, W) normalised by `normalize`; label and predictions (H, W) trainIds -> Fig. 4's row."""
    panels = [Panel("target image", to_rgb(image, normalize))]
    if label is not None:
        panels.append(Panel("ground truth", colorize(label)))
    if source_only is not None:
        panels.append(Panel("source-only", colorize(source_only)))
    panels.append(Panel("adapted", colorize(adapted)))
    return panels


@torch.no_grad()
def predict_ids(g, image: torch.Tensor) -> np.ndarray:
    """image (N, 3, H, W) -> (N, H, W) uint8 trainIds of the main head at image resolution."""
    return inference.predict(g, image, tuple(image.shape[2:])).argmax(1).cpu().numpy().astype(np.uint8)


def drop_empty_label(item: dict) -> dict:
    """A dataset item whose label is all void (an image without ground truth) gets label None."""
    label = item["label"]
    return {"image": item["image"], "label": None if bool((label == IGNORE).all()) else label}


def render_image(g, d_aux, adapt_cfg, item: dict, source_only=None, zoom: int = 0, *, normalize: str,
                 batch_with=()):
    """One target image -> (prediction figure, maps figure, maps dict, adapted (H, W) trainIds).

    item: {"image": (3, H, W) normalised by `normalize` (the run's data.normalize), "label": (h0, w0)
    trainIds or None}; zoom 0 = auto_zoom. The predictions are the networks' in eval mode (what
    evaluation scores); the maps are the image's in a batch with the (3, H, W) images `batch_with`, as
    training weights a batch (weighting.target_maps; with none, a batch of one).
    """
    device = next(g.parameters()).device
    image = item["image"][None].to(device)
    size = tuple(image.shape[2:])
    others = [x[None].to(device) for x in batch_with if x.shape == item["image"].shape]
    maps = weighting.target_maps(g, d_aux, torch.cat([image, *others]), adapt_cfg)
    maps = {k: v[:1] for k, v in maps.items()}
    adapted = predict_ids(g, image)[0]
    label = label_at(item["label"], size) if item["label"] is not None else None
    source = predict_ids(source_only, image)[0] if source_only is not None else None
    zoom = zoom or auto_zoom(size[0])
    panels = prediction_panels(item["image"], label, adapted, source, normalize=normalize)
    pred_fig, _ = compose(panels, zoom)
    maps_fig, _ = compose(map_panels(maps, adapt_cfg), zoom)
    return pred_fig, maps_fig, maps, adapted


def training_figures(g, d_aux, val_dataset, adapt_cfg, count: int, batch: int = 1) -> dict[str, np.ndarray]:
    """Prediction and weighting-map pictures of the first `count` target-val images, keyed by
    TensorBoard tag; g and d_aux are the bare networks, their train/eval modes are restored. Each
    image's maps come from a batch of `batch` images (it and the val images after it), as training's.
    val_dataset: a SegmentationDataset, whose normalisation the pictures undo."""
    modes = (g.training, d_aux.training)
    g.eval()
    d_aux.eval()
    figures = {}
    try:
        for i in range(min(count, len(val_dataset))):
            others = [val_dataset[j]["image"] for j in range(i + 1, min(i + batch, len(val_dataset)))]
            pred_fig, maps_fig, _, _ = render_image(g, d_aux, adapt_cfg, drop_empty_label(val_dataset[i]),
                                                    normalize=val_dataset.normalize, batch_with=others)
            figures[f"target_{i}/prediction"] = np.asarray(pred_fig)
            figures[f"target_{i}/weighting_maps"] = np.asarray(maps_fig)
    finally:
        g.train(modes[0])
        d_aux.train(modes[1])
    return figures
