"""train.cuda_graphs: everything around the capture, checked on CPU with a stand-in capture that
replays a trace of the iteration's aten ops (graph_trace.py: no Python reruns in a replay, as on
CUDA); the capture itself on CUDA (marked gpu, run by bench/gpu_check.sh). A bad step is made through
its data (a NaN in the source image, copied into the static buffers like any batch), so each test
means the same with the stand-in and with a real graph."""

import math

import pytest
import torch
from graph_trace import trace_graph
from test_skipped_step import RECIPE, changed, state_of

from pwda_fast import config, distributed, engine, graphs, reference

BATCH_CROP = (32, 64)
# Phases change at step 3 (the preheat ends) and 4 (the memory term starts counting).
PHASED = {**RECIPE, "adapt.preheat_iters": 3, "adapt.memory_start": 4, "optim.backbone_repeats": True}
# MRNet's adversary: its gradient penalty is a double backward inside the captured step.
MRNET = {**PHASED, "adapt.adversary": "mrnet", "adapt.weighting": "none"}
BAD = 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def run(adapter, batches, steps: int = 8, bad: int = BAD, device="cpu") -> list:
    """`steps` launches over the batches (step `bad`'s source image holds a NaN), each read back."""
    reports = []
    for i in range(steps):
        pair = [{k: v.to(device, copy=True) if torch.is_tensor(v) else v for k, v in b.items()}
                for b in batches[i % len(batches)]]
        if i == bad:
            pair[0]["image"][0, :, :4, :4] = math.nan
        reports.append(adapter.launch(i, *pair).read())
    return reports


@pytest.mark.parametrize("recipe", [PHASED, MRNET], ids=["paper-recipe", "mrnet-adversary"])
def test_graphed_launch_equals_the_eager_one_bit_for_bit(batches, recipe):
    """Static batch buffers refilled, learning rates as device tensors filled before each replay, the
    first step of a phase eager and its next one captured, the skip on the device flag: replaying a
    trace of the captured iteration, 8 steps over two phase changes and a skipped step equal the plain
    Adapter's to the bit."""
    cfg = config.load("toy", recipe)
    eager, graphed = engine.build(cfg, torch.device("cpu")), engine.build(cfg, torch.device("cpu"))
    captures = []

    def capture(iteration):
        captures.append(graphed.adapter.phase(len(captures)))
        return trace_graph(iteration)

    wrapped = graphs.GraphedAdapter(graphed.adapter, warmup=2, capture=capture)
    torch.manual_seed(3)
    want = run(eager.adapter, batches)
    torch.manual_seed(3)
    got = run(wrapped, batches)
    assert [r.stepped for r in got] == [True] * 6 + [False, True]
    assert [repr(r) for r in got] == [repr(r) for r in want]
    assert changed(state_of(eager), state_of(graphed)) == []
    # Steps 0-1 warm up; 2 is captured; 3 (weighting on) and 4 (memory on) run their new phase eagerly
    # first; 5 captures that phase, 6 and 7 replay it (6 skipped through its data).
    assert len(captures) == 2 and wrapped.captured[0] == graphed.adapter.phase(5) != graphed.adapter.phase(2)
    assert all(torch.is_tensor(group["lr"]) for opt in graphed.optimizers for group in opt.param_groups)
    assert all(group["capturable"] for opt in (graphed.optimizers.d, graphed.optimizers.d_aux)
               for group in opt.param_groups)
    saved = graphed.optimizers.state_dict()
    assert all(isinstance(group["lr"], float) and not group.get("capturable")
               for opt in saved.values() for group in opt["param_groups"])
    # An eager run resumes the graphed run's state, also with torch's unfused Adam (which refuses a
    # capturable group on CPU parameters).
    resumed = engine.build(config.load("toy", {**recipe, "optim.impl": "torch"}), torch.device("cpu"))
    resumed.optimizers.load_state_dict(saved)
    assert run(resumed.adapter, batches, steps=1)[0].stepped


def test_a_replay_runs_no_python(batches, monkeypatch):
    """What the stand-in is for: a step made bad in Python (a patched loss) is bad when run eagerly but
    not in a replay, which only re-runs the captured kernels. (The graph tests of an earlier tree made
    their bad step this way and could not have passed on CUDA.)"""
    cfg = config.load("toy", PHASED)
    graphed = engine.build(cfg, torch.device("cpu"))
    wrapped = graphs.GraphedAdapter(graphed.adapter, warmup=2, capture=trace_graph)
    real, reports = reference.seg_ce, []
    for i in range(8):
        with monkeypatch.context() as m:
            if i in (4, BAD):  # step 4 runs eagerly (a new phase), step 6 is a replay
                m.setattr(reference, "seg_ce", lambda *a: real(*a) * math.nan)
            reports.append(wrapped.launch(i, *batches[i % len(batches)]).read())
    assert [r.stepped for r in reports] == [True] * 4 + [False] + [True] * 3


def test_a_capture_that_fails_leaves_the_run_eager_with_one_warning(batches):
    cfg = config.load("toy", PHASED)
    eager, graphed = engine.build(cfg, torch.device("cpu")), engine.build(cfg, torch.device("cpu"))
    warnings = []

    def capture(iteration):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    wrapped = graphs.GraphedAdapter(graphed.adapter, warmup=2, capture=capture, log=warnings.append)
    torch.manual_seed(3)
    want = run(eager.adapter, batches)
    torch.manual_seed(3)
    got = run(wrapped, batches)
    assert [repr(r) for r in got] == [repr(r) for r in want]
    assert changed(state_of(eager), state_of(graphed)) == []
    assert len(warnings) == 1 and "capturing the step failed at step 2" in warnings[0]
    assert "operation not permitted when stream is capturing" in warnings[0]


def test_the_stand_in_refuses_what_a_capture_refuses(batches, monkeypatch):
    """A host sync inside the captured step raises in the stand-in as on CUDA (the old seg_ce)."""
    def masked_seg_ce(logits, labels, class_weights=None):
        return torch.nn.functional.cross_entropy(logits.float(), labels, weight=class_weights,
                                                 ignore_index=255, reduction="sum") / (
            class_weights[labels[labels != 255]].sum())

    monkeypatch.setattr(reference, "seg_ce", masked_seg_ce)
    graphed = engine.build(config.load("toy", PHASED), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing: aten.index"):
        trace_graph(lambda: graphed.adapter.launch(0, *batches[0]))


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
@pytest.mark.parametrize("recipe", [PHASED, MRNET], ids=["paper-recipe", "mrnet-adversary"])
def test_cuda_graph_replay_matches_eager_steps(batches, amp, recipe):
    """Captured == uncaptured within fp tolerance on CUDA (atomics in some backward kernels make
    neither bitwise reproducible), over two phase changes and a skipped step; a checkpoint of the
    graphed run loads into a plain one."""
    cfg = config.load("toy", {**recipe, "train.amp": amp, "kernels.loss": "auto",
                              "kernels.upsample": "auto"})
    cuda = torch.device("cuda")
    eager = engine.build(cfg, cuda)
    graphed_cfg = config.load("toy", {**recipe, "train.amp": amp, "kernels.loss": "auto",
                                      "kernels.upsample": "auto", "train.cuda_graphs": True})
    graphed = engine.build(graphed_cfg, cuda)
    assert isinstance(graphed.adapter, graphs.GraphedAdapter)
    torch.manual_seed(3)
    want = run(eager.adapter, batches, device=cuda)
    torch.manual_seed(3)
    got = run(graphed.adapter, batches, device=cuda)
    assert graphed.adapter.failed is None and graphed.adapter.captured is not None
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_capture_that_fails_on_cuda_leaves_a_working_eager_run(batches, monkeypatch):
    """A host sync inside the step invalidates a real capture: the run warns once and goes on eagerly
    on the stream it had, with the plain run's results. Last in this file: a failed capture may leave
    the allocator's capture bookkeeping behind for the rest of the process."""
    real = reference.seg_ce
    monkeypatch.setattr(reference, "seg_ce", lambda *a: real(*a) + 0.0 * float(a[0].sum().item()))
    cuda = torch.device("cuda")
    fused = {**PHASED, "kernels.loss": "auto", "kernels.upsample": "auto"}
    eager = engine.build(config.load("toy", fused), cuda)
    graphed = engine.build(config.load("toy", {**fused, "train.cuda_graphs": True}), cuda)
    stream = torch.cuda.current_stream()
    torch.manual_seed(3)
    want = run(eager.adapter, batches, device=cuda)
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="capturing the step failed"):
        got = run(graphed.adapter, batches, device=cuda)
    assert graphed.adapter.failed is not None and torch.cuda.current_stream() == stream
    assert [r.stepped for r in got] == [r.stepped for r in want]
    for g, w in zip(got, want):
        for k in w.losses:
            if math.isfinite(w.losses[k]):
                assert g.losses[k] == pytest.approx(w.losses[k], rel=2e-2, abs=2e-3), k
