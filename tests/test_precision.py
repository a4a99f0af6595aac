"""Fast paths of the engine on CPU: bf16 autocast, channels_last, optimizer implementations, compile."""

import json
import sys

import pytest
import torch
from helpers import as_argv, run_step, tiny_overrides

from pwda_fast import config, engine, train
from pwda_fast.models import Nets, build_networks

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")
BATCH_CROP = (48, 96)  # of the `batches` fixture (conftest.py)


def _losses(batches, **overrides) -> list[dict]:
    cfg = config.load("toy", {"data.crop": [48, 96], "kernels.loss": "torch", **overrides})
    eng = engine.build(cfg, CPU)
    out = []
    for step, (s, t) in enumerate(batches):
        losses, stepped = run_step(eng.adapter, step, s, t)
        assert stepped
        out.append(losses)
    assert all(p.dtype == torch.float32 for p in eng.nets.g.parameters())  # fp32 master weights
    return out


def test_channels_last_matches_contiguous_fp32(batches):
    want = _losses(batches)
    got = _losses(batches, **{"train.channels_last": True})
    for w, g in zip(want, got):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-6)


def test_bf16_autocast_with_channels_last_is_finite_and_close_to_fp32(batches):
    want = _losses(batches)
    got = _losses(batches, **{"train.amp": "bf16", "train.channels_last": True})
    for step, (w, g) in enumerate(zip(want, got)):
        assert set(g) == set(w)
        for name in w:
            assert torch.isfinite(torch.tensor(g[name])), f"step {step} {name} = {g[name]}"
            # bf16 keeps 8 bits of mantissa: about 0.4 % per rounding, a few % through the network
            assert g[name] == pytest.approx(w[name], rel=0.05, abs=1e-3), f"step {step} {name}"


def test_optimizers_fused_by_default_plain_torch_on_request():
    cfg = config.load("toy")
    nets = Nets(*build_networks(cfg.model))
    for opt in engine.build_optimizers(cfg.optim, nets):
        assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    cfg = config.load("toy", {"optim.impl": "torch"})
    for opt in engine.build_optimizers(cfg.optim, nets):
        assert not opt.defaults["foreach"] and not opt.defaults.get("fused")


def test_apex_without_apex_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "apex", None)  # "import apex.optimizers" now fails, installed or not
    cfg = config.load("toy", {"optim.impl": "apex"})
    with pytest.raises(config.ConfigError, match="optim.impl=apex needs NVIDIA apex.*use optim.impl=auto"):
        engine.build_optimizers(cfg.optim, Nets(*build_networks(cfg.model)))
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"optim.impl": "apex"}))) == train.EXIT_CONFIG
    assert "optim.impl=apex needs NVIDIA apex" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_networks_train_two_steps(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"train.compile": True, "train.iters": 2, "data.batch_size": 1,
                                            "train.eval_images": 1})
    assert train.main(as_argv(overrides)) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines() if "seg" in ln]
    assert [ln["step"] for ln in lines] == [1, 2] and all(ln["skipped"] == 0 for ln in lines)


class _CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bf16 casts of the tensors whose storage `watched` holds (by data pointer)."""

    def __init__(self, watched):
        super().__init__()
        self.watched, self.casts = {t.data_ptr() for t in watched}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                and args[0].data_ptr() in self.watched):
            self.casts += 1
        return func(*args, **kwargs)


def _bf16_engine(weighting="gen+dis"):
    cfg = config.load("toy", {"data.crop": [48, 96], "kernels.loss": "torch", "train.amp": "bf16",
                              "adapt.weighting": weighting})
    return engine.build(cfg, CPU)


@pytest.mark.parametrize("weighting", ["none", "gen+dis"])
def test_weight_casts_kept_for_the_whole_iteration(batches, monkeypatch, weighting):
    """Under bf16 autocast each of G's weights is cast once per iteration (stage 1's cast serves stage
    2), and keeping the casts changes no bit of the step: losses, every parameter and buffer."""
    import contextlib

    steps = {}
    for keep in (True, False):
        eng = _bf16_engine(weighting)
        if not keep:
            monkeypatch.setattr(eng.adapter, "cast_cache", contextlib.nullcontext)
        weights = [p for p in eng.nets.g.parameters() if p.dim() > 1]  # conv weights
        with _CastCounter(weights) as counter:
            losses = [run_step(eng.adapter, i, s, t)[0] for i, (s, t) in enumerate(batches)]
        steps[keep] = (counter.casts, losses, {(i, k): v.clone() for i, net in enumerate(eng.nets)
                                               for k, v in net.state_dict().items()})
    kept, uncached = steps[True][0], steps[False][0]
    n = len(batches) * len(weights)
    assert kept == n and uncached == 2 * n, (kept, uncached, n)
    assert steps[True][1] == steps[False][1]
    for k, v in steps[True][2].items():
        assert torch.equal(v, steps[False][2][k]), k
