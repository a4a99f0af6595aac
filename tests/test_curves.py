"""Training curves: what each chart plots equals its inputs, the layout the figures promise, and a clear
error naming the `plots` extra without matplotlib."""

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from pwda_fast import curves

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs the plots extra (matplotlib)")


def _write_metrics(run_dir, records):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _looks_styled(ax):
    """A light grid, both axes labelled, and plain y tick values (no offset above the axis)."""
    assert ax.xaxis.get_gridlines()[0].get_visible() and ax.yaxis.get_gridlines()[0].get_visible()
    assert ax.get_xlabel() == "training step" and ax.get_ylabel()
    assert not ax.yaxis.get_major_formatter().get_useOffset()


@needs_matplotlib
def test_curves_figure_plots_every_logged_loss_and_the_miou(tmp_path):
    records = [{"step": s, "seg": 2.0 / s, "adv": 0.7, "d": s / 8, "d_aux": 1.386 - 1e-5 * s, "skipped": 0}
               for s in range(10, 60, 10)]
    records[2]["adv"] = float("nan")  # a skipped step's loss: left out of the line
    records += [{"step": 40, "eval": True, "miou": 12.5}, {"step": 20, "eval": True, "miou": 10.0}]
    _write_metrics(tmp_path, records)
    fig = curves.curves_figure(tmp_path)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["loss seg", "loss adv", "loss d", "loss d_aux",
                                                 "target mIoU (%)"]
    expected = {
        "loss seg": ([10, 20, 30, 40, 50], [0.2, 0.1, 2.0 / 30, 0.05, 0.04]),
        "loss adv": ([10, 20, 40, 50], [0.7] * 4),
        "loss d": ([10, 20, 30, 40, 50], [1.25, 2.5, 3.75, 5.0, 6.25]),
        "loss d_aux": ([10, 20, 30, 40, 50], [1.386 - 1e-5 * s for s in (10, 20, 30, 40, 50)]),
        "target mIoU (%)": ([20, 40], [10.0, 12.5]),  # sorted by step
    }
    for ax in axes:
        _looks_styled(ax)
        (line,) = ax.get_lines()
        xs, ys = expected[ax.get_title()]
        np.testing.assert_array_equal(line.get_xdata(), xs)
        np.testing.assert_array_equal(line.get_ydata(), ys)
    ticks = [t for t in axes[0].get_xticks() if 10 <= t <= 50]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)  # steps between the ends
    assert axes[-1].get_lines()[0].get_color() == curves.TARGET_COLOUR
    assert len({ax.get_lines()[0].get_color() for ax in axes}) == len(axes)
    assert len(fig.axes) == 6 and not fig.axes[-1].get_visible()  # 5 charts on 3 lines: no empty frame

    out = curves.plot_curves(tmp_path, tmp_path / "out")
    assert out == tmp_path / "out" / "curves.png"
    chart = Image.open(out)
    assert chart.size == (2 * curves.CURVE_W, 3 * curves.CURVE_H + curves.TITLE_H)
    assert len(np.unique(np.asarray(chart.convert("RGB")).reshape(-1, 3), axis=0)) > 10


@needs_matplotlib
def test_a_chart_without_finite_values_says_so(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "seg": float("nan")}, {"step": 2, "seg": float("inf")}])
    fig = curves.curves_figure(tmp_path)
    seg, miou = fig.axes[:2]
    assert not seg.get_lines() and [t.get_text() for t in seg.texts] == ["no finite values"]
    assert miou.get_title() == "target mIoU (%)"
    assert [t.get_text() for t in miou.texts] == ["no finite values"]


@needs_matplotlib
def test_rows_figure_draws_each_rows_mean_over_its_translucent_min_max_band(tmp_path):
    from matplotlib.colors import to_rgb

    series = {"source-only": {10: [1.0, 3.0], 20: [2.0, 6.0], 30: [5.0, 5.0]},
              "GenMap (T=0.9)": {10: [2.0, 2.5, 4.5], 30: [7.0, 8.0, 9.0]}}
    charts = [("target-val mIoU (%)", series), ("fraction of target pixels with p* > T", {"GenMap (T=0.9)": {
        20: [0.5, 0.25]}})]
    fig = curves.rows_figure(charts, "toy: mean over seeds")
    miou, above = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [title for title, _ in charts]
    for ax, (_, s) in zip(fig.axes, charts):
        _looks_styled(ax)
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == list(s)
        for (row, values), band in zip(s.items(), ax.collections):
            steps = sorted(values)
            np.testing.assert_array_equal(lines[row].get_xdata(), steps)
            np.testing.assert_allclose(lines[row].get_ydata(), [math.fsum(values[x]) / len(values[x])
                                                                  for x in steps], rtol=0, atol=1e-15)
            assert 0 < band.get_alpha() < 0.5
            assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(to_rgb(lines[row].get_color()))
            outline = band.get_paths()[0].vertices  # the band: max over seeds above, min below
            for x in steps:
                at = outline[np.isclose(outline[:, 0], x), 1]
                assert min(values[x]) == pytest.approx(at.min()) and max(values[x]) == pytest.approx(at.max())
    # one colour per row in every chart, and one legend entry per row below the charts
    assert above.get_lines()[0].get_color() == miou.get_lines()[1].get_color()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["source-only", "GenMap (T=0.9)"]

    out = curves.plot_rows(charts, tmp_path / "pair" / "curves.png", "toy: mean over seeds")
    assert Image.open(out).size == (curves.ROWS_W, curves.TITLE_H + 2 * curves.ROWS_CHART_H
                                    + curves.LEGEND_LINE_H * 2)


def test_missing_matplotlib_is_a_clear_error_naming_the_extra(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _write_metrics(tmp_path, [{"step": 1, "seg": 1.0}])
    for draw in (lambda: curves.require_matplotlib(), lambda: curves.plot_curves(tmp_path, tmp_path),
                 lambda: curves.plot_rows([("c", {"r": {1: [1.0]}})], tmp_path / "c.png", "t")):
        with pytest.raises(curves.PlotsError, match=r"need matplotlib: pip install 'pwda_fast\[plots\]'"):
            draw()
    assert not list(tmp_path.glob("*.png"))
