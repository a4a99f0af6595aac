"""pytest-benchmark suite: weighted_adv_loss forward and forward+backward, the providers side by side.

    python -m pytest bench/test_bench_loss.py --bench-rows=bench/results/cpu.jsonl   # (make bench)

Providers and cases: bench_loss.py (--bench-shapes: "cpu" on CPU, "gpu" on CUDA; bench/gpu_check.sh
runs "production" then "bandwidth"). Every provider and mode of one case and dtype is timed in the
same rounds (conftest.py); each test records its own samples, and a provider that raises is recorded
with its error while the others are timed. On CUDA each (provider, mode) is then profiled once over
`calls` calls for its device time (the sum of its kernels' durations) and device operations per
call, and its `calls` calls are captured in one CUDA graph whose replays are timed by events (device
time with no host in the way; a capture that fails costs that column only). Lives in bench/, not
tests/: `make test` never runs it, and its timings are measurements, not pass/fail checks.
"""

import os

import bench_loss
import common
import pytest
import torch

SUITE = "loss"

# --bench-rounds / --bench-calls when not given: on CUDA each sample is 20 back-to-back calls ending
# with a device sync (wall time; device time and graph replay time are measured beside it).
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
        if config.getoption("bench_fail") in fns:
            fns[config.getoption("bench_fail")] = common.injected_failure
        seg, disc, aux = bench_loss.make_inputs(case, bench_loss.DTYPES[dtype], device)
        return common.measure(bench_loss.case_calls(fns, seg, disc, aux, keys), device, rounds, warmup, calls,
                              graph=True)

    result = dict(round_robin.result(request, ("provider", "mode"), measure))
    record(result.pop("samples_s"), bench_loss.group(case, dtype, mode), provider, **result,
           bytes=bench_loss.minimal_bytes(case, bench_loss.DTYPES[dtype], mode), copy_gb_per_s=copy_gb_per_s,
           note=f"Every provider and mode of a case timed in the same {rounds} rounds, after {warmup} "
                f"untimed call(s) each; {calls} back-to-back call(s) per sample (wall time up to a device "
                f"sync). Copy bandwidth (fp32 copy, read + write): {copy_gb_per_s:.1f} GB/s; GB/s = minimal "
                "bytes (seg, disc, aux read once; fwd+bwd also dL/dz written once) / device time where "
                "measured, else / median; of copy = GB/s / copy bandwidth.")
