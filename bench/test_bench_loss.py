"""pytest-benchmark suite for the CPU: weighted_adv_loss fwd+bwd, ext vs eager reference.

    python -m pytest bench/test_bench_loss.py --benchmark-only

Lives in bench/, not tests/, so `pytest` (testpaths = tests) never collects it; timings are
measurements, not pass/fail checks.
"""

import pytest
import torch

from pwda_fast import ops

SHAPE = (2, 19, 256, 512)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    n, _, h, w = SHAPE
    seg = torch.randn(SHAPE, generator=g) * 3
    disc = (torch.randn((n, 1, h, w), generator=g) * 3).requires_grad_()
    aux = torch.randn((n, 1, h, w), generator=g) * 3
    return seg, disc, aux


@pytest.mark.parametrize("backend", [b for b in ("torch", "ext") if b in ops.available_backends()])
def test_weighted_adv_loss_fwd_bwd(benchmark, inputs, backend):
    seg, disc, aux = inputs

    def step():
        disc.grad = None
        ops.weighted_adv_loss(seg, disc, aux, label=1.0, backend=backend).backward()

    benchmark(step)
