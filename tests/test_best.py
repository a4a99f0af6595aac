"""best.pt and best.json: the highest target mIoU of a run, kept through keep_last, resume and failures."""

import json

import pytest
import torch
from helpers import as_argv, disk_full_on_save, tiny_overrides

from pwda_fast import checkpoint, evaluate, train, visualize

# A toy generator small enough for several runs per test file.
TINY_MODEL = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
              "model.aux_disc_width": 8}


def _state(step: int) -> dict:
    return {"step": step, "g": {"w": torch.full((3,), float(step))}, "config": {}}


def test_save_best_keeps_the_strictly_highest_miou(tmp_path):
    assert checkpoint.best_score(tmp_path) is None
    written = [checkpoint.save_best(tmp_path, step, {"miou": miou, "iou": {}}, _state(step))
               for step, miou in ((1, 30.0), (2, 25.0), (3, 41.5), (4, 41.5), (5, 12.0))]
    assert written == [True, False, True, False, False]
    assert checkpoint.best_score(tmp_path) == {"step": 3, "miou": 41.5, "checkpoint": "best.pt"}
    saved = checkpoint.load(tmp_path / "best.pt")
    assert saved["step"] == 3 and torch.equal(saved["g"]["w"], torch.full((3,), 3.0))
    assert saved["best"] == {"miou": 41.5}
    assert not list(tmp_path.glob(".tmp-*"))


def test_best_json_records_the_synthia_protocols(tmp_path):
    result = {"miou": 40.0, "miou16": 44.0, "miou13": 50.0, "iou": {"road": 90.0}, "protocol": "single"}
    checkpoint.save_best(tmp_path, 7, result, _state(7))
    assert checkpoint.best_score(tmp_path) == {"step": 7, "miou": 40.0, "miou16": 44.0, "miou13": 50.0,
                                               "checkpoint": "best.pt"}


def test_keep_last_never_removes_best_and_latest_never_names_it(tmp_path):
    checkpoint.save_best(tmp_path, 1, {"miou": 10.0}, _state(1))
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, _state(step), keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "ckpt_00000005.pt"]
    (tmp_path / "latest").unlink()
    (tmp_path / "ckpt_00000005.pt").unlink()
    assert checkpoint.latest(tmp_path) is None  # best.pt is not a checkpoint to resume from
    assert checkpoint.load(tmp_path / "best.pt")["step"] == 1


def test_a_failed_best_write_leaves_the_previous_best(tmp_path, monkeypatch):
    checkpoint.save_best(tmp_path, 1, {"miou": 10.0}, _state(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    disk_full_on_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_best(tmp_path, 2, {"miou": 20.0}, _state(2))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")}
    assert after == before


@pytest.mark.parametrize("text", ["{not json", '{"step": 3}', '{"step": "3", "miou": 1.0}', "[]"])
def test_unreadable_best_json_is_refused_not_overwritten(tmp_path, text):
    (tmp_path / "best.json").write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=r"best.json is .*delete it and best.pt"):
        checkpoint.save_best(tmp_path, 1, {"miou": 99.0}, _state(1))
    assert (tmp_path / "best.json").read_text() == text and not (tmp_path / "best.pt").exists()


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """4 steps evaluated after each one, stopped after step 2 and resumed; evaluation replaced by a
    script of mIoUs (30, 50 | 40, 45) so that the best (step 2) comes before the resume."""
    run_dir = tmp_path_factory.mktemp("best_run")
    scripted = iter([30.0, 50.0, 40.0, 45.0])
    argv = as_argv(tiny_overrides(run_dir, **TINY_MODEL, **{"train.eval_every": 1, "train.keep_last": 1}))
    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.inference, "evaluate_model",
                   lambda *a, **k: {"miou": next(scripted), "iou": {}, "protocol": "single"})
        mp.setattr(train.tqdm, "write", logs.append)
        assert train.main(argv + ["--train.stop_at=2"]) == 0
        g_at_2 = checkpoint.load(run_dir / "ckpt_00000002.pt")["g"]
        first = list(logs)
        assert train.main(argv) == 0
    return run_dir, g_at_2, first, logs[len(first):]


def test_run_keeps_its_best_evaluation_through_a_resume(resumed_run):
    run_dir, g_at_2, first, second = resumed_run
    assert "step 2: target mIoU 50.00 (best so far: wrote best.pt)" in first
    assert "best so far: target mIoU 50.00 at step 2 (best.pt)" in second  # known on resume
    assert any(ln.startswith("step 3: target mIoU 40.00") and "best" not in ln for ln in second)
    assert checkpoint.best_score(run_dir) == {"step": 2, "miou": 50.0, "checkpoint": "best.pt"}
    assert not (run_dir / "ckpt_00000002.pt").exists()  # keep_last=1 removed it, not best.pt
    best = checkpoint.load(run_dir / "best.pt")
    assert best["step"] == 2 and best["best"] == {"miou": 50.0}
    assert not {"opt_g", "opt_d", "opt_d_aux", "rng_cpu"} & set(best)
    assert best["g"].keys() == g_at_2.keys()
    assert all(torch.equal(best["g"][k], g_at_2[k]) for k in g_at_2)
    final = checkpoint.load(checkpoint.latest(run_dir))
    assert final["step"] == 4 and not all(torch.equal(final["g"][k], g_at_2[k]) for k in g_at_2)


def test_evaluate_and_visualize_accept_best_pt(resumed_run, tmp_path, capsys):
    run_dir = resumed_run[0]
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["miou"] <= 100.0 and result["protocol"] == "single"
    assert visualize.main(["--checkpoint", str(run_dir / "best.pt"), "--images", "1",
                           "--out", str(tmp_path / "pictures")]) == 0
    assert len(list((tmp_path / "pictures").glob("*_pred.png"))) == 1
    assert len(list((tmp_path / "pictures").glob("*_maps.png"))) == 1
    assert "wrote" in capsys.readouterr().out
