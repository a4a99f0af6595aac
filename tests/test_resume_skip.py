"""A skipped step right after a resume leaves the run exactly where the same run, uninterrupted, is.

A skipped step puts back what its forward passes changed (BatchNorm statistics, MRNet's running class
weight) through views the Adapter took of those tensors when it was built (adapt.Snapshot). A resume
loads the checkpoint into a freshly built engine; if loading replaced one of those tensors instead of
copying into it, the restore would write into the old one and the skipped step would keep its update.
Each case saves after two good steps, resumes into a new engine as checkpoint.resume does, then takes a
step with a NaN in a source image (skipped) and a good one on both, and compares every tensor.
"""

import math

import pytest
import torch
from helpers import run_step
from test_skipped_step import changed, changed_kinds, state_of

from pwda_fast import checkpoint, config, distributed, engine

CPU = torch.device("cpu")
BATCH_CROP = (32, 64)  # of the `batches` fixture (conftest.py)
# Toy size, with MRNet's running class weight in every case.
TOY = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
       "model.aux_disc_width": 8, "data.crop": list(BATCH_CROP), "kernels.loss": "torch",
       "adapt.class_balance": True, "adapt.often_balance": True}
pytestmark = pytest.mark.usefixtures("one_thread")


def nan_source(batch: dict) -> dict:
    image = batch["image"].clone()
    image[0, 0, 0, 0] = math.nan
    return {**batch, "image": image}


def continue_with_a_skip(eng, batches, step: int) -> list[tuple[list, dict]]:
    """Step `step` with a NaN source image (skipped), then step + 1 as it comes -> after each, the losses
    (as text: NaN != NaN) and every tensor of state_of."""
    out = []
    for i, bad in ((step, True), (step + 1, False)):
        source, target = batches[i % len(batches)]
        losses, stepped = run_step(eng.adapter, i, nan_source(source) if bad else source, target)
        assert stepped is not bad
        out.append(([f"{k}={v!r}" for k, v in losses.items()], state_of(eng)))
    return out


@pytest.mark.parametrize("overrides", [
    {"model.bn": "train"},
    {"model.bn": "stats"},
    {"model.bn": "frozen", "model.head_norm": "bn"},  # the backbone in eval mode, BN in the heads
    {"adapt.adversary": "mrnet", "adapt.weighting": "none"},
    {"train.amp": "fp16"},  # the NaN step is an overflow: the scale halves
], ids=["bn-train", "bn-stats", "bn-frozen-bn-heads", "mrnet-adversary", "fp16"])
def test_a_skipped_step_after_a_resume_equals_the_uninterrupted_run(batches, tmp_path, overrides):
    def run_config() -> config.Config:  # final, as train.py holds it
        return engine.finalize(config.load("toy", {**TOY, **overrides})).cfg

    whole = engine.build(run_config(), CPU)
    for i in range(2):
        assert run_step(whole.adapter, i, *batches[i])[1]
    before = state_of(whole)
    checkpoint.save(tmp_path, 2, checkpoint.training_state(whole, 2, run_config(), 1, 0))
    uninterrupted = continue_with_a_skip(whole, batches, 2)

    resumed = engine.build(run_config(), CPU)
    assert checkpoint.resume(tmp_path, resumed, run_config(), distributed.Dist(), log=print) == (2, 0)
    assert changed(before, state_of(resumed)) == []
    after_resume = continue_with_a_skip(resumed, batches, 2)

    for (want_losses, want), (got_losses, got), what in zip(uninterrupted, after_resume, ("skipped", "good")):
        assert got_losses == want_losses, what
        assert changed(want, got) == [], f"after the {what} step"
    # The comparison had something to see: the skipped step left every state as it was, and the good
    # step moves the BN statistics (backbone or heads) and the running class weight.
    overflow = ["scaler.scale", "scaler._growth_tracker"] if "train.amp" in overrides else []
    assert changed(before, uninterrupted[0][1]) == overflow
    assert {"g BN statistics", "often"} <= changed_kinds(changed(uninterrupted[0][1], uninterrupted[1][1]))

