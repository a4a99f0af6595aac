"""Pictures of a tiny run: figure sizes, exact palette colours, weighting maps equal to ops.pixel_weights."""

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import as_argv, tiny_overrides
from PIL import Image

from pwda_fast import checkpoint, curves, ops, pictures, reference, train, visualize
from pwda_fast.data.labels import PALETTE, colorize
from pwda_fast.weighting import target_maps

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-iteration gen+dis run: its run_dir and final checkpoint."""
    run_dir = tmp_path_factory.mktemp("vis_run")
    assert train.main(as_argv(tiny_overrides(run_dir, **{"train.iters": 2, "train.eval_images": 4}))) == 0
    return run_dir, checkpoint.latest(run_dir)


@pytest.fixture(scope="module")
def loaded(tiny_run):
    nets, cfg = checkpoint.load_networks(tiny_run[1], torch.device("cpu"))
    (name, item), = visualize.target_images(cfg, ["1"])
    return nets.g, nets.d_aux, cfg, item


def _crop(figure: Image.Image, corner, h: int, w: int) -> np.ndarray:
    x, y = corner
    return np.asarray(figure)[y:y + h, x:x + w]


def _zoomed(rgb: np.ndarray, zoom: int) -> np.ndarray:
    return rgb.repeat(zoom, 0).repeat(zoom, 1)


def test_prediction_figure_has_palette_colours_exactly_where_predicted(loaded):
    g, d_aux, cfg, item = loaded
    image = item["image"][None]
    h, w = image.shape[2:]
    maps = target_maps(g, d_aux, image, cfg.adapt)
    adapted = maps["logits"].argmax(1)[0].numpy().astype(np.uint8)
    label = pictures.label_at(item["label"], (h, w))
    source = pictures.predict_ids(g, image)[0]
    zoom = 2
    panels = pictures.prediction_panels(item["image"], label, adapted, source, normalize=cfg.data.normalize)
    figure, corners = pictures.compose(panels, zoom)
    assert figure.size == (4 * w * zoom + 3 * pictures.GAP, pictures.TITLE_H + h * zoom)
    for corner, ids in zip(corners[1:], (label, source, adapted)):
        panel = _crop(figure, corner, h * zoom, w * zoom)
        assert np.array_equal(panel, _zoomed(colorize(ids), zoom))
    panel = _crop(figure, corners[3], h * zoom, w * zoom)[::zoom, ::zoom]
    for c in np.unique(adapted):  # each predicted class shows its Cityscapes colour, and only there
        assert (panel[adapted == c] == PALETTE[c]).all()
        assert not (panel[adapted != c] == PALETTE[c]).all(-1).any()


@pytest.mark.parametrize("aux_at", ["image", "feature"])
@pytest.mark.parametrize("weighting", ["gen+dis", "gen"])
def test_weighting_maps_equal_ops_pixel_weights(loaded, weighting, aux_at):
    g, d_aux, cfg, item = loaded
    a = copy.deepcopy(cfg.adapt)
    a.weighting, a.aux_at = weighting, aux_at
    image = item["image"][None]
    size = tuple(image.shape[2:])
    maps = target_maps(g, d_aux, image, a)
    g, d_aux = copy.deepcopy(g).train(), copy.deepcopy(d_aux).train()  # as the generator stage runs them
    for m in g.modules():
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):
            m.eval()
    with torch.no_grad():  # recomputed here the way adapt.generator_stage computes them
        _, main, feat = g(image)
        logits = F.interpolate(main, size=size, mode="bilinear", align_corners=True)
        aux = (d_aux(feat, size) if aux_at == "image"
               else F.interpolate(d_aux(feat), size=size, mode="bilinear", align_corners=True))
    torch.testing.assert_close(maps["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(maps["aux"], aux, rtol=0, atol=0)
    expected = ops.pixel_weights(logits, aux if weighting == "gen+dis" else None,
                                 threshold=a.threshold, floor=a.floor, mu=a.mu)
    assert maps["weight"].shape == (1, *size)
    torch.testing.assert_close(maps["weight"], expected, rtol=0, atol=0)
    torch.testing.assert_close(maps["gen"], reference.generation_confidence(
        logits, threshold=a.threshold, floor=a.floor), rtol=0, atol=0)
    torch.testing.assert_close(maps["dis"], torch.sigmoid(aux[:, 0]), rtol=0, atol=0)
    if weighting == "gen+dis":  # the product of the two maps, as Fig. 2 shows it
        torch.testing.assert_close(maps["weight"], (maps["gen"] + a.mu) * maps["dis"])

    zoom = 1
    figure, corners = pictures.compose(pictures.map_panels(maps, a), zoom)
    h, w = size
    assert figure.size == (3 * w + 2 * pictures.GAP, pictures.TITLE_H + h + pictures.BAR_H)
    rendered = _crop(figure, corners[2], h, w)
    assert np.array_equal(rendered, pictures.colormap(maps["weight"][0].numpy(), 0.0, 1.0 + a.mu))


def test_colormap_runs_dark_to_bright_and_clips():
    ramp = pictures.colormap(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]]), 0.0, 1.0)[0]
    assert (ramp[0] == ramp[1]).all() and (ramp[3] == ramp[4]).all()
    assert tuple(ramp[1]) == (68, 1, 84) and tuple(ramp[3]) == (253, 231, 37)
    assert ramp[1].astype(int).sum() < ramp[2].astype(int).sum() < ramp[3].astype(int).sum()


def test_cli_writes_prediction_maps_and_curves(tiny_run, tmp_path):
    run_dir, ckpt = tiny_run
    out = tmp_path / "pictures"
    with_curves = ["--curves", str(run_dir)] if HAS_MATPLOTLIB else []  # curves: the plots extra
    code = visualize.main(["--checkpoint", str(ckpt), "--source-only", str(ckpt), "--images", "2",
                           *with_curves, "--out", str(out), "--device", "cpu"])
    assert code == 0
    preds, maps = sorted(out.glob("*_pred.png")), sorted(out.glob("*_maps.png"))
    assert len(preds) == len(maps) == 2
    h, w = 96, 192  # the toy target_size; auto zoom doubles it
    assert Image.open(preds[0]).size == (4 * 2 * w + 3 * pictures.GAP, pictures.TITLE_H + 2 * h)
    if not HAS_MATPLOTLIB:
        return
    chart = Image.open(out / "curves.png")  # every loss and the mIoU: 7 charts, two per line
    assert chart.size == (2 * curves.CURVE_W, 4 * curves.CURVE_H + curves.TITLE_H)
    rgb = np.asarray(chart.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 10  # lines and text, not blank


def test_cli_curves_without_matplotlib_exit_2_naming_the_extra(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert visualize.main(["--curves", str(tiny_run[0]), "--out", str(tmp_path)]) == 2
    assert "pip install 'pwda_fast[plots]'" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


def test_image_paths_outside_the_val_set_render_without_ground_truth(tiny_run, tmp_path):
    _, ckpt = tiny_run
    photo = tmp_path / "street.png"
    Image.fromarray(np.full((50, 100, 3), 90, np.uint8)).save(photo)
    out = tmp_path / "pictures"
    assert visualize.main(["--checkpoint", str(ckpt), "--images", str(photo), "--out", str(out)]) == 0
    assert Image.open(out / "street_pred.png").size == (2 * 2 * 192 + pictures.GAP, pictures.TITLE_H + 192)
    assert visualize.main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "nope.png"),
                           "--out", str(out)]) == 2
