"""A finished run evaluated as it was trained: the paper's setting at toy size on small GTA5 and
Cityscapes trees, then every command that reads its checkpoint.

The run starts from Caffe-layout ("Scale.") weights with data.normalize = "auto", so its inputs are
Caffe-normalised (BGR, 0-255 minus the DeepLab mean) only because the weights say so, and it scores
with MRNet's protocol (fused heads, scales 1 and 1.25, flips) as the preset does. What it recorded
(final.json, best.json, metrics.jsonl) must be what `pwda-evaluate --checkpoint` says, what its saved
predictions score, what the exported generator predicts when fed as generator.json says, and what
`pwda-visualize` draws. The inputs are normalised here by hand from the written-out Caffe formula.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from data_trees import make_tree
from helpers import training_lines
from PIL import Image

from pwda_fast import (
    checkpoint,
    config,
    evaluate,
    export,
    inference,
    models,
    pictures,
    predictions,
    train,
    visualize,
)
from pwda_fast.data import build_val
from pwda_fast.data.labels import colorize

CPU = torch.device("cpu")
SIZE = (64, 48)  # (width, height) of the trees' images, and the val size the run uses
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)
TINY_MODEL = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
              "model.aux_disc_width": 16}


def finished_run(base, amp: str = "none") -> dict:
    """A 3-step gta5_to_cityscapes run at toy size in base -> {"dir", "cfg", "root", "val"}."""
    make_tree(base / "gta5", "gta5", n=4, h=SIZE[1], w=SIZE[0])
    val = make_tree(base / "cityscapes", "cityscapes", n=4, h=SIZE[1], w=SIZE[0], seed=1)
    paper = config.load("gta5_to_cityscapes", {**TINY_MODEL, "model.stride_on": "1x1"})
    g = models.build_networks(paper.model)[0]
    heads = ("aux_head.", "main_head.")
    backbone = {f"Scale.{k}": v for k, v in g.state_dict().items() if not k.startswith(heads)}
    torch.save(backbone, base / "init.pth")  # DeepLab-v2's key layout: the run resolves to Caffe inputs
    overrides = {**TINY_MODEL, "model.init_weights": str(base / "init.pth"),
                 "data.source_root": str(base / "gta5"), "data.target_root": str(base / "cityscapes"),
                 "data.source_size": list(SIZE), "data.target_size": list(SIZE), "data.crop": [32, 64],
                 "data.batch_size": 2, "data.workers": 0, "train.iters": 3, "train.ckpt_every": 100,
                 "train.log_every": 1, "train.threads": 1, "train.amp": amp,
                 "train.run_dir": str(base / "run")}
    argv = ["--config", "gta5_to_cityscapes"] + [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    assert train.main(argv) == 0
    cfg = config.from_dict(json.loads((base / "run" / "config.json").read_text()))
    assert (cfg.data.normalize, cfg.train.eval_protocol, cfg.model.bn) == ("caffe", "mrnet", "stats")
    assert (cfg.data.interpolation, cfg.train.eval_images) == ("bicubic", 0)  # every val image
    return {"dir": base / "run", "cfg": cfg, "root": base / "cityscapes", "val": val}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("finished"))


def final(run) -> dict:
    """final.json's scores (without the build that trained the run, which evaluation does not know)."""
    scores = json.loads((run["dir"] / "final.json").read_text())
    assert scores.pop("build")["device"] == "cpu"
    return scores


def caffe_input(image_path, size) -> torch.Tensor:
    """An image file -> (1, 3, h, w) as MRNet feeds it: resized to `size` (width, height) with the
    run's bicubic filter, BGR, 0-255 minus the DeepLab mean, no division."""
    rgb = np.asarray(Image.open(image_path).convert("RGB").resize(size, Image.BICUBIC), np.float32)
    return torch.from_numpy(rgb[..., ::-1] - CAFFE_MEAN_BGR).permute(2, 0, 1)[None].contiguous()


def mrnet_prediction(g, image_path, label_shape) -> np.ndarray:
    """MRNet's protocol on one image file: inputs at the val size and 1.25 times it -> (H, W) trainIds."""
    w, h = SIZE
    larger = (int(w * 1.25 + 0.5), int(h * 1.25 + 0.5))  # 80x60, as the val set's files resized
    inputs = [caffe_input(image_path, SIZE), caffe_input(image_path, larger)]
    return inference.fused_probabilities(g.eval(), inputs, label_shape).argmax(1)[0].numpy()


def test_the_runs_records_agree(run):
    result = final(run)
    assert result["protocol"] == "mrnet"
    best = json.loads((run["dir"] / "best.json").read_text())
    assert (best["step"], best["miou"]) == (3, result["miou"])
    evals = [json.loads(ln) for ln in (run["dir"] / "metrics.jsonl").read_text().splitlines() if "eval" in ln]
    assert [(e["step"], e["miou"]) for e in evals] == [(3, result["miou"])]
    assert len(training_lines(run["dir"])) == 3


@pytest.mark.parametrize("which", ["best.pt", "last checkpoint", "another root"])
def test_evaluate_checkpoint_gives_the_runs_own_scores(run, tmp_path, which):
    ckpt = checkpoint.latest(run["dir"]) if which == "last checkpoint" else run["dir"] / "best.pt"
    extra = ["--dataset", "cityscapes", "--root", str(tmp_path / "city")] if which == "another root" else []
    if extra:
        shutil.copytree(run["root"], tmp_path / "city")
    out = tmp_path / "scores.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(out), "--device", "cpu", *extra]) == 0
    assert json.loads(out.read_text()) == final(run)


def test_the_scores_depend_on_the_normalisation(run):
    """Precondition of the test above: the same networks on ImageNet-normalised inputs score otherwise."""
    nets, cfg = checkpoint.load_networks(run["dir"] / "best.pt", CPU)
    cfg.data.normalize = "imagenet"
    other = inference.evaluate_model(nets.g, build_val(cfg.data, log=lambda _: None), CPU, protocol="mrnet")
    assert other["iou"] != final(run)["iou"]


def test_a_bf16_run_is_scored_in_bf16(tmp_path):
    """The run's evaluations ran under bf16 autocast; so does pwda-evaluate unless --amp says otherwise
    (fp32 scores it otherwise: bf16 keeps 8 bits of mantissa, and close logits change their argmax)."""
    bf16 = finished_run(tmp_path, "bf16")
    ckpt = bf16["dir"] / "best.pt"
    for flags, same in (([], True), (["--amp", "none"], False)):
        out = tmp_path / "scores.json"
        assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(out), "--device", "cpu", *flags]) == 0
        assert (json.loads(out.read_text()) == final(bf16)) is same, flags


def test_saved_predictions_are_the_runs_and_score_as_it_did(run, tmp_path):
    preds = tmp_path / "preds"
    out = tmp_path / "scores.json"
    assert evaluate.main(["--checkpoint", str(run["dir"] / "best.pt"), "--save-predictions", str(preds),
                          "--format", "labelid", "--json", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text()) == final(run)
    scored = tmp_path / "scored.json"
    assert evaluate.main(["--predictions", str(preds), "--root", str(run["root"]), "--format", "labelid",
                          "--json", str(scored), "--device", "cpu"]) == 0
    want = final(run)
    assert json.loads(scored.read_text()) == {"miou": want["miou"], "iou": want["iou"]}
    # Pixel for pixel what MRNet's protocol gives on Caffe inputs made here from the image files.
    g = checkpoint.load_networks(run["dir"] / "best.pt", CPU)[0].g
    for image, _, label in run["val"]:
        saved = predictions.read_prediction(preds / image.parent.name / image.name, label.shape, "labelid")
        assert np.array_equal(saved, mrnet_prediction(g, image, label.shape)), image.name


def test_exported_generator_fed_as_its_json_says_predicts_as_the_run(run, tmp_path):
    assert export.main(["--checkpoint", str(run["dir"] / "best.pt"), "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "generator.json").read_text())
    norm = meta["input"]
    assert (norm["normalization"], norm["channel_order"], norm["std"]) == ("caffe", "BGR", [1.0, 1.0, 1.0])
    assert norm["mean"] == pytest.approx(CAFFE_MEAN_BGR.tolist())
    assert norm["trained_size"] == {"width": SIZE[0], "height": SIZE[1]}
    assert norm["interpolation"] == "bicubic"
    g = models.build_generator(meta["model"]).eval()
    g.load_state_dict(torch.load(tmp_path / "generator.pt", weights_only=True))
    preds = tmp_path / "preds"
    evaluate.main(["--checkpoint", str(run["dir"] / "best.pt"), "--save-predictions", str(preds),
                   "--device", "cpu"])
    for image, _, label in run["val"]:
        saved = predictions.read_prediction(preds / image.parent.name / image.name, label.shape)
        assert np.array_equal(mrnet_prediction(g, image, label.shape), saved), image.name


def _panel(figure_path, k: int, zoom: int) -> np.ndarray:
    """Panel k of a prediction figure, at the image's resolution (compose's layout, zoom undone)."""
    w, h = SIZE
    x, y = k * (w * zoom + pictures.GAP), pictures.TITLE_H
    return np.asarray(Image.open(figure_path))[y:y + h * zoom:zoom, x:x + w * zoom:zoom]


def test_visualize_draws_the_image_and_the_prediction_from_caffe_inputs(run, tmp_path):
    """For a val image (image | ground truth | adapted) and for a larger copy of it outside the val set
    (image | adapted): the picture of the input is the file resized as the val set resizes, the
    prediction the main head's on Caffe inputs made here."""
    image, _, _ = run["val"][0]
    elsewhere = tmp_path / "photos" / image.name
    elsewhere.parent.mkdir()
    Image.open(image).resize((80, 60), Image.NEAREST).save(elsewhere)  # bicubic back to 64x48 blurs it
    g = checkpoint.load_networks(run["dir"] / "best.pt", CPU)[0].g
    zoom = pictures.auto_zoom(SIZE[1])
    for path, adapted_panel in ((image, 2), (elsewhere, 1)):
        x = caffe_input(path, SIZE)
        adapted = inference.predict(g, x, x.shape[2:]).argmax(1)[0].numpy().astype(np.uint8)
        rgb = np.asarray(Image.open(path).convert("RGB").resize(SIZE, Image.BICUBIC))
        out = tmp_path / f"pictures{adapted_panel}"
        assert visualize.main(["--checkpoint", str(run["dir"] / "best.pt"), "--images", str(path),
                               "--out", str(out), "--device", "cpu"]) == 0
        figure = out / f"{image.stem.removesuffix('_leftImg8bit')}_pred.png"
        assert np.array_equal(_panel(figure, 0, zoom), rgb), path
        assert np.array_equal(_panel(figure, adapted_panel, zoom), colorize(adapted)), path
