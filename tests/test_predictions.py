"""Prediction export (pwda-evaluate --save-predictions) for the Cityscapes benchmark.

The exported labelId PNGs are found and scored by the official evaluation, cityscapesscripts'
evalPixelLevelSemanticLabeling (its getPrediction file search and its evaluateImgLists), and it
gives the mIoU our evaluation gives. Both count the same confusion over the 19 evaluated classes:
- void ground truth: we drop those pixels; it keeps their rows (labelIds 0..6, 9, ...) but leaves
  them out of every IoU (ignoreInEval), so no class gains a false positive from them;
- a pixel predicted as no evaluated class (a labelId such as 0 or 4): a miss for its label's class
  in both (our exporter never writes one; --predictions counts it so, tested below);
- a class with no pixel in ground truth or prediction (union 0): it reports NaN and leaves it out
  of the mean; we leave it out of the table and of the mean. A class that is predicted but absent
  from the ground truth has IoU 0 in both and counts in both means;
- it reports fractions, we percentages.
So the comparison is over the classes it does not report as NaN, which must be exactly ours.
"""

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from data_trees import make_tree
from PIL import Image

from pwda_fast import checkpoint, config, evaluate, inference, predictions
from pwda_fast.data.labels import CLASSES, TRAIN_TO_CITYSCAPES_ID
from pwda_fast.models import build_networks

INSTALL = "pip install --no-deps cityscapesscripts pyquaternion"


def official_module(name):
    return pytest.importorskip(f"cityscapesscripts.{name}", reason=f"cityscapesscripts not importable "
                                                                  f"({INSTALL} to run this check)")


def tiny_checkpoint(folder):
    """A random MRNet toy generator that sees the 64x48 val images at 32x24 (as test_evaluate)."""
    cfg = config.load("toy", {"data.target_size": [32, 24], "data.crop": [24, 32]})
    torch.manual_seed(0)
    g = build_networks(cfg.model)[0]
    return checkpoint.save(folder, 1, {"config": cfg.to_dict(), "g": g.state_dict()})


def export(ckpt, root, out, fmt, protocol="single"):
    """evaluate --checkpoint ... --save-predictions out -> the scores it printed (its --json)."""
    result = out.parent / f"{out.name}.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--dataset", "cityscapes", "--root", str(root),
                          "--save-predictions", str(out), "--format", fmt, "--protocol", protocol,
                          "--json", str(result), "--device", "cpu"]) == 0
    return json.loads(result.read_text())


def score(pred_dir, root, fmt):
    """evaluate --predictions pred_dir --format fmt -> its --json."""
    result = pred_dir.parent / f"{pred_dir.name}-scored.json"
    assert evaluate.main(["--predictions", str(pred_dir), "--root", str(root), "--format", fmt,
                          "--json", str(result), "--device", "cpu"]) == 0
    return json.loads(result.read_text())


def official(pred_dir, root) -> dict:
    """The official evaluation of labelId predictions under pred_dir against root's gtFine val."""
    ev = official_module("evaluation.evalPixelLevelSemanticLabeling")
    args = copy.copy(ev.args)
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    # No instanceIds files in the fixture (nIoU only), no result file, no console table.
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    gts = sorted(str(p) for p in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    assert gts
    preds = [ev.getPrediction(args, gt) for gt in gts]  # exits if a prediction is missing or doubled
    return ev.evaluateImgLists(preds, gts, args)


def assert_same_scores(theirs: dict, ours: dict):
    scored = {name: 100 * v for name, v in theirs["classScores"].items() if not math.isnan(v)}
    assert scored.keys() == ours["iou"].keys()
    assert scored == pytest.approx(ours["iou"], rel=1e-6, abs=1e-9)
    assert 100 * theirs["averageScoreClasses"] == pytest.approx(ours["miou"], rel=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A Cityscapes-layout tree of 4 val images (64x48, two cities) and a tiny checkpoint."""
    tmp = tmp_path_factory.mktemp("predictions")
    pairs = make_tree(tmp / "cityscapes", "cityscapes", n=4, h=48, w=64)
    return tmp, tmp / "cityscapes", tiny_checkpoint(tmp / "run"), pairs


@pytest.fixture(scope="module")
def exports(run):
    """{format: (folder, scores)} of the single-protocol export in each format."""
    tmp, root, ckpt, _ = run
    return {fmt: (tmp / fmt, export(ckpt, root, tmp / fmt, fmt)) for fmt in predictions.FORMATS}


@pytest.mark.parametrize("protocol", inference.PROTOCOLS)
def test_official_evaluation_of_exported_label_ids_matches_ours(run, exports, protocol, capsys):
    tmp, root, ckpt, pairs = run
    if protocol == "single":
        out, ours = exports["labelid"]
    else:
        out = tmp / "labelid-mrnet"
        ours = export(ckpt, root, out, "labelid", protocol)
        assert ours != exports["labelid"][1]  # the protocols did differ
        assert f"wrote {len(pairs)} labelid prediction PNGs" in capsys.readouterr().out
    assert ours["protocol"] == protocol
    # One PNG per val image, under its city, named as the image (benchmark's <city>_<seq>_<frame>*.png).
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{img.parent.name}/{img.name}" for img, _, _ in pairs)
    for img, _, label in pairs:
        pred = Image.open(out / img.parent.name / img.name)
        assert pred.mode == "L" and pred.size == (label.shape[1], label.shape[0])  # label resolution
        assert set(np.unique(np.asarray(pred))) <= set(TRAIN_TO_CITYSCAPES_ID.tolist())
    # A comparison that means something: classes right, wrong, and predicted but absent (IoU 0).
    assert 0 < ours["miou"] < 100 and min(ours["iou"].values()) == 0.0 and len(ours["iou"]) > 7
    assert_same_scores(official(out, root), ours)


def test_formats_round_trip_and_score_as_the_model(run, exports):
    _, root, _, pairs = run
    labels = official_module("helpers.labels")  # the published tables, independent of ours
    colour_to_train = {lab.color: lab.trainId for lab in labels.labels if 0 <= lab.trainId < len(CLASSES)}
    for img, _, _ in pairs:
        name = f"{img.parent.name}/{img.name}"
        train = np.asarray(Image.open(exports["trainid"][0] / name))
        assert train.max() < len(CLASSES)
        ids = np.asarray(Image.open(exports["labelid"][0] / name))
        np.testing.assert_array_equal(np.vectorize(lambda i: labels.id2label[int(i)].trainId)(ids), train)
        rgb = np.asarray(Image.open(exports["color"][0] / name).convert("RGB"))
        decoded = np.array([colour_to_train[tuple(int(c) for c in px)] for px in rgb.reshape(-1, 3)])
        np.testing.assert_array_equal(decoded.reshape(train.shape), train)
    model = exports["trainid"][1]
    assert all(result == model for _, result in exports.values())  # export never changes the scores
    for fmt, (folder, _) in exports.items():
        scored = score(folder, root, fmt)
        assert scored == {k: v for k, v in model.items() if k != "protocol"}, fmt


def test_pixels_of_no_evaluated_class_count_as_misses_as_officially(run, exports, tmp_path):
    """A labelId of a non-evaluated class (0 unlabeled, 4 static), trainId 255 or black is wrong
    wherever it lands: --predictions agrees with the official evaluation on such files."""
    _, root, _, pairs = run
    edited = {fmt: tmp_path / fmt for fmt in predictions.FORMATS}
    for fmt, folder in edited.items():
        shutil.copytree(exports[fmt][0], folder)
    for i, (img, _, _) in enumerate(pairs[:2]):
        name = f"{img.parent.name}/{img.name}"
        for fmt, value in (("labelid", (0, 4)[i]), ("trainid", 255), ("color", (0, 0, 0))):
            pred = np.array(Image.open(edited[fmt] / name))
            pred[16:40, 8:56] = value
            Image.fromarray(pred).save(edited[fmt] / name)
    ours = score(edited["labelid"], root, "labelid")
    assert ours["miou"] < exports["labelid"][1]["miou"]
    assert_same_scores(official(edited["labelid"], root), ours)
    assert score(edited["trainid"], root, "trainid") == ours
    assert score(edited["color"], root, "color") == ours


def test_predictions_are_named_and_found_by_the_image_stem(tmp_path):
    """A prediction is <image stem>.png whatever the image's extension (a .jpg image's too), found
    flat in the folder or under the image's folder name (the city)."""
    image = tmp_path / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.jpg"
    preds = tmp_path / "preds"
    name = "lindau_000001_000019_leftImg8bit.png"
    assert predictions._find_prediction(preds, image) is None
    (preds / "lindau").mkdir(parents=True)
    (preds / "lindau_000001_000019_leftImg8bit.jpg").touch()  # lossy, never a prediction file
    assert predictions._find_prediction(preds, image) is None
    ids = np.array([[0, 18], [13, 5]], np.uint8)
    assert predictions.PredictionWriter(preds, "labelid").write(image, ids) == preds / "lindau" / name
    assert predictions._find_prediction(preds, image) == preds / "lindau" / name
    saved = predictions.read_prediction(preds / "lindau" / name, (2, 2), "labelid")
    np.testing.assert_array_equal(saved, ids)
    (preds / name).touch()  # flat in the folder is looked at first
    assert predictions._find_prediction(preds, image) == preds / name


def test_prediction_format_errors(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    img = make_tree(root, "cityscapes", n=1, h=8, w=16)[0][0]
    pred = tmp_path / "preds" / img.name
    pred.parent.mkdir()

    def fails(fmt, array, mode, message):
        Image.fromarray(array, mode).save(pred)
        assert evaluate.main(["--predictions", str(pred.parent), "--root", str(root), "--format", fmt,
                              "--device", "cpu"]) == 2
        assert f"{pred}: {message}" in capsys.readouterr().err

    fails("labelid", np.full((8, 16), 40, np.uint8), "L", "holds value 40, but Cityscapes labelIds are 0..33")
    fails("trainid", np.full((8, 16), 26, np.uint8), "L", "holds value 26, but trainId predictions are 0..18")
    fails("color", np.full((8, 16), 3, np.uint8), "L", "color predictions must be RGB PNGs, got mode L")
    off = np.zeros((8, 16, 3), np.uint8)
    off[0, 0] = (128, 64, 129)  # one step off road's colour
    fails("color", off, "RGB", "holds colour (128, 64, 129), which is no Cityscapes class colour")
    for misuse in (["--predictions", str(pred.parent), "--root", str(root), "--save-predictions", "out"],
                   ["--checkpoint", "x.pt", "--format", "labelid"]):  # --format without PNGs to name
        with pytest.raises(SystemExit):
            evaluate.main(misuse)
