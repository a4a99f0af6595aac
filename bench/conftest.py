"""pytest-benchmark plumbing of the bench suites (bench/test_bench_*.py): `make bench` and
bench/gpu_check.sh run the same suites.

pytest-benchmark times each test's rounds back to back, one test after the other, so providers
compared in separate tests would be measured at different moments of a shared machine's load. Here
the providers of one comparison (one loss case, or the train step) are timed together instead,
round-robin, by `round_robin` (common.interleave: every round gives each provider its turn). Each
provider's test then hands its own samples to pytest-benchmark through pedantic mode, whose clock is
the documented per-test `timer` option, here a ReplayClock that makes each round read exactly one
interleaved sample; nothing is timed twice.

With --bench-rows FILE every test also appends its row to FILE as soon as it is measured (the
schema and the tables: bench/rows.py): a time row, a failed row with the provider's error text (the
other providers of its comparison still run and are written), or a skipped row with the reason. A
crash keeps every row written before it. --bench-fail PROVIDER makes that provider raise on its
first call (the GPU check's dry run shows a failure's row beside the others).

Options (pytest bench/... --help lists them under "bench"): --bench-device, --bench-threads,
--bench-rounds, --bench-warmup, --bench-calls, --bench-shapes (loss), --bench-iters, --bench-preset
and --bench-step-compile (train step), --bench-rows, --bench-fail.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex

import common
import pytest
import rows
import torch

from pwda_fast.ablate import source_tree

_RUN = pytest.StashKey[str]()


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
    group.addoption("--bench-rows", default=None, metavar="FILE",
                    help="append each row to this JSON-lines file as it is measured (bench/rows.py)")
    group.addoption("--bench-fail", default=None, metavar="PROVIDER",
                    help="make this provider raise on its first call (shows a failure's row)")


def pytest_configure(config):
    if config.getoption("bench_device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda but no CUDA device is visible; "
                                "run on a GPU machine or pass --bench-device cpu")
    # Resolved once here, so the suites read config.getoption("bench_device") as "cpu" or "cuda".
    config.option.bench_device = config.getoption("bench_device") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    config.stash[_RUN] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pytest_sessionstart(session):
    config = session.config
    device = config.getoption("bench_device")
    rows.append(config.getoption("bench_rows"), {
        "kind": "run", "id": config.stash[_RUN], "device": device, "machine": common.machine(device),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "command": shlex.join(["python", "-m", "pytest", *config.invocation_params.args]),
        "rows_file": config.getoption("bench_rows"), "commit": source_tree(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": os.getloadavg()[0]})


def pytest_sessionfinish(session):
    config = session.config
    rows.append(config.getoption("bench_rows"), {"kind": "run", "id": config.stash[_RUN],
                                                 "load_end": os.getloadavg()[0]})


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


@pytest.fixture(scope="session")
def write_row(pytestconfig):
    """write_row(row): append a row (bench/rows.py) to --bench-rows, tagged with this session's run."""
    path, run = pytestconfig.getoption("bench_rows"), pytestconfig.stash[_RUN]
    return lambda row: rows.append(path, {**row, "run": run})


@pytest.fixture
def record(benchmark, write_row, request):
    """record(samples, group, provider, **info): give pytest-benchmark this test's interleaved samples
    (seconds per call) as its rounds, in `group` (the comparison), and write its time row."""
    def record(samples, group: str, provider: str, **info) -> None:
        write_row({"kind": "time", "suite": request.module.SUITE, "group": group, "provider": provider,
                   "samples_s": list(samples), **info})
        benchmark.group = group
        benchmark.extra_info.update(provider=provider)
        REPLAY.load(samples)
        benchmark.pedantic(lambda: None, rounds=len(samples), iterations=1)
        if benchmark.enabled and not REPLAY.drained():
            raise RuntimeError("pytest-benchmark read the replay clock fewer than two times per round: "
                               "this pytest-benchmark version times pedantic rounds differently, so the "
                               "recorded rounds are not the samples; pin the version bench/ was written for")
    return record


class ProviderFailed(Exception):
    """A provider raised while its comparison was timed; the others were timed without it."""


class RoundRobin:
    """Each comparison timed once, all its providers together; every test of it gets its own result.

    A comparison is the set of selected tests of one test function that share every parameter but
    the `members` ones (e.g. the loss: same case and dtype, any provider and mode), so deselecting
    tests with -k also takes their providers out of the timing."""

    def __init__(self):
        self._done = {}

    def result(self, request, members: tuple[str, ...], measure):
        """This test's result; measure([member values of every test of the comparison]) -> {member
        values: its result, or the error text of a member that raised} runs once per comparison
        (members it cannot run it leaves out). A member's error raises ProviderFailed in its test."""
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
        mine = done[tuple(params[k] for k in members)]
        if isinstance(mine, str):
            if params.get("provider") == item.config.getoption("bench_fail"):
                pytest.xfail(mine)  # the failure asked for: its row is written, the run still passes
            raise ProviderFailed(mine)
        return mine


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {})


@pytest.fixture(scope="session")
def copy_gb_per_s(pytestconfig):
    """The device's copy bandwidth (GB/s), measured once per session: the yardstick of the "of copy"
    column of every suite."""
    return common.copy_bandwidth(pytestconfig.getoption("bench_device"))


@pytest.fixture(scope="session")
def round_robin():
    return RoundRobin()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A provider's test that fails or skips writes its row (failed: the error text; skipped: why)."""
    outcome = yield
    report = outcome.get_result()
    provider = _params(item).get("provider")
    path = item.config.getoption("bench_rows")
    if provider is None or path is None or not (report.failed or report.skipped):
        return
    row = {"suite": getattr(item.module, "SUITE", None), "provider": provider, "test": item.name,
           "run": item.config.stash[_RUN]}
    if hasattr(report, "wasxfail"):  # --bench-fail's provider
        rows.append(path, {**row, "kind": "failed", "error": report.wasxfail.removeprefix("reason: ")})
    elif report.skipped and isinstance(report.longrepr, tuple):
        rows.append(path, {**row, "kind": "skipped", "reason": report.longrepr[2].removeprefix("Skipped: ")})
    elif report.failed:
        if call.excinfo and call.excinfo.errisinstance(ProviderFailed):
            error = str(call.excinfo.value)  # the provider's own error text
        else:
            error = call.excinfo.exconly() if call.excinfo else str(report.longrepr)
        rows.append(path, {**row, "kind": "failed", "error": " ".join(error.split())[:400]})
