"""Evaluation: a hand-checked IoU case through --predictions, the SYNTHIA protocols, --checkpoint modes,
MRNet's test protocol on a hand-checked case."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_trees import make_tree
from PIL import Image
from torch.utils.data import Subset

from pwda_fast import checkpoint, config, evaluate, inference
from pwda_fast.data.loader import SegmentationDataset
from pwda_fast.models import build_networks

# labelIds: 7 road, 8 sidewalk, 22 terrain, 26 car, 12 wall, 0 unlabeled (void).
GT = {
    "frankfurt_000000_000019": [[7, 7, 8, 8]] * 3 + [[22, 22, 22, 22], [0, 0, 0, 0]],
    "lindau_000001_000019": [[26, 26, 26, 26]] * 3 + [[12, 12, 12, 12]],
}
# trainIds: 0 road, 1 sidewalk, 9 terrain, 5 pole, 13 car, 3 wall.
PRED = {
    "frankfurt_000000_000019": [[0, 1, 1, 1]] * 3 + [[9, 9, 5, 5], [13, 13, 13, 13]],
    "lindau_000001_000019": [[13, 13, 13, 13]] * 2 + [[0, 0, 0, 0], [3, 3, 3, 3]],
}
# By hand (TP / union): road 3/(6+7-3), sidewalk 6/9, terrain 2/4, pole 0/2 (predicted, never true),
# car 8/12 (the void row predicted as car is ignored), wall 4/4.
IOU = {"road": 30.0, "sidewalk": 200 / 3, "terrain": 50.0, "pole": 0.0, "car": 200 / 3, "wall": 100.0}


@pytest.fixture
def val_tree(tmp_path):
    root, preds = tmp_path / "cityscapes", tmp_path / "preds"
    for stem, ids in GT.items():
        city = stem.split("_")[0]
        lab = root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
        img = root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
        for path in (lab, img):
            path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(ids, np.uint8)
        Image.fromarray(ids, "L").save(lab)
        Image.fromarray(np.zeros(ids.shape + (3,), np.uint8)).save(img)
        # One prediction flat in the folder, one in a per-city subfolder: both are found.
        pred = preds / (city if city == "lindau" else "") / f"{stem}_leftImg8bit.png"
        pred.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.array(PRED[stem], np.uint8), "L").save(pred)
    return root, preds


def test_predictions_hand_checked(val_tree, tmp_path, capsys):
    root, preds = val_tree
    out = tmp_path / "r.json"
    assert evaluate.main(["--predictions", str(preds), "--root", str(root), "--json", str(out),
                          "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["iou"] == pytest.approx(IOU) and set(result) == {"miou", "iou"}
    assert result["miou"] == pytest.approx(sum(IOU.values()) / 6, abs=0.006)
    assert "mIoU" in capsys.readouterr().out


def test_synthia_protocols(val_tree, tmp_path):
    root, preds = val_tree
    out = tmp_path / "r.json"
    assert evaluate.main(["--predictions", str(preds), "--root", str(root), "--json", str(out),
                          "--source", "synthia", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    sixteen = [v for k, v in IOU.items() if k != "terrain"]  # 16: no terrain, truck, train
    thirteen = [v for k, v in IOU.items() if k not in ("terrain", "wall", "pole")]
    assert result["miou16"] == pytest.approx(sum(sixteen) / 5, abs=0.006)
    assert result["miou13"] == pytest.approx(sum(thirteen) / 3, abs=0.006)


def test_prediction_errors(val_tree, capsys):
    root, preds = val_tree
    bad = preds / "frankfurt_000000_000019_leftImg8bit.png"
    Image.fromarray(np.full((5, 4), 26, np.uint8), "L").save(bad)  # labelIds, not trainIds
    assert evaluate.main(["--predictions", str(preds), "--root", str(root), "--device", "cpu"]) == 2
    assert f"{bad}: holds value 26" in capsys.readouterr().err
    Image.fromarray(np.zeros((2, 2), np.uint8), "L").save(bad)
    assert evaluate.main(["--predictions", str(preds), "--root", str(root), "--device", "cpu"]) == 2
    assert "is 2x2 but its label is 4x5; upsample" in capsys.readouterr().err
    bad.unlink()
    assert evaluate.main(["--predictions", str(preds), "--root", str(root), "--device", "cpu"]) == 2
    assert "1 of 2 val images have no prediction" in capsys.readouterr().err


def test_checkpoint_on_a_cityscapes_root_at_label_resolution(tmp_path, monkeypatch):
    make_tree(tmp_path / "city", "cityscapes", n=2, h=48, w=64)
    cfg = config.load("toy", {"data.source": "synthia", "data.target_size": [32, 24], "data.crop": [24, 32]})
    g = build_networks(cfg.model)[0]
    path = checkpoint.save(tmp_path / "run", 1, {"config": cfg.to_dict(), "g": g.state_dict()})
    shapes = []
    real = inference.predict
    monkeypatch.setattr(inference, "predict", lambda g, image, size, amp="none": (
        shapes.append((tuple(image.shape[2:]), size)), real(g, image, size, amp))[1])
    out = tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(path), "--dataset", "cityscapes", "--root",
                          str(tmp_path / "city"), "--json", str(out), "--device", "cpu"]) == 0
    assert shapes == [((24, 32), (48, 64))] * 2  # network input resized, scored at label size
    result = json.loads(out.read_text())
    assert {"miou", "iou", "miou16", "miou13", "protocol"} == set(result)  # source synthia: both
    assert result["protocol"] == "single"


def test_dataset_needs_root():
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "x.pt", "--dataset", "cityscapes"])


# MRNet's protocol by hand. The val image is white on its left half and black on its right, so the
# fake generator below knows whether it sees it mirrored. Its logits come at the label's 16x8
# resolution (no upsampling to reason about), constant over each half, one class at 20 (or the aux
# head's class at 80 / 30) and every other class at 0: each of the four passes votes for one class
# per half with a probability within 1e-7 of 1. Classes: 0 road (A), 1 sidewalk (B), 2 building (C).
A, B, C = 0, 1, 2
# (input (h, w), mirrored) -> ({class: logit} of aux and main) for the left and right half of what
# the network sees; a mirrored pass's halves are the image's right and left.
PASSES = {
    ((4, 8), False): (({B: 80}, {A: 20}), ({}, {B: 20})),    # 0.5 * aux + main: L votes B, R B
    ((4, 8), True): (({}, {B: 20}), ({}, {A: 20})),          # flipped back: L votes A, R B
    ((5, 10), False): (({C: 80}, {B: 20}), ({A: 30}, {B: 20})),  # L: C 40 > B 20; R: B 20 > A 15
    ((5, 10), True): (({}, {A: 20}), ({}, {C: 20})),         # flipped back: L votes C, R A
}
# Votes, left half: B, A, C, C -> C (building); right half: B, B, B, A -> B (sidewalk).
# Forgetting to flip back would give left B (B, B, C, A); the main head alone, left A (A, A, B, C).


class VotingGenerator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        mirrored = bool(x[0, 0, :, 0].mean() < x[0, 0, :, -1].mean())  # the white half is on the right
        self.seen.append((tuple(x.shape[2:]), mirrored))
        left, right = PASSES[self.seen[-1]]
        aux, main = torch.zeros(1, 19, 8, 16), torch.zeros(1, 19, 8, 16)
        for columns, (aux_votes, main_votes) in ((slice(0, 8), left), (slice(8, 16), right)):
            for out, votes in ((aux, aux_votes), (main, main_votes)):
                for k, v in votes.items():
                    out[0, k, :, columns] = v
        return aux, main, None


@pytest.fixture
def halves(tmp_path):
    """A 16x8 val pair: image white | black, label building | sidewalk with a void bottom row; the
    val set resizes images to 8x4 (and 10x5 at scale 1.25)."""
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, :8] = 255
    label = np.full((8, 16), B, np.uint8)
    label[:, :8] = C
    label[7] = 255
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(label, "L").save(tmp_path / "l.png")
    return SegmentationDataset([(tmp_path / "i.png", tmp_path / "l.png")], size=(8, 4), train=False,
                               resize_label=False, normalize="caffe", interpolation="bicubic")


def test_mrnet_protocol_hand_checked(halves):
    g = VotingGenerator()
    result = inference.evaluate_model(g, halves, torch.device("cpu"), protocol="mrnet")
    assert g.seen == list(PASSES)  # scales 1 and 1.25, each as is and mirrored
    # 7 labelled rows x 8 columns per half, both right: building 56/56, sidewalk 56/56.
    assert result == {"miou": 100.0, "iou": {"sidewalk": 100.0, "building": 100.0}, "protocol": "mrnet"}
    g.seen.clear()
    assert inference.evaluate_model(g, Subset(halves, [0]), torch.device("cpu"), protocol="mrnet") == result
    # "single": the main head of the first pass alone: left road (true building), right sidewalk.
    # road 0 / 56, sidewalk 56 / 56, building 0 / 56.
    g.seen.clear()
    single = inference.evaluate_model(g, halves, torch.device("cpu"))
    assert g.seen == [((4, 8), False)]
    assert single == {"miou": pytest.approx(100 / 3), "protocol": "single",
                      "iou": {"road": 0.0, "sidewalk": 100.0, "building": 0.0}}


def test_fused_probabilities_upsample_after_softmax():
    torch.manual_seed(0)
    pool, heads = torch.nn.AvgPool2d(3, 3, ceil_mode=True), torch.nn.Conv2d(3, 38, 1)

    def g(x):  # (N, 3, H, W) -> aux, main (N, 19, ceil(H / 3), ceil(W / 3)): odd, low-res maps
        aux, main = heads(pool(x)).split(19, 1)
        return aux, main, None

    images = [torch.randn(2, 3, 13, 21), torch.randn(2, 3, 16, 26)]
    got = inference.fused_probabilities(g, images, (31, 45))
    want = torch.zeros(2, 19, 31, 45)
    for x in images:
        for flip in (False, True):
            aux, main, _ = g(x.flip(-1) if flip else x)
            logits = (0.5 * aux + main).flip(-1) if flip else 0.5 * aux + main
            want += F.interpolate(logits.softmax(1), (31, 45), mode="bilinear", align_corners=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.full((2, 31, 45), 4.0))  # four probability maps


def test_protocol_errors(halves, tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation protocol 'multi'; valid: single, mrnet"):
        inference.evaluate_model(VotingGenerator(), halves, torch.device("cpu"), protocol="multi")
    native = SegmentationDataset(halves.pairs, train=False, resize_label=False)
    with pytest.raises(ValueError, match="needs a val set resized to a fixed size"):
        inference.evaluate_model(VotingGenerator(), native, torch.device("cpu"), protocol="mrnet")
    with pytest.raises(SystemExit):
        evaluate.main(["--predictions", str(tmp_path), "--root", str(tmp_path), "--protocol", "mrnet"])


@pytest.mark.parametrize("saved, flag, used", [("mrnet", [], "mrnet"), (None, [], "single"),
                                               ("single", ["--protocol", "mrnet"], "mrnet")])
def test_checkpoint_protocol_from_config_or_flag(tmp_path, monkeypatch, saved, flag, used):
    make_tree(tmp_path / "city", "cityscapes", n=1, h=48, w=64)
    cfg = config.load("toy", {"data.target_size": [32, 24], "data.crop": [24, 32]})
    g = build_networks(cfg.model)[0]
    stored = cfg.to_dict()
    if saved:
        stored["train"]["eval_protocol"] = saved
    else:  # a checkpoint written before train.eval_protocol existed
        del stored["train"]["eval_protocol"]
    path = checkpoint.save(tmp_path / "run", 1, {"config": stored, "g": g.state_dict()})
    calls = []
    real = inference.fused_probabilities
    monkeypatch.setattr(inference, "fused_probabilities", lambda g, images, size, amp="none": (
        calls.append(([tuple(x.shape[2:]) for x in images], size)), real(g, images, size, amp))[1])
    out = tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(path), "--dataset", "cityscapes", "--root",
                          str(tmp_path / "city"), "--json", str(out), "--device", "cpu", *flag]) == 0
    assert json.loads(out.read_text())["protocol"] == used
    # mrnet: 32x24 and 40x30 inputs read from the file, probabilities summed at the label's 64x48.
    assert calls == ([([(24, 32), (30, 40)], (48, 64))] if used == "mrnet" else [])
