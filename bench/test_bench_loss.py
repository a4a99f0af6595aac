"""pytest-benchmark suite: weighted_adv_loss forward and forward+backward, the providers side by side.

    python -m pytest bench/test_bench_loss.py --benchmark-json=bench/results/loss-cpu.json  # make bench

Providers (bench_loss.py): eager = reference.py, compile = torch.compile(reference), ext = the C++ or
CUDA op, triton = the Triton kernel (CUDA only; on CPU its tests skip with the reason). Cases
(bench_loss.SHAPES, --bench-shapes): on CPU "cpu", BENCHMARKS.md's (1, 19, 128, 256) and
(2, 19, 256, 512) in fp32 and bf16, then the training loop's call (fp32 channels_last
(2, 19, 512, 1024), D's map at 16x32); on CUDA "gpu", that call, then N=4, C=19, 512x1024 in fp32
and bf16 and 4x19x1024x2048 in bf16, all maps full size. Every provider and mode of one case and
dtype is timed in the same rounds (conftest.py); each test records its own samples. Lives in bench/,
not tests/: `make test` never runs it, and its timings are measurements, not pass/fail checks.
"""

import os

import bench_loss
import common
import pytest
import torch

# --bench-rounds / --bench-calls when not given (bench_loss.py's defaults): on CUDA each sample is 20
# back-to-back calls ending with a device sync (wall time; bench_loss.py also reports device time).
DEFAULTS = {"cpu": {"rounds": 15, "calls": 1}, "cuda": {"rounds": 20, "calls": 20}}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("bench_device")
    shapes = metafunc.config.getoption("bench_shapes") or ("gpu" if device == "cuda" else "cpu")
    if shapes not in bench_loss.SHAPES:
        raise pytest.UsageError(f"--bench-shapes {shapes!r} is not a case set; use one of "
                                f"{sorted(bench_loss.SHAPES)}")
    params = [pytest.param(case, dtype, mode, provider,
                           id=f"{bench_loss.case_id(case)}-{dtype}-{mode}-{provider}")
              for case in bench_loss.SHAPES[shapes] for dtype in case.dtypes or ("fp32", "bf16")
              for mode in bench_loss.MODES for provider in bench_loss.PROVIDERS]
    metafunc.parametrize("case,dtype,mode,provider", params)


@pytest.fixture(scope="session")
def copy_gb_per_s(pytestconfig):
    """The device's copy bandwidth (GB/s), measured once: the yardstick of the "of copy" column."""
    return common.copy_bandwidth(pytestconfig.getoption("bench_device"))


def test_weighted_adv_loss(record, round_robin, request, copy_gb_per_s, case, dtype, mode, provider):
    config = request.config
    device = config.getoption("bench_device")
    problem = bench_loss.provider_problem(provider, device)
    if problem is not None:
        # `make` sets PWDA_FAST_EXPECT_EXT=1: a missing C++ extension fails there, as in the tests.
        if provider == "ext" and os.environ.get("PWDA_FAST_EXPECT_EXT") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    rounds = config.getoption("bench_rounds") or DEFAULTS[device]["rounds"]
    calls = config.getoption("bench_calls") or DEFAULTS[device]["calls"]
    warmup = config.getoption("bench_warmup")

    def measure(selected):
        """Every selected (provider, mode) of this case and dtype, interleaved in each round."""
        keys = [(p, m) for p, m in selected if bench_loss.provider_problem(p, device) is None]
        names = {p for p, _ in keys}
        if "compile" in names:
            torch._dynamo.reset()  # a fresh cache per case: the recompile limit never falls back to eager
        fns = {name: bench_loss.provider(name) for name in names}
        seg, disc, aux = bench_loss.make_inputs(case, bench_loss.DTYPES[dtype], device)
        return bench_loss.time_case(fns, seg, disc, aux, device, rounds, calls, warmup, keys=keys)[0]

    samples = round_robin.samples(request, ("provider", "mode"), measure)
    n, _, h, w = case.shape
    record(samples, f"loss {bench_loss.case_id(case)} {dtype} {mode}",
           suite="loss", device=device, provider=provider, shape=list(case.shape),
           disc_hw=list(case.disc_hw or (h, w)), aux_hw=list(case.aux_hw or (h, w)),
           channels_last=case.channels_last, production=case == bench_loss.PRODUCTION, dtype=dtype,
           mode=mode, bytes=bench_loss.minimal_bytes(case, bench_loss.DTYPES[dtype], mode),
           copy_gb_per_s=copy_gb_per_s, calls_per_sample=calls, warmup=warmup)

