"""prepare: labels converted once to 8-bit trainId PNGs beside the originals, resumable, used by training."""

import hashlib
import shutil

import numpy as np
import pytest
from data_trees import make_tree
from PIL import Image

from pwda_fast import config
from pwda_fast.data import build_datasets, open_split
from pwda_fast.data.datasets import LAYOUTS
from pwda_fast.data.prepare import main, prepare, tasks


def _digests(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("dataset", ["gta5", "synthia", "cityscapes"])
def test_prepare_converts_labels_and_leaves_originals(tmp_path, dataset):
    made = make_tree(tmp_path, dataset, n=3)
    before = _digests(tmp_path)
    marker, failed = prepare(dataset, tmp_path, jpeg=True, progress=False)
    assert failed == [] and marker.is_file()
    assert all(_digests(tmp_path)[p] == d for p, d in before.items())  # originals untouched
    split = "val" if dataset == "cityscapes" else "source"
    domain = open_split(dataset, str(tmp_path), split)
    assert domain.stored_train_ids  # the prepared tree is what training reads now
    by_stem = {img.name.split(".")[0]: lab for img, _, lab in made}
    for image, label in domain.pairs:
        assert image.suffix == ".png"  # the originals: JPEG copies are for the training sets that ask
        assert label.is_relative_to(tmp_path / f"{LAYOUTS[dataset].label_dir}_trainIds")
        assert Image.open(label).mode == "L"
        np.testing.assert_array_equal(np.asarray(Image.open(label)), by_stem[image.name.split(".")[0]])
        assert Image.open(domain.jpeg[image]).format == "JPEG"


def test_prepare_resumes_and_skips_finished_outputs(tmp_path):
    make_tree(tmp_path, "gta5", n=4)
    layout = LAYOUTS["gta5"]
    todo, _ = tasks(layout, tmp_path, tmp_path, jpeg=False)
    assert len(todo) == 4
    prepare("gta5", tmp_path, progress=False)
    assert tasks(layout, tmp_path, tmp_path, jpeg=False)[0] == []
    done = tmp_path / "labels_trainIds" / "00002.png"
    done.unlink()
    (done.parent / ".00002.png.tmp999").write_bytes(b"half")  # what a killed run leaves behind
    assert [t[2] for t in tasks(layout, tmp_path, tmp_path, jpeg=False)[0]] == [done]
    mtime = (done.parent / "00001.png").stat().st_mtime_ns
    prepare("gta5", tmp_path, progress=False)
    assert done.is_file() and (done.parent / "00001.png").stat().st_mtime_ns == mtime


def test_incomplete_prepared_tree_is_not_used(tmp_path):
    make_tree(tmp_path, "synthia", n=2)
    prepare("synthia", tmp_path, progress=False)
    (tmp_path / ".pwda_prepared_synthia.json").unlink()  # as if prepare had been interrupted
    assert not open_split("synthia", str(tmp_path), "source").stored_train_ids


def test_prepare_out_folder_and_config_point_training_at_it(tmp_path):
    src, tgt, out = tmp_path / "gta5", tmp_path / "city", tmp_path / "prepared"
    make_tree(src, "gta5", n=3)
    make_tree(tgt, "cityscapes", n=2)
    assert main(["--dataset", "gta5", "--root", str(src), "--out", str(out)]) == 0
    assert not (src / "labels_trainIds").exists()
    cfg = config.load(None, {"data.source": "gta5", "data.source_root": str(src), "data.target": "cityscapes",
                             "data.target_root": str(tgt), "data.source_prepared": str(out)}).data
    sets = build_datasets(cfg)
    assert sets["source"].labels_are_train_ids and not sets["val"].labels_are_train_ids
    assert all(lab.is_relative_to(out) for _, lab in sets["source"].pairs)


def test_prepare_cli_errors(tmp_path, capsys):
    assert main(["--dataset", "cityscapes", "--root", str(tmp_path)]) == 2
    assert "leftImg8bit/{train,val}/<city>" in capsys.readouterr().err
    made = make_tree(tmp_path / "g", "gta5", n=2)
    made[1][1].unlink()
    assert main(["--dataset", "gta5", "--root", str(tmp_path / "g")]) == 1
    err = capsys.readouterr().err
    assert f"failed: {made[1][1]}" in err and "1 inputs could not be converted: 1 FileNotFoundError" in err
    assert "not marked prepared" in err and not (tmp_path / "g" / ".pwda_prepared_gta5.json").exists()
    assert not open_split("gta5", str(tmp_path / "g"), "source").stored_train_ids  # raw labels still read


def test_prepare_refuses_a_tree_with_a_missing_split(tmp_path, capsys):
    make_tree(tmp_path, "cityscapes", n=2)
    shutil.rmtree(tmp_path / "gtFine")  # images unpacked, labels forgotten
    assert main(["--dataset", "cityscapes", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gtFine' / 'val'} is missing" in err and "Nothing was marked prepared" in err
    assert err.count("\n") < 10 and "skip_bad" not in err  # one message, not one per file
    assert not list(tmp_path.glob(".pwda_prepared_*")) and not (tmp_path / "gtFine_trainIds").exists()


def test_out_of_date_prepared_tree_says_rerun_prepare(tmp_path):
    made = make_tree(tmp_path / "g", "gta5", n=3)
    assert main(["--dataset", "gta5", "--root", str(tmp_path / "g"), "--out", str(tmp_path / "p")]) == 0
    (tmp_path / "p" / "labels_trainIds" / made[1][1].name).unlink()  # e.g. deleted, or a frame added later
    cfg = config.load(None, {"data.source": "gta5", "data.source_root": str(tmp_path / "g"),
                             "data.source_prepared": str(tmp_path / "p"), "data.skip_bad": True}).data
    with pytest.raises(ValueError) as info:
        build_datasets(cfg)
    msg = str(info.value)
    assert f"although the raw label {made[1][1]} is there" in msg
    assert f"rerun `pwda-prepare --dataset gta5 --root {tmp_path / 'g'} --out {tmp_path / 'p'}`" in msg
