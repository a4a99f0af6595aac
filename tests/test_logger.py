"""MetricsLogger: JSON lines on rank 0 only; TensorBoard scalars and pictures, or a clear error."""

import importlib.util
import json
import sys

import pytest

from pwda_fast import config, pictures
from pwda_fast.logger import LoggerError, MetricsLogger

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_writes_json_lines_on_rank_zero_only(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    logger.write({"step": 1, "seg": 2.5, "skipped": 0})
    logger.write({"step": 1, "eval": True, "miou": 12.0})
    logger.close()
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "seg": 2.5, "skipped": 0}, {"step": 1, "eval": True, "miou": 12.0}]
    other = tmp_path / "rank1"
    other.mkdir()
    MetricsLogger(other, enabled=False, tensorboard=False).write({"step": 1, "seg": 1.0})
    assert not (other / "metrics.jsonl").exists()


def test_missing_tensorboard_is_a_clear_error_on_every_rank(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for enabled in (True, False):
        with pytest.raises(LoggerError, match=r"log.tensorboard=true needs the tensorboard package"):
            MetricsLogger(tmp_path, enabled=enabled, tensorboard=True)


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard extra")
def test_tensorboard_gets_scalars_and_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pwda_fast.data import build_val
    from pwda_fast.models import build_networks

    cfg = config.load("toy")
    g, _, d_aux = build_networks(cfg.model)
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.write({"step": 2, "seg": 1.5, "adv": float("nan"), "skipped": 0})
    logger.write({"step": 2, "eval": True, "miou": 30.0})
    val = build_val(cfg.data, log=lambda _: None)
    logger.images(2, pictures.training_figures(g, d_aux, val, cfg.adapt, 1))
    logger.close()
    assert g.training and d_aux.training  # modes restored after drawing
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/seg", "train/skipped", "eval/miou"} <= set(tags["scalars"])
    assert "train/adv" not in tags["scalars"]  # non-finite values stay in metrics.jsonl only
    assert events.Scalars("eval/miou")[0].value == 30.0 and events.Scalars("eval/miou")[0].step == 2
    assert {"target_0/prediction", "target_0/weighting_maps"} <= set(tags["images"])
