"""train.amp=fp16: autocast plus one dynamic loss scale over the three optimizers, on CPU.

fp16 convolutions take torch's slow CPU path (13x fp32 on the toy step), so these runs are 2-4 tiny steps.
"""

import functools
import math

import pytest
import torch
from helpers import (
    InfGrad,
    as_argv,
    assert_same_networks,
    assert_same_optimizers,
    run_step,
    tiny_overrides,
    training_lines,
)

from pwda_fast import checkpoint, config, engine, inference, reference, train
from pwda_fast.skips import SkipCounter

CPU = torch.device("cpu")
BATCH_CROP = (32, 64)  # the shared `batches` fixture (conftest.py)
TINY = {"data.crop": [32, 64], "train.amp": "fp16", "train.eval_images": 1, "train.threads": 1}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def run(overrides: dict) -> int:
    return train.main(as_argv(overrides))


def start_scale_at(monkeypatch, scale: float) -> None:
    """Scalers built from now on start at `scale` instead of torch's 65536."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=scale))


def inf_gradient_on_call(monkeypatch, n: int) -> None:
    """reference.domain_bce's n-th call passes an inf gradient to its logits (in stage 2 or 3)."""
    real, calls = reference.domain_bce, {"n": 0}

    def domain_bce(logits, label):
        calls["n"] += 1
        return real(InfGrad.apply(logits) if calls["n"] == n else logits, label)

    monkeypatch.setattr(reference, "domain_bce", domain_bce)


def tensors(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def optimizer_tensors(opt) -> dict:
    return {(pid, k): v.clone() for pid, st in opt.state_dict()["state"].items() for k, v in st.items()}


def fp16_engine(**overrides):
    cfg = config.load("toy", {**TINY, "kernels.loss": "torch", **overrides})
    return engine.build(cfg, CPU)


def test_fp16_resume_matches_uninterrupted_run_and_calibration_skips_do_not_stop_it(tmp_path, monkeypatch):
    # A start scale the toy gradients overflow at: the first steps calibrate, and the scale at the
    # interruption differs from the start, so a resume that lost the scaler's state would diverge.
    start_scale_at(monkeypatch, 2.0**18)
    common = {**TINY, "train.iters": 4, "train.ckpt_every": 100, "train.max_skips": 1}
    assert run(tiny_overrides(tmp_path / "full", **common)) == 0
    full = training_lines(tmp_path / "full")
    assert all(math.isfinite(v) for r in full for k, v in r.items() if k in ("seg", "adv", "d", "d_aux"))
    assert full[1]["skipped"] >= 1, "precondition: the start scale overflows, so step 1 or 2 calibrates"
    assert full[-1]["skipped"] < 4, "precondition: the scale settles and the run trains"
    # max_skips=1 and at least one skip, yet exit 0: calibration skips do not count towards it.

    assert run(tiny_overrides(tmp_path / "split", **common, **{"train.stop_at": 2})) == 0
    assert run(tiny_overrides(tmp_path / "split", **common)) == 0
    a = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["step"] == b["step"] == 4
    assert a["adapter"]["scaler"] == b["adapter"]["scaler"]
    assert a["adapter"]["scaler"]["scale"] < 2.0**18
    assert_same_networks(a, b)
    assert_same_optimizers(a, b)
    split = training_lines(tmp_path / "split")
    row = lambda r: (r["seg"], r["d"], r["skipped"])  # noqa: E731
    assert [row(r) for r in full] == [row(r) for r in split]


def test_scaler_state_is_part_of_the_adapter_state(batches):
    trained = fp16_engine().adapter
    run_step(trained, 0, *batches[0])
    state = trained.state_dict()["scaler"]
    assert state["scale"] == 65536.0 and state["_growth_tracker"] == 1  # one step without overflow
    fresh = fp16_engine().adapter
    fresh.load_state_dict({"often": None, "scaler": {**state, "scale": 512.0}})
    assert fresh.state_dict()["scaler"] == {**state, "scale": 512.0}
    run_step(fresh, 0, *batches[0])  # the loaded scale is the one the next step uses and updates
    assert fresh.state_dict()["scaler"]["scale"] == 512.0
    assert fresh.state_dict()["scaler"]["_growth_tracker"] == 2
    assert fp16_engine(**{"train.amp": "bf16"}).adapter.state_dict()["scaler"] == {}
    # A checkpoint written without fp16 (resumed with --train.resume=force) leaves the scaler fresh.
    fresh = fp16_engine().adapter
    fresh.load_state_dict({"often": None, "scaler": {}})
    assert fresh.guard.scaler.get_scale() == 65536.0


def test_gradient_overflow_skips_all_three_optimizers_and_halves_the_scale(batches, monkeypatch):
    eng = fp16_engine()
    run_step(eng.adapter, 0, *batches[0])
    before = [tensors(net.state_dict()) for net in eng.nets]
    opt_before = [optimizer_tensors(opt) for opt in eng.optimizers]
    inf_gradient_on_call(monkeypatch, 2)  # stage 3's D loss: only D's gradients overflow
    report = eng.adapter.launch(1, *batches[1]).read()
    assert not report.stepped and report.calibrating
    assert all(math.isfinite(v) for v in report.losses.values())  # an overflow, not a non-finite loss
    assert eng.adapter.guard.scaler.get_scale() == 32768.0
    for name, net, want in zip(("g", "d", "d_aux"), eng.nets, before):
        got = tensors(net.state_dict())  # weights and (restored) BatchNorm statistics and counts untouched
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    for name, opt, want in zip(("g", "d", "d_aux"), eng.optimizers, opt_before):
        got = optimizer_tensors(opt)  # no step taken: momentum, Adam moments and step counts as before
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items()), name


def test_injected_gradient_inf_counts_once_and_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    # domain_bce's calls per step: stage 2 D_aux, stage 3 D (source half), stage 3 D_aux (two);
    # call 6 is step 2's stage-3 D term.
    inf_gradient_on_call(monkeypatch, 6)
    assert run(tiny_overrides(tmp_path, **TINY, **{"train.iters": 3, "train.max_skips": 1})) == 0
    assert [r["skipped"] for r in training_lines(tmp_path)] == [0, 1, 1]
    out = capsys.readouterr().out
    assert "step 2: fp16 gradient overflow; loss scale lowered to 32768, skipped all three optimizer " \
           "steps (1 skipped in all)" in out
    assert "non-finite" not in out
    assert checkpoint.load(checkpoint.latest(tmp_path))["adapter"]["scaler"]["scale"] == 32768.0


def test_overflow_below_scale_one_counts_towards_max_skips(batches, monkeypatch):
    cfg = config.load("toy", {**TINY, "train.max_skips": 1})
    adapter = engine.build(cfg, CPU, backend="torch").adapter
    adapter.load_state_dict({"scaler": {**adapter.guard.scaler.state_dict(), "scale": 1.0}})
    inf_gradient_on_call(monkeypatch, 1)
    report = adapter.launch(0, *batches[0]).read()
    assert not report.stepped and not report.calibrating and report.scale == 0.5
    skips = SkipCounter(cfg, log=lambda msg: None)
    with pytest.raises(train.NonFiniteError, match="1 consecutive non-finite steps"):
        skips.record(1, report)
    assert skips.skipped == 1


def test_fp16_prediction_is_fp32_and_close_to_fp32(batches):
    g = fp16_engine().nets.g.eval()
    image = batches[0][0]["image"]
    want = inference.predict(g, image, (32, 64))
    got = inference.predict(g, image, (32, 64), amp="fp16")
    assert got.dtype == torch.float32 and got.shape == want.shape
    # fp16 keeps 11 bits of mantissa: about 0.05 % per rounding, under 1 % through the network
    assert torch.allclose(got, want, rtol=0.01, atol=0.01 * want.abs().max().item())
