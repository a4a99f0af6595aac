"""A skipped step (a non-finite loss or gradient) leaves every state it could have touched as it was.

The step's forward passes have already moved BatchNorm statistics (model.bn "train" and the paper's
"stats" in the backbone; BN heads in every mode) and MRNet's running class weight `often` when the
finite check fails; the optimizers have momentum and Adam moments to lose; under fp16 the loss scaler
counts good steps. Each test compares all of them before and after a skipped step, then takes the
same step unskipped to show that it does change each of them (so the comparison had something to see).
"""

import math

import pytest
import torch
from helpers import InfGrad, run_step

from pwda_fast import config, engine, reference

CPU = torch.device("cpu")
# MRNet at toy size with the paper's recipe: class balance with the running weight, hard pixels, the
# memory term from the first step.
RECIPE = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
          "model.aux_disc_width": 8, "data.crop": [32, 64], "kernels.loss": "torch",
          "adapt.class_balance": True, "adapt.often_balance": True, "adapt.hard_pixels": 80.0,
          "adapt.memory": True, "adapt.memory_start": 0, "optim.nesterov": True}


pytestmark = pytest.mark.usefixtures("one_thread")
BATCH_CROP = (32, 64)  # of the `batches` fixture (conftest.py)


def build(device=CPU, **overrides) -> engine.Engine:
    return engine.build(config.load("toy", {**RECIPE, **overrides}), torch.device(device))


def state_of(eng: engine.Engine) -> dict[str, torch.Tensor]:
    """Every tensor a step may change, by name: each network's parameters and buffers, each
    optimizer's state, the running class weight and the loss scaler's state."""
    out = {}
    for name, net in zip(("g", "d", "d_aux"), eng.nets):
        out.update({f"{name}.{k}": v.clone() for k, v in net.state_dict().items()})
    for name, opt in zip(("opt_g", "opt_d", "opt_d_aux"), eng.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"{name}.{pid}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    adapter = eng.adapter.state_dict()
    if adapter["often"] is not None:
        out["often"] = adapter["often"].clone()
    out.update({f"scaler.{k}": torch.tensor(v) for k, v in adapter["scaler"].items()})
    return out


def changed(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


class NaNValue(torch.autograd.Function):
    """A NaN value whose gradient is the identity's: a loss gone non-finite with finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return torch.full_like(x, math.nan)

    @staticmethod
    def backward(ctx, grad):
        return grad


def make_stage3_bad(monkeypatch, kind: str) -> None:
    """The next step's discriminator stage goes bad on D's source term (domain_bce's second call of a
    step, after the generator stage's D_aux term): stages 1 and 2 have run, BN statistics and the
    running class weight have moved. kind: "loss" (NaN loss and gradients), "gradient" (inf
    gradients, finite losses), "loss only" (a NaN loss, finite gradients)."""
    real, calls = reference.domain_bce, {"n": 0}

    def domain_bce(logits, label):
        calls["n"] += 1
        if calls["n"] != 2:
            return real(logits, label)
        if kind == "gradient":
            return real(InfGrad.apply(logits), label)
        loss = real(logits, label)
        return loss * math.nan if kind == "loss" else NaNValue.apply(loss)

    monkeypatch.setattr(reference, "domain_bce", domain_bce)


def assert_skip_restores_everything(eng, batches, monkeypatch, kind: str) -> list[str]:
    """Step 0 normally (momentum, Adam moments and `often` exist), step 1 made bad -> skipped with
    every state as before; then step 1 again, unskipped -> the names of the states it changes."""
    assert run_step(eng.adapter, 0, *batches[0])[1]
    before = state_of(eng)
    with monkeypatch.context() as m:
        make_stage3_bad(m, kind)
        losses, stepped = run_step(eng.adapter, 1, *batches[1])
    assert not stepped
    assert all(math.isfinite(v) for v in losses.values()) is (kind == "gradient")
    assert changed(before, state_of(eng)) == [], "the skipped step left these changed"
    assert run_step(eng.adapter, 1, *batches[1])[1]
    return changed(before, state_of(eng))


def changed_kinds(names: list[str]) -> set[str]:
    """State names -> their kinds: "g weights", "g BN statistics", "often", "opt_g", "scaler", ..."""
    kinds = set()
    for k in names:
        if k.startswith("g.") and ("running_" in k or "num_batches" in k):
            kinds.add("g BN statistics")
        elif k.startswith("g."):
            kinds.add("g weights")
        else:
            kinds.add(k.split(".")[0])
    return kinds


@pytest.mark.parametrize("kind", ["loss", "gradient"])
@pytest.mark.parametrize("bn, head_norm", [("train", "gn"), ("stats", "gn"), ("frozen", "bn")])
def test_skipped_step_restores_every_state(batches, monkeypatch, bn, head_norm, kind):
    """Each BN mode: "train" and the paper's "stats" move the backbone's statistics; "frozen" keeps
    the backbone's BN in eval mode, so MRNet's heads with BatchNorm carry the statistics there."""
    eng = build(**{"model.bn": bn, "model.head_norm": head_norm})
    moved = assert_skip_restores_everything(eng, batches, monkeypatch, kind)
    kinds = changed_kinds(moved)
    assert kinds >= {"g weights", "g BN statistics", "often", "opt_g", "opt_d", "opt_d_aux"}, kinds
    backbone_stats = [k for k in moved if k.startswith("g.layer") and "running_" in k]
    assert bool(backbone_stats) is (bn != "frozen")


def test_fp16_skip_for_a_loss_alone_keeps_the_scaler_state(batches, monkeypatch):
    """A step skipped for a non-finite loss whose gradients are finite did not overflow: the loss
    scale stays, and the scaler does not count it among the good steps that double the scale.
    (A gradient overflow halves the scale: tests/test_fp16.py.)"""
    eng = build(**{"train.amp": "fp16"})
    moved = changed_kinds(assert_skip_restores_everything(eng, batches, monkeypatch, "loss only"))
    assert "scaler" in moved and "often" in moved, moved  # the good step counts towards growth


def run_steps(eng, batches, monkeypatch, bad: set[int], steps: int = 4) -> list[tuple[dict, bool]]:
    """`steps` iterations over the batches, those in `bad` made non-finite (a NaN segmentation loss,
    so in every weighting mode)."""
    out, real = [], reference.seg_ce
    for i in range(steps):
        with monkeypatch.context() as m:
            if i in bad:
                m.setattr(reference, "seg_ce", lambda *a: real(*a) * math.nan)
            out.append(run_step(eng.adapter, i, *batches[i % len(batches)]))
    return out


@pytest.mark.parametrize("overrides", [
    {"adapt.weighting": "gen+dis"},
    {"adapt.weighting": "gen", "kernels.loss": "ext"},
    {"adapt.weighting": "none"},
    {"adapt.d_target": "normalized", "adapt.weight_grad": "flowing"},
    {"optim.backbone_repeats": True, "adapt.preheat_iters": 2},
    {"train.amp": "fp16"},
], ids=["gen+dis", "gen-ext", "none", "normalized-flowing", "backbone-repeats-preheat", "fp16"])
def test_skip_decided_on_the_device_equals_the_host_decision_bit_for_bit(batches, monkeypatch, overrides):
    """Fused optimizers skip on the device flag (no host sync): k steps with a skipped one in the
    middle leave every network, optimizer, running weight and scaler state and every loss exactly as
    the host-decided skip (the step before the device path existed) does."""
    runs = []
    for on_device in (True, False):
        eng = build(**overrides)
        decided = forced_skip_path(eng.adapter, on_device)
        runs.append((run_steps(eng, batches, monkeypatch, bad={2}), state_of(eng), decided))
    (device_steps, device_state, device_decided), (host_steps, host_state, _) = runs
    assert device_decided == [False, True, True, True]  # G's first step (no momentum yet) on the host
    assert [stepped for _, stepped in device_steps] == [True, True, False, True]
    nan_safe = lambda steps: [({k: repr(v) for k, v in losses.items()}, s) for losses, s in steps]  # noqa: E731
    assert nan_safe(device_steps) == nan_safe(host_steps)
    assert changed(device_state, host_state) == []


def forced_skip_path(adapter, on_device: bool) -> list[bool]:
    """Make `adapter` skip on the device where it can (on_device) or always on the host -> the list
    its own choice is recorded into, one entry per step."""
    real, decided = adapter.guard.skips_on_device, []

    def decide() -> bool:
        decided.append(real())
        return on_device and decided[-1]
    adapter.guard.skips_on_device = decide
    return decided


def test_a_skipped_first_step_leaves_no_momentum_and_the_next_is_a_first_step(batches, monkeypatch):
    """Fused SGD would keep uninitialised momentum from a skipped first step: that step goes through
    the host, creates no optimizer state, and the next one starts as a first step does."""
    eng = build(**{"optim.backbone_repeats": True})
    before = state_of(eng)
    assert not eng.adapter.guard.skips_on_device()
    run_steps(eng, batches, monkeypatch, bad={0}, steps=1)
    assert changed(before, state_of(eng)) == [] and not eng.optimizers.g.state
    fresh = build(**{"optim.backbone_repeats": True})
    results = []
    for e in (eng, fresh):
        torch.manual_seed(1)  # the heads' dropout draws the same masks in both
        results.append(run_step(e.adapter, 0, *batches[1]))
    assert results[0] == results[1]
    assert changed(state_of(fresh), state_of(eng)) == [] and eng.adapter.guard.skips_on_device()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overrides", [{}, {"train.amp": "fp16", "kernels.loss": "ext"},
                                       {"train.amp": "bf16", "optim.backbone_repeats": True}],
                         ids=["fp32", "fp16-ext", "bf16-repeats"])
def test_cuda_skip_on_the_device_restores_every_state(batches, monkeypatch, overrides):
    """On the GPU the fused optimizers skip on the device flag (no host sync from step 1 on): a
    skipped step leaves every weight, BN statistic, optimizer state, running weight and scale
    exactly as it was, and the same step unskipped changes them."""
    eng = build("cuda", **overrides)
    cuda_batches = [tuple({k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in pair)
                    for pair in batches]
    decided = forced_skip_path(eng.adapter, on_device=True)
    # Under fp16 a non-finite gradient is an overflow that halves the scale (tests/test_fp16.py): here
    # the kind that must leave the scaler as it was.
    for kind in ("loss only",) if overrides.get("train.amp") == "fp16" else ("loss", "gradient"):
        moved = changed_kinds(assert_skip_restores_everything(eng, cuda_batches, monkeypatch, kind))
        assert moved >= {"g weights", "g BN statistics", "often", "opt_g", "opt_d", "opt_d_aux"}, moved
    assert decided[0] is False and all(decided[1:])
