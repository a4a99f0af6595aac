"""bench_step's eager loop (the AdaptSegNet way: a forward and backward per loss, D's source and target
terms each halved, plain SGD/Adam) computes the same iteration as the engine's Adapter: after one
iteration on the same weights and batch, G's gradients are equal and D's and D_aux's are half the
engine's (AdaptSegNet divides each discriminator term by 2). So the speed-up bench_step reports is
for the same work."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from pwda_fast import config

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
bench_step = importlib.import_module("bench_step")

# No dropout (the two loops draw their masks in another order); fp32; the memory term weighs 0 before
# memory_start, and the eager loop has none.
TOY = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
       "model.aux_disc_width": 8, "model.head_dropout": 0.0, "data.crop": [32, 64],
       "data.batch_size": 2, "kernels.loss": "torch", "adapt.memory_start": 100}


def test_the_eager_loop_and_the_engine_compute_the_same_gradients(one_thread):
    cfg = config.load("toy", TOY)
    eager = bench_step.EagerLoop(config.load("toy", TOY), "cpu")
    engine = bench_step.Engine(cfg, torch.device("cpu"), compile_g=False)
    source, target = bench_step.make_batches(cfg, 1, "cpu")[0]
    nets = engine.adapter.nets
    for name, a, b in zip(("g", "d", "d_aux"), (eager.g, eager.d, eager.d_aux), nets):
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), f"{name}.{k}: the two start from other weights"
    eager.step(0, source, target)
    engine.adapter.launch(0, source, target).read()
    for name, a, b, scale in (("g", eager.g, nets.g, 1.0), ("d", eager.d, nets.d, 2.0),
                              ("d_aux", eager.d_aux, nets.d_aux, 2.0)):
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            if p.grad is None:
                assert q.grad is None or not q.grad.any(), f"{name}.{k}"
                continue
            torch.testing.assert_close(scale * p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, k=k: f"{name}.{k}: {m}")


def test_the_eager_loop_refuses_a_weighting_it_does_not_implement():
    with pytest.raises(ValueError, match="gen\\+dis"):
        bench_step.EagerLoop(config.load("toy", {**TOY, "adapt.weighting": "gen"}), "cpu")
