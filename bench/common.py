"""What every bench script and suite shares: device sync, interleaved wall timing, device time from
the profiler, the machine's description (the quantile rule and the tables: rows.py).

Scripts in bench/ import it as `common` (Python puts the script's own folder first on sys.path, and
pytest does the same for the suites, bench/ having no __init__.py); the package itself comes from the
install `make setup` does, never from a sys.path edit.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: torch.device | str, calls: int) -> float:
    """Wall seconds per call of `calls` back-to-back calls of fn, then one device sync.

    This is what a caller waits for: host and device together, whichever is slower sets the pace (on
    CUDA the calls queue while the host runs ahead, so with enough calls a host-bound op shows its host
    cost per call and a device-bound one its device time). It is not the device time of a host-bound
    op: device_time() measures that.
    """
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def device_time(fn: Callable[[], object], device: torch.device | str,
                calls: int) -> tuple[float, float] | None:
    """(device seconds per call, device operations per call) of `calls` calls of fn on CUDA: the sum
    of the durations of the kernels, memsets and copies they ran (torch.profiler's CUDA activity),
    whatever the host did between them. None on CPU, where there is no separate device."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in events)
    return busy_us / 1e6 / calls, len(events) / calls


def graph_time(fn: Callable[[], object], device: torch.device | str, calls: int,
               replays: int = 5) -> tuple[float | None, str | None]:
    """(device seconds per call, None) of fn with no host in the way: `calls` calls captured in one CUDA
    graph, its replays timed by CUDA events; beside device_time's profiler sum, which read about twice
    Nsight Compute's on an H200 (2026-12-04). (None, why) when the capture fails, and (None, None) on
    CPU. fn runs once first on a side stream, as torch asks before a capture."""
    if torch.device(device).type != "cuda":
        return None, None
    current = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / (replays * calls), None
    except Exception as e:  # a capture that fails costs this column, not the benchmark
        torch.cuda.set_stream(current)  # a failed capture's exit can leave the thread on its stream
        return None, error_text(e)


def error_text(e: BaseException) -> str:
    """One line for a table: the exception's type and the first 300 characters of its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def injected_failure(*args, **kwargs):
    """A provider made to fail (the suites' --bench-fail): the GPU check's dry run shows its row."""
    raise RuntimeError("injected failure (--bench-fail): this provider raises on its first call")


def interleave(calls: dict, device: torch.device | str, rounds: int, warmup: int, calls_per_sample: int = 1,
               samples_per_turn: int = 1, errors: dict | None = None) -> dict:
    """Seconds per call of each of `calls` (key -> zero-argument function), the providers interleaved.

    Each function is first called `warmup` times untimed (compilation, caches, allocator); then every
    round gives each key its turn in order: `samples_per_turn` samples, each `calls_per_sample`
    back-to-back calls timed together (time_calls). A machine that gets busier or quieter during the
    run slows every provider of the round alike, not whichever happened to run at that moment.
    errors: given, a key whose call raises gets errors[key] = its error text and leaves the rounds
    while the others go on (a crash loses no one else's numbers).
    -> {key: [rounds * samples_per_turn seconds]}
    """
    calls = dict(calls)

    def turn(key, run):
        if errors is None:
            return run()
        try:
            return run()
        except Exception as e:  # a provider's failure is a result to report, not the end of the run
            errors[key] = error_text(e)
            calls.pop(key)
            return []

    def warm(call):
        for _ in range(warmup):
            call()
        sync(device)
        return []

    for key, call in list(calls.items()):
        turn(key, lambda call=call: warm(call))
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in list(calls.items()):
            times[key].extend(turn(key, lambda call=call: [time_calls(call, device, calls_per_sample)
                                                           for _ in range(samples_per_turn)]))
    return times


def measure(calls_of: dict, device: torch.device | str, rounds: int, warmup: int, calls: int,
            graph: bool = False) -> dict:
    """One comparison of a suite: every call of `calls_of` (key -> zero-argument call) interleaved
    (interleave, `calls` back-to-back calls per sample), then on CUDA each one's device time and
    operations per call (device_time) and, with `graph`, its graph-replay time (graph_time).
    -> {key: {"samples_s", and on CUDA "device_s", "device_ops"[, "graph_s", "graph_error"]}, or the
    error text of a key whose call raised}."""
    errors = {}
    times = interleave(calls_of, device, rounds, warmup, calls_per_sample=calls, errors=errors)
    out = {}
    for key, samples in times.items():
        if key in errors:
            continue
        out[key] = {"samples_s": samples}
        dev = device_time(calls_of[key], device, calls)
        if dev is not None:
            out[key].update(device_s=dev[0], device_ops=dev[1])
            if graph:
                graph_s, graph_error = graph_time(calls_of[key], device, calls)
                out[key].update(graph_s=graph_s, graph_error=graph_error)
    return {**out, **errors}


def copy_bandwidth(device: torch.device | str, numel: int | None = None, rounds: int = 10) -> float:
    """Copy bandwidth in GB/s: read + write of a fp32 clone (1 GiB on CUDA, 256 MiB on CPU), median of
    `rounds` after 2 warm-up copies; the yardstick for a memory-bound kernel's achieved bandwidth."""
    numel = numel or (2**28 if torch.device(device).type == "cuda" else 2**26)
    x = torch.empty(numel, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    # 5 copies per sample: the host queues them far ahead of the device, so the wall time is the copies'.
    samples = [time_calls(lambda: out.copy_(x), device, 5) for _ in range(rounds + 2)][2:]
    return 2 * numel * 4 / statistics.median(samples) / 1e9


def cpu_name() -> str:
    """lscpu's model name, with the widest x86 vector extension the kernels can use."""
    name = platform.processor() or "unknown CPU"
    flags = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
        name = fields.get("Model name", name).strip()
        flags = fields.get("Flags", "")
    except (OSError, subprocess.SubprocessError):
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2" if flags else "?"
    return f"{name} ({isa})"


def machine(device: torch.device | str) -> str:
    """One line naming the device, e.g. "NVIDIA H200" or "AMD EPYC (AVX-512), 2 threads"."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"
