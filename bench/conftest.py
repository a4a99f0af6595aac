"""pytest-benchmark plumbing of the bench suites (bench/test_bench_*.py, run by `make bench`).

pytest-benchmark times each test's rounds back to back, one test after the other, so providers
compared in separate tests would be measured at different moments of a shared machine's load. Here
the providers of one comparison (one loss case, or the train step) are timed together instead,
round-robin, by `round_robin` (common.interleave: every round gives each provider its turn). Each
provider's test then hands its own samples to pytest-benchmark through pedantic mode, whose clock is
the documented per-test `timer` option, here a ReplayClock that makes each round read exactly one
interleaved sample. pytest-benchmark's statistics (median, quartiles), terminal table and JSON
therefore describe the interleaved samples, and nothing is timed twice.

Options (pytest bench/... --help lists them under "bench"): --bench-device, --bench-threads,
--bench-rounds, --bench-warmup, --bench-calls, --bench-shapes (loss), --bench-iters, --bench-preset
and --bench-step-compile (train step). The JSON's machine_info["pwda_fast"] holds the device, the
machine, torch, the thread count, the load average at the start and end and the command line; its
"not_measured" list holds each skipped test with its reason.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import common
import pytest
import torch

_LOAD_AT_START = pytest.StashKey[float]()
_NOT_MEASURED = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("bench", "pwda_fast benchmarks (bench/conftest.py)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to time on (default: cuda when one is visible, else cpu)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch intra-op threads (CPU; 1 is steadier on a shared machine)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per provider (default: loss 15 on cpu, 20 on cuda; step 5)")
    group.addoption("--bench-warmup", type=int, default=2, help="untimed calls per provider first")
    group.addoption("--bench-calls", type=int, default=None,
                    help="loss: back-to-back calls per timed sample (default: 1 cpu, 20 cuda)")
    group.addoption("--bench-shapes", default=None,
                    help="loss: a case set of bench_loss.SHAPES (default: cpu on cpu, gpu on cuda)")
    group.addoption("--bench-iters", type=int, default=4,
                    help="step: timed iterations per provider per round")
    group.addoption("--bench-preset", choices=("toy", "paper"), default=None,
                    help="step: networks and crop (default: toy on cpu, paper on cuda)")
    group.addoption("--bench-step-compile", action="store_true",
                    help="step: also time the engine with torch.compile(G) (minutes of warm-up)")


def pytest_configure(config):
    if config.getoption("bench_device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda but no CUDA device is visible; "
                                "run on a GPU machine or pass --bench-device cpu")
    # Resolved once here, so the suites read config.getoption("bench_device") as "cpu" or "cuda".
    config.option.bench_device = config.getoption("bench_device") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    # pytest-benchmark opens --benchmark-json only after the last test: a missing folder would lose
    # the whole run's measurements there.
    json_path = config.getoption("benchmark_json", None)
    if isinstance(json_path, (str, os.PathLike)):
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    config.stash[_NOT_MEASURED] = []


def pytest_sessionstart(session):
    session.config.stash[_LOAD_AT_START] = os.getloadavg()[0]


class ReplayClock:
    """A clock for pytest-benchmark's `timer` option that replays samples timed elsewhere.

    Pedantic mode reads the clock once before and once after each round's call and records the
    difference; load(samples) makes round i's two readings 0 and samples[i], exactly."""

    def __init__(self):
        self._readings = iter(())

    def load(self, samples) -> None:
        self._readings = iter([t for s in samples for t in (0.0, s)])

    def drained(self) -> bool:
        return next(self._readings, None) is None

    def __call__(self) -> float:
        return next(self._readings)

    def __repr__(self) -> str:  # pytest-benchmark writes the timer's name into the JSON
        return "ReplayClock (interleaved samples, bench/conftest.py)"


REPLAY = ReplayClock()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=REPLAY))


@pytest.fixture
def record(benchmark):
    """record(samples, group, **extra_info): give pytest-benchmark this test's interleaved samples
    (seconds per call) as its rounds, in `group` (the comparison), with extra_info for bench/tables.py."""
    def record(samples, group: str, **extra_info) -> None:
        benchmark.group = group
        benchmark.extra_info.update(extra_info)
        REPLAY.load(samples)
        benchmark.pedantic(lambda: None, rounds=len(samples), iterations=1)
        if benchmark.enabled and not REPLAY.drained():
            raise RuntimeError("pytest-benchmark read the replay clock fewer than two times per round: "
                               "this pytest-benchmark version times pedantic rounds differently, so the "
                               "recorded rounds are not the samples; pin the version bench/ was written for")
    return record


class RoundRobin:
    """Each comparison timed once, all its providers together; every test of it gets its own samples.

    A comparison is the set of selected tests of one test function that share every parameter but
    the `members` ones (e.g. the loss: same case and dtype, any provider and mode), so deselecting
    tests with -k also takes their providers out of the timing."""

    def __init__(self):
        self._done = {}

    def samples(self, request, members: tuple[str, ...], measure) -> list[float]:
        """This test's samples; measure([member values of every test of the comparison]) -> {member
        values: [seconds]} runs once per comparison (members it cannot run it leaves out)."""
        item = request.node
        params = _params(item)
        shared = tuple((k, v) for k, v in params.items() if k not in members)
        comparison = (item.path, item.originalname, shared)
        if comparison not in self._done:
            selected = [tuple(_params(o)[k] for k in members) for o in item.session.items
                        if o.path == item.path and getattr(o, "originalname", None) == item.originalname
                        and all(_params(o).get(k) == v for k, v in shared)]
            try:
                self._done[comparison] = measure(selected)
            except Exception as e:
                self._done[comparison] = e  # its other tests report the same failure, not a re-run
                raise
        done = self._done[comparison]
        if isinstance(done, Exception):
            raise RuntimeError(f"the comparison this test belongs to failed: {done!r}") from done
        return done[tuple(params[k] for k in members)]


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {})


@pytest.fixture(scope="session")
def round_robin():
    return RoundRobin()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        item.config.stash[_NOT_MEASURED].append(
            {"test": item.name, "provider": _params(item).get("provider"), "reason": reason})


def pytest_benchmark_update_machine_info(config, machine_info):
    device = config.getoption("bench_device")
    machine_info["pwda_fast"] = {
        "device": device, "machine": common.machine(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": {"start": config.stash.get(_LOAD_AT_START, None), "end": os.getloadavg()[0]},
        "command": shlex.join(["python", "-m", "pytest", *config.invocation_params.args]),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["not_measured"] = config.stash.get(_NOT_MEASURED, [])
