"""Evaluation: a hand-checked IoU case through --predictions, the SYNTHIA protocols, --checkpoint modes."""

import json

import numpy as np
import pytest
from data_trees import make_tree
from PIL import Image

from pwda_fast import checkpoint, config, evaluate
from pwda_fast.models import DeepLabV2

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
IOU = {"road": 30.0, "sidewalk": 66.67, "terrain": 50.0, "pole": 0.0, "car": 66.67, "wall": 100.0}


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
    assert result["iou"] == IOU and set(result) == {"miou", "iou"}
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
    cfg = config.load("toy", {"data.source": "synthia", "data.target_size": [32, 24]})
    g = DeepLabV2(19, cfg.model.depth, cfg.model.width, cfg.model.bn)
    path = checkpoint.save(tmp_path / "run", 1, {"config": cfg.to_dict(), "g": g.state_dict()})
    shapes = []
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda g, image, size, amp="none": (
        shapes.append((tuple(image.shape[2:]), size)), real(g, image, size, amp))[1])
    out = tmp_path / "r.json"
    assert evaluate.main(["--checkpoint", str(path), "--dataset", "cityscapes", "--root",
                          str(tmp_path / "city"), "--json", str(out), "--device", "cpu"]) == 0
    assert shapes == [((24, 32), (48, 64))] * 2  # network input resized, scored at label size
    result = json.loads(out.read_text())
    assert {"miou", "iou", "miou16", "miou13"} == set(result)  # source synthia: both protocols


def test_dataset_needs_root():
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", "x.pt", "--dataset", "cityscapes"])
