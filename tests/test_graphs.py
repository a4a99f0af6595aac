"""train.cuda_graphs: everything around the capture, checked on CPU by a capture that replays the
iteration eagerly; the capture itself on CUDA (marked gpu, run by bench/gpu_check.sh)."""

import math

import pytest
import torch
from test_skipped_step import RECIPE, changed, state_of

from pwda_fast import config, distributed, engine, graphs, reference

BATCH_CROP = (32, 64)
# Phases change at step 3 (the preheat ends) and 4 (the memory term starts counting).
PHASED = {**RECIPE, "adapt.preheat_iters": 3, "adapt.memory_start": 4, "optim.backbone_repeats": True}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def run(adapter, batches, monkeypatch, steps: int = 8, bad: int = 6, device="cpu") -> list:
    """`steps` launches over the batches (step `bad` with a NaN segmentation loss), each read back."""
    reports, real = [], reference.seg_ce
    for i in range(steps):
        with monkeypatch.context() as m:
            if i == bad:
                m.setattr(reference, "seg_ce", lambda *a: real(*a) * math.nan)
            pair = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
                    for b in batches[i % len(batches)]]
            reports.append(adapter.launch(i, *pair).read())
    return reports


def test_graphed_launch_equals_the_eager_one_bit_for_bit(batches, monkeypatch):
    """Static batch buffers refilled, learning rates as device tensors filled before each replay, one
    capture per phase, the skip on the device flag: with a capture that replays eagerly, 8 steps over
    two phase changes and a skipped step equal the plain Adapter's to the bit."""
    cfg = config.load("toy", PHASED)
    eager, graphed = engine.build(cfg, torch.device("cpu")), engine.build(cfg, torch.device("cpu"))
    captures = []

    def capture(iteration):
        captures.append(graphed.adapter.phase(len(captures) + 2))
        return iteration

    wrapped = graphs.GraphedAdapter(graphed.adapter, warmup=2, capture=capture)
    torch.manual_seed(3)
    want = run(eager.adapter, batches, monkeypatch)
    torch.manual_seed(3)
    got = run(wrapped, batches, monkeypatch)
    assert [r.stepped for r in got] == [True] * 6 + [False, True]
    assert [repr(r) for r in got] == [repr(r) for r in want]
    assert changed(state_of(eager), state_of(graphed)) == []
    assert len(captures) == 3  # steps 2 (preheat), 3 (weighting on), 4 (memory on); none after
    assert all(torch.is_tensor(group["lr"]) for opt in graphed.optimizers for group in opt.param_groups)
    saved = graphed.optimizers.state_dict()
    assert all(isinstance(group["lr"], float) for opt in saved.values() for group in opt["param_groups"])


def test_cuda_graphs_refused_where_a_capture_cannot_run():
    cfg = config.load("toy", {**RECIPE, "train.cuda_graphs": True, "train.amp": "fp16",
                              "optim.impl": "torch"})
    with pytest.raises(config.ConfigError) as e:
        engine.build(cfg, torch.device("cpu"), distributed.Dist())
    assert str(e.value) == ("train.cuda_graphs needs a CUDA device (this run is on cpu); train.amp none "
                            "or bf16 (the fp16 loss scaler is not captured); optim.impl = auto (the fused "
                            "optimizers skip on a device flag)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cuda_graph_replay_matches_eager_steps(batches, monkeypatch, amp):
    """Captured == uncaptured within fp tolerance on CUDA (atomics in some backward kernels make
    neither bitwise reproducible), over two phase changes and a skipped step; a checkpoint of the
    graphed run loads into a plain one."""
    cfg = config.load("toy", {**PHASED, "train.amp": amp, "kernels.backend": "auto",
                              "kernels.upsample": "auto"})
    cuda = torch.device("cuda")
    eager = engine.build(cfg, cuda)
    graphed_cfg = config.load("toy", {**PHASED, "train.amp": amp, "kernels.backend": "auto",
                                      "kernels.upsample": "auto", "train.cuda_graphs": True})
    graphed = engine.build(graphed_cfg, cuda)
    assert isinstance(graphed.adapter, graphs.GraphedAdapter)
    torch.manual_seed(3)
    want = run(eager.adapter, batches, monkeypatch, device=cuda)
    torch.manual_seed(3)
    got = run(graphed.adapter, batches, monkeypatch, device=cuda)
    assert graphed.adapter.captured is not None
    assert [r.stepped for r in got] == [r.stepped for r in want] == [True] * 6 + [False, True]
    for g, w in zip(got, want):
        for k in w.losses:
            if math.isfinite(w.losses[k]):
                assert g.losses[k] == pytest.approx(w.losses[k], rel=2e-2, abs=2e-3), k
    for name, a, b in zip(("g", "d", "d_aux"), eager.nets, graphed.nets):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            if x.is_floating_point():
                torch.testing.assert_close(y, x, rtol=5e-2, atol=5e-3, msg=f"{name}.{k}")
    fresh = engine.build(cfg, cuda)
    fresh.optimizers.load_state_dict(graphed.optimizers.state_dict())
    assert isinstance(fresh.optimizers.g.param_groups[0]["lr"], float)
