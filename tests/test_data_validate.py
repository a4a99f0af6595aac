"""Pre-flight validation: every bad-input case stops with its file named, or is skipped and reported."""

import json

import numpy as np
import pytest
from data_trees import make_tree, scene, write_image, write_label
from PIL import Image

from pwda_fast import config
from pwda_fast.data import build_datasets, open_split
from pwda_fast.data.validate import validate


def _cfg(src, tgt, **data):
    overrides = {"data.source": "gta5", "data.source_root": str(src), "data.target": "cityscapes",
                 "data.target_root": str(tgt), "data.source_size": [64, 48], "data.target_size": [64, 48],
                 "data.crop": [32, 32], **{f"data.{k}": v for k, v in data.items()}}
    return config.load(None, overrides).data


@pytest.fixture
def trees(tmp_path):
    src, tgt = tmp_path / "gta5", tmp_path / "cityscapes"
    return src, tgt, make_tree(src, "gta5", n=10), make_tree(tgt, "cityscapes", n=3)


def _problems(domain, full=False):
    with pytest.raises(ValueError) as e:
        validate(domain, "source", full=full)
    return str(e.value)


def test_clean_trees_pass_and_build(trees):
    src, tgt, _, _ = trees
    sets = build_datasets(_cfg(src, tgt, validate="full"))
    assert [len(sets[k]) for k in ("source", "target", "val")] == [10, 3, 3]


def test_missing_label(trees):
    src, _, made, _ = trees
    made[2][1].unlink()
    msg = _problems(open_split("gta5", str(src), "source"))
    assert "1 of 10 files are bad" in msg and f"{made[2][0]}: has no label" in msg
    assert "data.skip_bad=true" in msg


def test_undecodable_image_and_label(trees):
    src, _, made, _ = trees
    made[0][0].write_bytes(b"not a png")
    made[1][1].write_bytes(b"\x89PNG garbage")
    msg = _problems(open_split("gta5", str(src), "source"))
    assert f"{made[0][0]}: image does not decode" in msg
    assert f"label {made[1][1]} does not decode" in msg


def test_truncated_image_found_by_full_decode_only(trees):
    src, _, made, _ = trees
    data = made[3][0].read_bytes()
    made[3][0].write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    domain = open_split("gta5", str(src), "source")
    validate(domain, "source")  # header-only: cannot see it
    assert f"{made[3][0]}: image does not decode" in _problems(domain, full=True)


def test_size_mismatch(trees):
    src, _, made, _ = trees
    write_label(made[4][1], scene(40, 64, 1), "gta5")
    assert "is 64x40 but the image is 64x48" in _problems(open_split("gta5", str(src), "source"))


def test_colour_label_instead_of_ids(trees):
    src, _, made, _ = trees
    Image.new("RGB", (64, 48), (128, 64, 128)).save(made[5][1])
    assert "has Pillow mode RGB" in _problems(open_split("gta5", str(src), "source"))


def test_unknown_label_values_found_by_full_check_and_never_reach_the_loss(trees):
    src, _, made, _ = trees
    original = Image.open(made[6][1])
    ids = np.asarray(original).copy()
    ids[0, 0] = 200  # not a Cityscapes label id
    img = Image.fromarray(ids, "P")
    img.putpalette(original.getpalette())  # without a full palette Pillow renumbers the indices
    img.save(made[6][1])
    domain = open_split("gta5", str(src), "source")
    assert "holds values [200]" in _problems(domain, full=True)
    assert np.asarray(domain.label_reader(made[6][1]))[0, 0] == 255


def test_first_twenty_then_a_count(tmp_path):
    make_tree(tmp_path, "gta5", n=25, h=16, w=16)
    for lab in (tmp_path / "labels").iterdir():
        lab.unlink()
    msg = _problems(open_split("gta5", str(tmp_path), "source"))
    assert msg.count("has no label") == 20 and "... and 5 more" in msg


def test_skip_bad_reports_and_writes_bad_files_json(trees, tmp_path):
    src, tgt, made, _ = trees
    made[7][1].unlink()
    log = []
    sets = build_datasets(_cfg(src, tgt, skip_bad=True, max_bad_fraction=0.2), tmp_path / "run", log.append)
    assert len(sets["source"]) == 9 and made[7][0] not in [p[0] for p in sets["source"].pairs]
    assert any("1 of 10 files are bad; skipping them" in line for line in log)
    report = json.loads((tmp_path / "run" / "bad_files.json").read_text())
    assert [b["image"] for b in report["source"]] == [str(made[7][0])] and report["val"] == []


def test_skip_bad_still_stops_past_max_bad_fraction(trees):
    src, tgt, made, _ = trees
    for _, lab, _ in made[:3]:
        lab.unlink()
    with pytest.raises(ValueError, match=r"3 of 10 files are bad \(30.0%\), more than data.max_bad_fraction"):
        build_datasets(_cfg(src, tgt, skip_bad=True, max_bad_fraction=0.2))


def test_missing_folder_shows_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)images is missing.*labels/00001.png"):
        open_split("gta5", str(tmp_path), "source")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"(?s)has no \*_leftImg8bit.png images.*gtFine/val/<city>"):
        open_split("cityscapes", str(tmp_path), "val")
    with pytest.raises(ValueError, match="needs its root folder"):
        open_split("synthia", "", "source")


def test_unlabelled_target_images_are_checked_too(trees):
    src, tgt, _, _ = trees
    bad = next((tgt / "leftImg8bit" / "train").rglob("*.png"))
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=f"target data \\(cityscapes\\).*\n  {bad}: image does not decode"):
        build_datasets(_cfg(src, tgt))


def test_a_new_image_without_label_in_synthia(tmp_path):
    make_tree(tmp_path, "synthia", n=2)
    write_image(tmp_path / "RGB" / "0000009.png", scene(48, 64, 9))
    assert "0000009.png: has no label" in _problems(open_split("synthia", str(tmp_path), "source"))
