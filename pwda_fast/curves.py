"""Training curves as matplotlib charts (the `plots` extra: pip install 'pwda_fast[plots]').

plot_curves: one chart per loss and one of the target mIoU of a run, from its metrics.jsonl (as
run_folder.RunFolder reads it: this module only draws).
plot_rows: rows of a study over training, each row's mean over seeds over its min-max band.

Drawn on matplotlib's Agg canvas (no screen, and pyplot's global state is left alone); each figure is
built by a *_figure function that returns it unsaved, so what it plots can be inspected.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from pwda_fast.run_folder import RunFolder

LOSS_KEYS = ("seg", "adv", "adv_aux", "d", "d_aux", "mem")
PLOTS_INSTALL = "pip install 'pwda_fast[plots]'"
DPI = 100
TITLE_H = 40  # pixels above the charts for the figure's title
CURVE_W, CURVE_H = 480, 300  # one chart of plot_curves, in pixels (two per line)
ROWS_W, ROWS_CHART_H, LEGEND_LINE_H = 720, 340, 22  # plot_rows: width, one chart, one legend line
BAND_ALPHA = 0.18  # min-max bands: translucent, so overlapping rows stay visible
GRID = {"color": "0.85", "linewidth": 0.6}  # a light grid under the data
TARGET_COLOUR = "tab:red"  # target mIoU; the losses take tab10's other colours


class PlotsError(RuntimeError):
    """matplotlib, which draws the charts, is not installed."""


def _matplotlib() -> SimpleNamespace:
    """The few matplotlib names the charts use, or a PlotsError that names the extra to install."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import to_rgb
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise PlotsError(f"training curves need matplotlib: {PLOTS_INSTALL} (or pip install matplotlib) "
                         f"(import error: {e})") from None
    return SimpleNamespace(Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, MaxNLocator=MaxNLocator,
                           tab10=colormaps["tab10"].colors, to_rgb=to_rgb)


def require_matplotlib() -> None:
    """Raise PlotsError now (e.g. before a long study) if the charts could not be drawn later."""
    _matplotlib()


def _figure(width: int, height: int, title: str):
    """An empty Agg-backed figure of width x height pixels with constrained layout and a title."""
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    return fig


def _style(ax, title: str, ylabel: str) -> None:
    """Title, labelled axes, a light grid behind the data, integer steps, plain y tick values."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, **GRID)
    ax.set_axisbelow(True)
    ax.xaxis.set_major_locator(_matplotlib().MaxNLocator(nbins="auto", integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)  # 1.3855, 1.3860, not +1.386 and 0.0005
    ax.tick_params(labelsize=8)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    return out


def curve_charts(run_dir: str | Path) -> list[tuple[str, str, list[int], list[float]]]:
    """(title, y label, steps, values) per chart of plot_curves: each logged loss, then target mIoU.
    Non-finite values (a skipped step's NaN loss) are left out."""
    train, evals = RunFolder(run_dir).read_metrics()
    series = [(f"loss {k}", "loss", train, k) for k in LOSS_KEYS if any(k in r for r in train)]
    series.append(("target mIoU (%)", "mIoU (%)", evals, "miou"))
    charts = []
    for title, ylabel, lines, key in series:
        points = [(r["step"], float(r[key])) for r in lines if key in r and math.isfinite(float(r[key]))]
        charts.append((title, ylabel, [x for x, _ in points], [y for _, y in points]))
    return charts


def curves_figure(run_dir: str | Path):
    """The figure plot_curves saves: two charts per line, CURVE_W x CURVE_H pixels each, below a title."""
    charts = curve_charts(run_dir)
    cols, rows = 2, math.ceil(len(charts) / 2)
    fig = _figure(cols * CURVE_W, rows * CURVE_H + TITLE_H, str(run_dir))
    mpl = _matplotlib()
    colours = [c for c in mpl.tab10 if c != mpl.to_rgb(TARGET_COLOUR)]
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for k, (ax, (title, ylabel, xs, ys)) in enumerate(zip(axes, charts)):
        _style(ax, title, ylabel)
        if not xs:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            continue
        colour = TARGET_COLOUR if title.startswith("target") else colours[k % len(colours)]
        ax.plot(xs, ys, color=colour, linewidth=1.6, marker="o" if len(xs) <= 30 else None, markersize=3)
    for ax in axes[len(charts):]:
        ax.set_visible(False)
    return fig


def plot_curves(run_dir: str | Path, out: str | Path) -> Path:
    """metrics.jsonl of `run_dir` -> out/curves.png: one chart per loss and one of target mIoU."""
    return _save(curves_figure(run_dir), Path(out) / "curves.png")


def rows_figure(charts: list[tuple[str, dict[str, dict[int, list[float]]]]], title: str):
    """The figure plot_rows saves: one chart per (chart title, {row: {step: [value per seed]}}) of
    ROWS_W x ROWS_CHART_H pixels, one colour per row, a legend of the rows below the charts."""
    rows = list(dict.fromkeys(row for _, series in charts for row in series))
    colours = _matplotlib().tab10
    colour = {row: colours[i % len(colours)] for i, row in enumerate(rows)}
    legend_h = LEGEND_LINE_H * (math.ceil(len(rows) / 2) + 1)
    fig = _figure(ROWS_W, TITLE_H + len(charts) * ROWS_CHART_H + legend_h, title)
    axes = fig.subplots(len(charts), 1, squeeze=False).ravel()
    handles = {}
    for ax, (chart_title, series) in zip(axes, charts):
        _style(ax, chart_title, "mean over seeds")
        for row, s in series.items():
            steps = sorted(s)
            ax.fill_between(steps, [min(s[x]) for x in steps], [max(s[x]) for x in steps],
                            color=colour[row], alpha=BAND_ALPHA, linewidth=0)
            handles[row], = ax.plot(steps, [math.fsum(s[x]) / len(s[x]) for x in steps], color=colour[row],
                                    linewidth=1.6, marker="o", markersize=3, label=row)
    fig.legend([handles[r] for r in rows if r in handles], [r for r in rows if r in handles],
               loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return fig


def plot_rows(charts: list[tuple[str, dict[str, dict[int, list[float]]]]], out: str | Path,
              title: str) -> Path:
    """Rows of a study over training -> out (PNG): one chart per (chart title, {row: {step: [value
    per seed]}}), each row's mean over seeds as a line over its translucent min-max band, with a legend."""
    return _save(rows_figure(charts, title), Path(out))
