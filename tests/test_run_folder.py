"""RunFolder: the names on disk (what users, scripts and old runs rely on) and its JSON records."""

import json

import pytest

from pwda_fast import config
from pwda_fast.run_folder import RunFolder


def test_file_names_on_disk(tmp_path):
    folder = RunFolder(tmp_path)
    names = {"config": "config.json", "metrics": "metrics.jsonl", "final": "final.json",
             "tensorboard": "tensorboard", "latest": "latest", "best": "best.pt", "best_record": "best.json"}
    assert {attr: getattr(folder, attr) for attr in names} == {a: tmp_path / n for a, n in names.items()}
    assert folder.checkpoint(1234) == tmp_path / "ckpt_00001234.pt"


def test_checkpoints_oldest_first_and_only_true_checkpoint_names(tmp_path):
    assert RunFolder(tmp_path / "not-yet").checkpoints() == []
    for name in ("ckpt_00000020.pt", "ckpt_00000003.pt", "ckpt_3.pt", "ckpt_00000009.pt.corrupt",
                 ".tmp-ckpt_00000030.pt.77", "best.pt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in RunFolder(tmp_path).checkpoints()] == ["ckpt_00000003.pt", "ckpt_00000020.pt"]
    for name in ("../ckpt_00000001.pt", "/tmp/ckpt_00000001.pt", "ckpt_00000001.pt.corrupt", "best.pt"):
        assert not RunFolder.is_checkpoint(name)


def test_config_round_trip_and_none_without_one(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_config() is None
    cfg = config.load("toy", {"train.iters": 9})
    folder.write_config(cfg)
    assert folder.config.read_text() == cfg.to_json()
    assert folder.read_config() == json.loads(cfg.to_json())


def test_metrics_lines_written_read_by_kind_and_dropped_after_a_step(tmp_path):
    folder = RunFolder(tmp_path)
    records = [{"step": 2, "seg": 1.0}, {"step": 1, "seg": 2.0}, {"step": 2, "eval": True, "miou": 10.0},
               {"step": 1, "eval": True, "miou": 5.0}, {"step": 2, "eval": True, "miou": 11.0}]
    for r in records:
        folder.append_metrics(r)
    assert folder.metrics.read_text() == "".join(json.dumps(r) + "\n" for r in records)
    train, evals = folder.read_metrics()
    assert train == [records[1], records[0]]
    assert evals == [records[3], records[2], records[4]]  # by step; one step's lines keep their order
    folder.drop_metrics_after(1)
    assert folder.read_metrics() == ([records[1]], [records[3]])
    RunFolder(tmp_path / "nothing").drop_metrics_after(0)  # no file: nothing to drop, nothing written
    assert not (tmp_path / "nothing").exists()


def test_missing_metrics_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist; .* not the run_dir"):
        RunFolder(tmp_path).read_metrics()


def test_final_written_as_indented_json(tmp_path):
    folder = RunFolder(tmp_path)
    result = {"miou": 41.234567890123, "iou": [0.5, 0.25]}
    folder.write_final(result)
    assert folder.final.read_text() == json.dumps(result, indent=2)
    assert folder.read_final() == result
