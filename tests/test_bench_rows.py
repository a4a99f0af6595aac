"""bench/rows.py (the one row schema, writer and renderer of every benchmark and of the GPU check),
bench/conftest.py (the suites write a row per provider as it is measured, a failing one with its error),
and bench/gpu_check.sh's CPU dry run end to end (slow)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
_spec = importlib.util.spec_from_file_location("rows", BENCH / "rows.py")
rows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rows)

RUN = {"kind": "run", "id": "r1", "device": "cuda", "machine": "NVIDIA H200", "torch": "2.11.0",
       "python": "3.12.3", "command": "python -m pytest bench/test_bench_loss.py", "commit": "abc1234",
       "date": "2026-12-07 10:00 UTC", "load_start": 0.5, "rows_file": "rows.jsonl"}
BAND = rows.BANDWIDTH_GROUP
MB = 10**6


def time_row(group, provider, ms, suite="loss", run="r1", **info):
    """A time row whose samples have median `ms` milliseconds (three samples: ms*0.9, ms, ms*1.1; by
    nearest rank q1 is the smallest and q3 the largest)."""
    return {"kind": "time", "run": run, "suite": suite, "group": group, "provider": provider,
            "samples_s": [ms * 1.1e-3, ms * 0.9e-3, ms * 1e-3], **info}


def write(path: Path, *rs) -> Path:
    for r in rs:
        rows.append(path, r)
    return path


def gpu_run(tmp_path, *, fused_frac=0.7, busy=0.97, engine_ms=100.0, extra=()):
    """A made-up GPU check's rows file: steps, the bandwidth case, the step suite, facts."""
    band = 4 * 19 * 512 * 1024 * 2  # any byte count: the fractions below follow from it
    copy = 4000.0
    fused_s = band / (fused_frac * copy * 1e9)
    path = tmp_path / "rows.jsonl"
    write(path, RUN, {"kind": "fact", "name": "probe", "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0",
                      "triton": "3.6.0", "device_name": "NVIDIA H200", "cuda_available": True},
          {"kind": "step", "name": "build", "rc": 0, "seconds": 80, "limit": 120},
          {"kind": "step", "name": "gpu_tests_kernels", "rc": 1, "seconds": 20, "limit": 60},
          {"kind": "fact", "name": "pytest", "step": "gpu_tests_kernels",
           "counts": {"passed": 40, "failed": 1},
           "failures": ["tests/test_weighted_adv_loss_v2.py::test_x: AssertionError: off by 1e-3"]},
          {"kind": "step", "name": "bench_loss", "rc": 124, "seconds": 50, "limit": 50},
          {"kind": "step", "name": "bench_step_compile", "skipped": "opt-in: --with-compile"},
          time_row(BAND, "eager", 2.0, bytes=band, copy_gb_per_s=copy),
          time_row(BAND, "compile", 0.5, bytes=band, copy_gb_per_s=copy, device_s=0.4e-3),
          time_row(BAND, "ext", fused_s * 1.2e3, bytes=band, copy_gb_per_s=copy, device_s=fused_s,
                   device_ops=2, graph_s=fused_s * 0.9),
          {"kind": "failed", "run": "r1", "suite": "loss", "group": BAND, "provider": "triton",
           "error": "RuntimeError: triton compile failed"},
          time_row("s", "eager fp32 NCHW (AdaptSegNet loop)", 400.0, suite="step", images_per_step=4),
          time_row("s", "engine bf16 channels_last", engine_ms, suite="step", images_per_step=4),
          {"kind": "failed", "run": "r1", "suite": "step", "group": "s",
           "provider": "engine bf16 channels_last + CUDA graphs", "error": "RuntimeError: capture failed"},
          {"kind": "fact", "name": "graphs_agreement", "steps": 6, "tolerance_rel": 0.02,
           "max_rel_diff": 1e-3, "agree": True, "captured": True, "capture_failed": None},
          {"kind": "fact", "name": "profile", "provider": "engine bf16 channels_last", "peak_flops": 1e15,
           "peak_note": "H200", "flops_per_iter": 2e13, "peak_memory_bytes": 10 * 2**30,
           "breakdown": {"time_kind": "device", "busy_fraction": busy, "ms_per_step": {"convolution": 60.0,
                                                                                     "other": 40.0}}},
          *extra)
    return path


def targets(text: str) -> dict[str, tuple[str, str]]:
    """target -> (result, numbers) from the summary's target table."""
    out, inside = {}, False
    for line in text.splitlines():
        if line.startswith("| target |"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            name, result, numbers = (c.strip() for c in line.strip("|").split(" | ", 2))
            out[name] = (result, numbers)
        elif inside and not line.startswith("|"):
            inside = False
    return out


def one(found: dict, prefix: str):
    matches = [v for k, v in found.items() if k.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(found))
    return matches[0]


def test_table_median_iqr_ratio_bandwidth_and_images_per_second(tmp_path):
    path = write(tmp_path / "r.jsonl", RUN,
                 time_row("g", "eager", 4.0, bytes=8 * MB, copy_gb_per_s=20.0),
                 time_row("g", "ext", 1.0, bytes=8 * MB, copy_gb_per_s=20.0, device_s=0.5e-3),
                 time_row("s", "eager loop", 200.0, suite="step", images_per_step=8))
    loss, step = (rows.table([r for r in rows.read(path) if r["suite"] == s]) for s in ("loss", "step"))
    assert loss[0] == ("| comparison | provider | median ms | IQR ms (q1-q3) | x eager | device ms | GB/s "
                       "| of copy |")
    # eager: 8 MB / 4 ms = 2 GB/s = 10% of 20; ext: by device time 8 MB / 0.5 ms = 16 GB/s = 80%.
    assert loss[2] == "| g | eager | 4.000 | 3.600-4.400 | 1.00 | - | 2.00 | 10.0% |"
    assert loss[3] == "| g | ext | 1.000 | 0.900-1.100 | 4.00 | 0.500 | 16.00 | 80.0% |"
    assert step[2] == "| s | eager loop | 200.0 | 180.0-220.0 | 1.00 | 40.00 |"


def test_a_comparison_without_eager_has_no_ratio_and_runs_do_not_mix(tmp_path):
    path = write(tmp_path / "r.jsonl", RUN, {**RUN, "id": "r2"},
                 time_row("g", "eager", 4.0), time_row("g", "ext", 1.0),
                 time_row("g", "eager", 8.0, run="r2"), time_row("g", "ext", 4.0, run="r2"),
                 time_row("h", "ext", 1.0))
    text = rows.blocks(rows.read(path))["loss-cuda"]
    assert text.count("Command:") == 2  # a block per run
    assert "| g | ext | 1.000 | 0.900-1.100 | 4.00 |" in text
    assert "| g | ext | 4.000 | 3.600-4.400 | 2.00 |" in text
    assert "| h | ext | 1.000 | 0.900-1.100 | n/a |" in text


def test_reading_skips_torn_lines_and_missing_files_and_merges_a_run(tmp_path):
    path = write(tmp_path / "r.jsonl", RUN, time_row("g", "eager", 1.0), {"kind": "run", "id": "r1",
                                                                          "load_end": 0.75})
    with path.open("a") as f:
        f.write('{"kind": "time", "group": "g", "prov')  # a crash mid-write
    got = rows.read(path, tmp_path / "missing.jsonl")
    assert len(got) == 1 and got[0]["run_info"]["load_start"] == 0.5
    assert got[0]["run_info"]["load_end"] == 0.75
    assert "0.50 at the start, 0.75 at the end" in rows.blocks(got)["loss-cuda"]


def test_blocks_replace_only_between_their_markers(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", RUN, time_row("g", "eager", 1.0))
    md = tmp_path / "B.md"
    md.write_text("intro\n<!-- bench:loss-cuda:start -->\nold\n<!-- bench:loss-cuda:end -->\noutro\n")
    assert rows.main(["write", str(md), str(path)]) == 0
    text = md.read_text()
    assert text.startswith("intro\n<!-- bench:loss-cuda:start -->\nCommand:") and text.endswith(
        "<!-- bench:loss-cuda:end -->\noutro\n") and "old" not in text and "| g | eager |" in text
    for bad in ("no markers\n", "<!-- bench:loss-cuda:start -->\n<!-- bench:loss-cuda:start -->\n"
                "<!-- bench:loss-cuda:end -->\n"):
        md.write_text(bad)
        assert rows.main(["write", str(md), str(path)]) == 2
        assert md.read_text() == bad and "needs exactly one" in capsys.readouterr().err


def test_gpu_summary_judges_each_target_and_keeps_every_failure(tmp_path):
    text = rows.summary(rows.read(gpu_run(tmp_path)), gpu=True)
    found = targets(text)
    assert one(found, "fused loss >= 62%")[0] == "MET" and "ext 70.0%" in one(found, "fused loss >= 62%")[1]
    assert one(found, "fused loss wall <= 1.5x")[0] == "MET"  # 1.2x its device time
    assert one(found, "fused loss faster than torch.compile")[0] == "MET"
    assert one(found, "train step engine >= 3x") == ("MET", "engine bf16 channels_last 4.00x")
    assert one(found, "CUDA graphs vs eager")[0] == "MET"
    busy = one(found, "train step GPU busy")
    assert busy[0] == "MET" and "MFU 20.0%" in busy[1] and "10.00 GiB" in busy[1]  # 2e13 / 0.1 s / 1e15
    # Each failure is a line with its error text; the rows measured beside it are all there.
    assert "FAILED: triton" in text and "RuntimeError: triton compile failed" in text
    assert "FAILED: engine bf16 channels_last + CUDA graphs" in text and "capture failed" in text
    # Steps: a timeout, a failed test step with its test's name, a skipped opt-in step.
    assert "| bench_loss | TIMEOUT after 50 s |" in text
    assert "| gpu_tests_kernels | FAIL (exit 1) | 20 (60) | 40 passed, 1 failed; failed: " \
           "tests/test_weighted_adv_loss_v2.py::test_x: AssertionError: off by 1e-3 |" in text
    assert "| bench_step_compile | skipped (opt-in: --with-compile) |" in text
    assert "| BW | ext |".replace("BW", BAND) in text  # the suite's own table follows


def test_gpu_summary_says_not_met_and_missing(tmp_path):
    slow = gpu_run(tmp_path, fused_frac=0.5, busy=0.8, engine_ms=200.0)
    found = targets(rows.summary(rows.read(slow), True))
    assert one(found, "fused loss >= 62%")[0] == "NOT MET"
    assert one(found, "train step engine >= 3x") == ("NOT MET", "engine bf16 channels_last 2.00x")
    assert one(found, "train step GPU busy")[0] == "NOT MET"
    empty = targets(rows.summary([], gpu=True))
    assert one(empty, "fused loss at")[0] == "missing"
    assert one(empty, "train step engine >= 3x")[0] == "missing"


def test_cpu_dry_run_summary_never_judges_a_target(tmp_path):
    found = targets(rows.summary(rows.read(gpu_run(tmp_path)), gpu=False))
    assert found and all(result == rows.NO_GPU for result, _ in found.values())


SUITE = '''
import pytest

SUITE = "loss"
CALLS = {}


def measure_for(case):
    def measure(selected):
        CALLS.setdefault(case, []).append(selected)
        scale = 1 if case == "x" else 10
        out = {(p,): {"samples_s": [scale * t for t in ts]} for p, ts in
               {"a": [0.003, 0.001, 0.002], "b": [0.004, 0.006, 0.005]}.items()}
        out[("c",)] = "RuntimeError: c broke"  # a provider that raised while the others were timed
        return out
    return measure


@pytest.mark.parametrize("case", ["x", "y"])
@pytest.mark.parametrize("provider", ["a", "b", "c"])
def test_provider(record, round_robin, request, case, provider):
    result = dict(round_robin.result(request, ("provider",), measure_for(case)))
    record(result.pop("samples_s"), f"g {case}", provider, **result)
    # One measurement per comparison (case), of its selected tests only (b-x is deselected).
    assert CALLS[case] == [[("a",), ("c",)] if case == "x" else [("a",), ("b",), ("c",)]]


@pytest.mark.parametrize("provider", ["z"])
def test_not_run(provider):
    pytest.skip("a reason")
'''


def test_suites_write_a_row_per_provider_as_measured_and_hand_samples_to_pytest_benchmark(tmp_path):
    """bench/conftest.py under a real pytest-benchmark run: each test's samples come back as its rounds
    exactly and as its time row; a provider that raised is a failed row with its error text (an
    injected one, --bench-fail, is an expected failure); skips are rows with their reason."""
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(SUITE))
    out, path = tmp_path / "out.json", tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    env.pop("PWDA_BENCH_ROWS", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "test_fake.py", "--deselect", "test_fake.py::test_provider[b-x]",
                          "--bench-device", "cpu",
                          f"--benchmark-json={out}", f"--bench-rows={path}", "--bench-fail", "c"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stats = {b["name"]: b["stats"] for b in json.loads(out.read_text())["benchmarks"]}
    assert stats["test_provider[a-x]"]["data"] == [0.003, 0.001, 0.002]
    assert stats["test_provider[b-y]"]["data"] == [0.04, 0.06, 0.05]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["kind"] == "run" and lines[-1] == {"kind": "run", "id": lines[0]["id"],
                                                       "load_end": lines[-1]["load_end"]}
    got = sorted((r["kind"], r.get("group") or "", r["provider"]) for r in lines[1:-1])
    assert got == [("failed", "", "c"), ("failed", "", "c"), ("skipped", "", "z"), ("time", "g x", "a"),
                   ("time", "g y", "a"), ("time", "g y", "b")]
    failed = [r for r in lines if r["kind"] == "failed"]
    assert [r["error"] for r in failed] == ["RuntimeError: c broke"] * 2
    assert next(r for r in lines if r["kind"] == "skipped")["reason"] == "a reason"
    assert all(r["run"] == lines[0]["id"] for r in lines[1:-1]) and "test_fake.py" in lines[0]["command"]


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:] + log[-4000:]
    # The summary is printed last and is the same as summary.md.
    summary = (out / "summary.md").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip())
    found = targets(summary)
    assert found and all(result == rows.NO_GPU for result, _ in found.values())
    for name in ("build", "gpu_tests_kernels", "triton_interpret", "bench_loss_production", "bench_loss",
                 "bench_upsample", "bench_step", "step_profile", "gpu_tests", "gpu_tests_graphs", "real_size",
                 "bench_step_compile"):
        assert f"| {name} | ok |" in summary, (name, summary)
    assert " passed" in summary.split("| triton_interpret |")[1].split("\n")[0]
    # One provider fails on purpose (--bench-fail): its row says so, the others are measured.
    assert ("FAILED: engine bf16 channels_last (test_train_step[engine-bf16]): RuntimeError: injected failure"
            in summary)
    numbers = one(found, "train step engine >= 3x")[1]
    assert "engine fp32 channels_last" in numbers
    assert "| (1, 19, 16, 32) fp32 fwd+bwd | ext |" in summary
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "rows.jsonl", "run.log", "summary.md"]
