"""Training curves from a run's metrics.jsonl: one chart per loss and one of the target mIoU (PIL only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from pwda_fast.pictures import BACKGROUND, INK, VIRIDIS, load_font

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
    draw, font = ImageDraw.Draw(canvas), load_font()
    draw.text((6, 4), f"{run_dir}  (x: training step)", fill=INK, font=font)
    palette = [tuple(int(c) for c in VIRIDIS[i]) for i in (0, 2, 4, 6, 1, 3, 5)]
    for k, (title, xs, ys) in enumerate(charts):
        r, c = divmod(k, cols)
        colour = (200, 30, 30) if title.startswith("target") else palette[k % len(palette)]
        _plot(draw, c * CURVE_W, 24 + r * CURVE_H, title, xs, ys, colour, font)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    canvas.save(out / "curves.png")
    return out / "curves.png"




def plot_rows(charts: list[tuple[str, dict[str, dict[int, list[float]]]]], out: str | Path,
              title: str) -> Path:
    """Rows of a study over training -> out (PNG): one chart per (chart title, {row: {step: [value
    per seed]}}), each row's mean over seeds as a line over its min-max band, with a legend."""
    width, height, left, right, top, bottom = 560, 260, 58, 12, 24, 26
    rows = list(dict.fromkeys(row for _, series in charts for row in series))
    last = len(VIRIDIS) - 2  # the last, yellow entry is hard to see on white
    palette = {row: tuple(int(c) for c in VIRIDIS[round(i * last / max(len(rows) - 1, 1))])
               for i, row in enumerate(rows)}
    legend_h = 16 * len(rows) + 8
    canvas = Image.new("RGBA", (width, 24 + len(charts) * height + legend_h), BACKGROUND + (255,))
    font = load_font()
    ImageDraw.Draw(canvas).text((6, 4), title, fill=INK, font=font)
    for k, (chart_title, series) in enumerate(charts):
        y0 = 24 + k * height
        x_lo, x_hi = min(min(s) for s in series.values()), max(max(s) for s in series.values())
        values = [v for s in series.values() for vs in s.values() for v in vs]
        y_lo, y_hi = min(values), max(values)
        y_hi = y_hi if y_hi > y_lo else y_lo + 1.0

        def at(x, y, y0=y0, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo, y_hi=y_hi):
            return (left + (x - x_lo) / ((x_hi - x_lo) or 1) * (width - left - right),
                    y0 + height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

        bands = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        band_draw = ImageDraw.Draw(bands)
        for row, s in series.items():
            steps = sorted(s)
            if len(steps) > 1:
                band = [at(x, min(s[x])) for x in steps] + [at(x, max(s[x])) for x in reversed(steps)]
                band_draw.polygon(band, fill=palette[row] + (60,))
        canvas.alpha_composite(bands)
        draw = ImageDraw.Draw(canvas)
        draw.text((left, y0 + 4), chart_title, fill=INK, font=font)
        axis_bottom = y0 + height - bottom
        draw.line([(left, y0 + top), (left, axis_bottom), (width - right, axis_bottom)], fill=INK)
        for value in (y_lo, (y_lo + y_hi) / 2, y_hi):
            text = f"{value:.3g}"
            _, py = at(x_lo, value)
            draw.text((left - 5 - draw.textlength(text, font=font), py - 6), text, fill=INK, font=font)
        for step in (x_lo, x_hi):
            px, py = at(step, y_lo)
            text = str(step)
            draw.text((px - draw.textlength(text, font=font) / 2, py + 4), text, fill=INK, font=font)
        for row, s in series.items():
            steps = sorted(s)
            line = [at(x, sum(s[x]) / len(s[x])) for x in steps]
            if len(line) > 1:
                draw.line(line, fill=palette[row], width=2)
            for px, py in line:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=palette[row])
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = 24 + len(charts) * height + 4 + 16 * i
        draw.rectangle([left, y + 3, left + 14, y + 11], fill=palette[row])
        draw.text((left + 20, y), row, fill=INK, font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(out)
    return out
