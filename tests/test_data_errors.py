"""Data problems a user meets on real trees: a message naming the file and exit 2, never a traceback,
and JPEG copies read only by the training sets that ask for them."""

import pytest
import torch
from data_trees import make_tree
from helpers import as_argv

from pwda_fast import config, train
from pwda_fast.data import build_datasets, dali
from pwda_fast.data.loader import DataError
from pwda_fast.data.prepare import prepare


def _overrides(tmp_path, **extra) -> dict:
    """A GTA5 -> Cityscapes run on fixture trees small enough for a test."""
    return {"data.source": "gta5", "data.source_root": str(tmp_path / "gta5"), "data.target": "cityscapes",
            "data.target_root": str(tmp_path / "city"), "data.source_size": [64, 48],
            "data.target_size": [64, 48], "data.crop": [32, 32], "data.batch_size": 2, "data.workers": 0,
            "train.run_dir": str(tmp_path / "run"), "train.iters": 4, "train.eval_every": 0,
            "train.ckpt_every": 2, "train.log_every": 1, **extra}


@pytest.fixture
def trees(tmp_path):
    made = make_tree(tmp_path / "gta5", "gta5", n=4)
    make_tree(tmp_path / "city", "cityscapes", n=2)
    return made


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # the header survives: only decoding finds it


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_mid_run_is_exit_2_naming_the_file(tmp_path, trees, capsys, workers):
    image = trees[2][0]
    _truncate(image)
    assert train.main(as_argv(_overrides(tmp_path, **{"data.workers": workers}))) == 2
    err = capsys.readouterr().err
    assert f"\nerror: data: {image}: the image does not decode" in err and "data.skip_bad=true" in err
    assert "Traceback" not in err and "worker process" not in err  # the worker's traceback is stripped


def test_truncated_file_with_skip_bad_is_skipped_and_reported(tmp_path, trees, capsys):
    _truncate(trees[1][0])
    assert train.main(as_argv(_overrides(tmp_path, **{"data.skip_bad": True}))) == 0
    out = capsys.readouterr().out
    assert f"warning: skipped {trees[1][0]}: the image does not decode" in out
    assert (tmp_path / "run" / "final.json").is_file()


def test_truncated_label_names_the_label(tmp_path, trees, capsys):
    _truncate(trees[0][1], keep=0.95)
    assert train.main(as_argv(_overrides(tmp_path))) == 2
    assert f"{trees[0][1]}: the label does not decode" in capsys.readouterr().err


@pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
def test_dali_on_an_unprepared_tree_is_exit_2_before_the_run_folder_exists(tmp_path, trees, capsys):
    assert train.main(as_argv(_overrides(tmp_path, **{"data.loader": "dali"}))) == 2
    err = capsys.readouterr().err
    assert "data.loader=dali cannot run" in err and "pwda-prepare --dataset" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_jpeg_copies_are_read_only_by_training_sets_that_ask(tmp_path, trees):
    prepare("gta5", tmp_path / "gta5", jpeg=True, progress=False)
    prepare("cityscapes", tmp_path / "city", jpeg=True, progress=False)

    def suffixes(device="cpu", **data) -> dict:
        cfg = config.load(None, _overrides(tmp_path, **{f"data.{k}": v for k, v in data.items()})).data
        sets = build_datasets(cfg, device=torch.device(device))
        return {role: {image.suffix for image, _ in ds.pairs} for role, ds in sets.items()}

    assert suffixes() == {"source": {".png"}, "target": {".png"}, "val": {".png"}}  # CPU, torch loader
    assert suffixes(image_format="jpeg") == {"source": {".jpg"}, "target": {".jpg"}, "val": {".png"}}
    if dali.available():  # "auto" picks the copies where DALI decodes on a GPU (choosing touches no GPU)
        assert suffixes("cuda") == {"source": {".jpg"}, "target": {".jpg"}, "val": {".png"}}
        assert suffixes("cuda", image_format="original")["source"] == {".png"}


def test_jpeg_asked_without_copies_says_how_to_make_them(tmp_path, trees):
    prepare("gta5", tmp_path / "gta5", progress=False)
    cfg = config.load(None, _overrides(tmp_path, **{"data.image_format": "jpeg"})).data
    command = f"pwda-prepare --dataset gta5 --root {tmp_path / 'gta5'} --jpeg"
    with pytest.raises(DataError, match=f"run `{command}`"):
        build_datasets(cfg)


@pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI is not installed")
def test_corrupt_file_in_a_dali_pipeline_is_exit_2_with_what_to_do(tmp_path, trees, capsys):
    prepare("gta5", tmp_path / "gta5", progress=False)
    prepare("cityscapes", tmp_path / "city", progress=False)
    _truncate(trees[1][0])
    assert train.main(as_argv(_overrides(tmp_path, **{"data.loader": "dali"}))) == 2
    err = capsys.readouterr().err
    assert "error: data: DALI could not read a batch" in err and 'data.validate="full"' in err
    assert "Traceback" not in err
