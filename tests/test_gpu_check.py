"""bench/gpu_check.sh and its table (bench/gpu_summary.py): the table logic on made-up results for
both modes, and the whole script's CPU dry run end to end (slow)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
_spec = importlib.util.spec_from_file_location("gpu_summary", BENCH / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)

GPU_ROWS = ("build extension in place", "production call", "GPU tests: loss", "GPU tests: step",
            "GPU tests: CUDA graphs", "device copy bandwidth",
            "fused loss >= 62% of copy bandwidth", "fused loss faster than torch.compile",
            "train step engine/eager", "train step engine+compile/eager", "train step peak memory",
            "train step MFU", "real-size pipeline")


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    """check -> (result, numbers) from the markdown table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| check ", "|---")):
            check, result, numbers = (c.strip() for c in line.strip("|").split(" | ", 2))
            rows[check] = (result, numbers)
    return rows


def row(rows: dict, prefix: str) -> tuple[str, str]:
    matches = [v for k, v in rows.items() if k.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(rows))
    return matches[0]


def loss_row(shape, dtype, provider, ms, frac=None, mode="fwd+bwd", **extra):
    r = {"shape": shape, "dtype": dtype, "provider": provider, "median_ms": ms, "gb_per_s": 1000.0,
         "mode": mode, **extra}
    if frac is not None:
        r["fraction_of_copy"] = frac
    return r


def step_json(**images_per_s):
    return {"rows": [{"provider": p, "images_per_s": v, "median_s": 2 / v} for p, v in images_per_s.items()]}


def write_results(out: Path, build_rc=0, pytest_line="12 passed, 170 deselected in 9.81s"):
    """A made-up GPU run: run.log markers, the four JSON files."""
    log = [
        "@@step probe start limit=60",
        '@@probe {"python": "3.12.3", "torch": "2.11.0+cu130", "cuda": "13.0", "cuda_available": true, '
        '"device_name": "NVIDIA H200", "triton": "3.6.0"}',
        "@@step probe rc=0 seconds=3 limit=60",
        f"@@step build rc={build_rc} seconds=80 limit=150",
        '@@backends {"ext": {"cpu": null, "cuda": null}, "triton": {"cpu": "needs interpret", "cuda": null}}',
        "@@step backends rc=0 seconds=3 limit=60",
        "@@step gpu_tests_kernels start limit=60",
        "........", pytest_line,
        f"@@step gpu_tests_kernels rc={0 if 'failed' not in pytest_line else 1} seconds=20 limit=60",
        "@@step bench_loss_production rc=0 seconds=40 limit=75",
        "@@step bench_loss rc=0 seconds=50 limit=90",
        "@@step bench_step rc=0 seconds=40 limit=90",
        "@@step step_profile rc=0 seconds=20 limit=60",
        "@@step gpu_tests start limit=40", "6 passed in 20.1s", "@@step gpu_tests rc=0 seconds=21 limit=40",
        "@@step gpu_tests_graphs start limit=45", "4 passed in 30.5s",
        "@@step gpu_tests_graphs rc=0 seconds=31 limit=45",
        "@@step real_size start limit=130",
        '@@real_size {"iters": 50, "runs": [{"workers": 4, "rc": 0, "seconds": 40.0, "images_per_s": 15.0, '
        '"of_bench_step": 0.6}, {"workers": 8, "rc": 0, "seconds": 38.0, "images_per_s": 24.0, '
        '"of_bench_step": 0.96}], "bench_step_images_per_s": 25.0}',
        "@@step real_size rc=0 seconds=80 limit=130",
        "@@step bench_step_compile skipped time budget",
    ]
    (out / "run.log").write_text("\n".join(log) + "\n")
    prod = [4, 19, 512, 1024]
    (out / "bench_loss.json").write_text(json.dumps({"copy_gb_per_s": 4000.0, "rows": [
        loss_row(prod, "bf16", "eager", 2.0), loss_row(prod, "bf16", "compile", 0.5),
        loss_row(prod, "bf16", "ext", 0.2, 0.70), loss_row(prod, "bf16", "triton", 0.19, 0.85),
        loss_row(prod, "fp32", "eager", 3.0), loss_row(prod, "fp32", "triton", 0.3, 0.75),
        loss_row(prod, "bf16", "triton", 0.1, 0.9, mode="fwd")]}))
    call = dict(production=True, channels_last=True, disc_hw=[16, 32], aux_hw=[65, 129])
    (out / "bench_loss_production.json").write_text(json.dumps({"copy_gb_per_s": 4000.0, "rows": [
        loss_row([1, 19, 512, 1024], "fp32", p, ms, 0.5, mode=m, **call)
        for m, times in (("fwd", {"eager": 1.0, "compile": 0.4, "ext": 0.1}),
                         ("fwd+bwd", {"eager": 2.5, "compile": 0.8, "ext": 0.2, "triton": 0.125}))
        for p, ms in times.items()]}))
    (out / "bench_step.json").write_text(json.dumps(step_json(**{
        "eager fp32 NCHW (AdaptSegNet loop)": 4.0, "engine fp32 channels_last": 6.0,
        "engine bf16 channels_last": 10.0})))
    (out / "step_profile.json").write_text(json.dumps({
        "flops_per_iter": 2e12, "peak_flops": 1e15, "peak_note": "H200 dense bf16",
        "peak_memory_bytes": {"eager fp32 NCHW (AdaptSegNet loop)": 20 * 2**30,
                              "engine bf16 channels_last": 10 * 2**30},
        "breakdown": {"engine bf16 channels_last": {
            "steps": 3, "wall_ms_per_step": 152.0, "device_busy_ms_per_step": 123.0,
            "busy_fraction": 123.0 / 152.0, "time_kind": "device (self CUDA time)",
            "ms_per_step": {"convolution": 43.0, "norm (BatchNorm, GroupNorm)": 18.5,
                            "D_aux image size (upsample, leaky ReLU)": 24.0, "loss": 1.0, "optimizer": 2.0,
                            "casts and copies": 12.5, "other": 22.0}}}}))


def test_gpu_table_reports_targets_and_failures(tmp_path):
    write_results(tmp_path, build_rc=1, pytest_line="1 failed, 11 passed, 170 deselected in 9.81s")
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    assert row(rows, "environment")[1].startswith("python 3.12.3, torch 2.11.0+cu130")
    assert row(rows, "build extension")[0] == "FAIL (exit 1)"
    assert row(rows, "GPU tests: loss")[0] == "FAIL (exit 1)"
    assert "1 failed, 11 passed" in row(rows, "GPU tests: loss")[1]
    assert row(rows, "GPU tests: CUDA graphs") == ("pass", "4 passed; log: run.log (@@step gpu_tests_graphs)")
    assert row(rows, "device copy bandwidth") == ("measured", "4000 GB/s (1 GiB fp32 copy, read + write)")
    result, numbers = row(rows, "fused loss >= 62%")
    assert result == "MET" and numbers.startswith("best triton 0.190 ms: 85.0% of copy")
    assert row(rows, "fused loss faster than torch.compile")[0] == "MET"
    assert "triton 0.190 ms" in row(rows, "fused loss fwd+bwd 4x19x512x1024 bf16")[1]
    assert "triton 0.100 ms" in row(rows, "fused loss fwd 4x19x512x1024 bf16")[1]
    # The training loop's call: fwd and fwd+bwd, best fused against eager and torch.compile.
    result, numbers = row(rows, "production call")
    assert result == "measured"
    assert numbers == ("fwd: best ext 0.100 ms (50.0% of copy), 10.00x eager, 4.00x compile; "
                       "fwd+bwd: best triton 0.125 ms (50.0% of copy), 20.00x eager, 6.40x compile")
    result, numbers = row(rows, "train step engine/eager")
    assert result == "NOT MET" and numbers.endswith("best/eager 2.50x")
    assert row(rows, "train step engine+compile/eager")[0] == "skipped (time budget)"
    assert row(rows, "train step peak memory")[1] == (
        "eager fp32 NCHW (AdaptSegNet loop) 20.00 GiB; engine bf16 channels_last 10.00 GiB")
    # 2 TFLOP per iteration at 0.5 s (eager) on a 1 PFLOP/s device: 0.4%
    assert "eager fp32 NCHW (AdaptSegNet loop) 0.4%" in row(rows, "train step MFU")[1]
    assert row(rows, "train step GPU busy >= 95%: engine bf16") == (
        "NOT MET", "busy 81% (123.0 of 152.0 ms/step); device time: convolution 35%, D_aux image size "
        "(upsample, leaky ReLU) 20%, other 18%, norm (BatchNorm, GroupNorm) 15%, casts and copies 10%, "
        "optimizer 2%, loss 1%")
    assert row(rows, "real-size pipeline") == (
        "measured",
        "4 workers: 15.00 img/s = 60% of the bench step; 8 workers: 24.00 img/s = 96% of the bench step")


def test_gpu_table_passes_and_misses(tmp_path):
    write_results(tmp_path)
    data = json.loads((tmp_path / "bench_loss.json").read_text())
    for r in data["rows"]:
        if r["provider"] in ("ext", "triton") and r["dtype"] == "bf16":
            r["fraction_of_copy"], r["median_ms"] = 0.5, 0.6
    (tmp_path / "bench_loss.json").write_text(json.dumps(data))
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    assert row(rows, "build extension")[0] == "pass"
    assert row(rows, "GPU tests: loss") == ("pass", "12 passed, 170 deselected; log: run.log "
                                                    "(@@step gpu_tests_kernels)")
    assert row(rows, "fused loss >= 62%")[0] == "NOT MET"
    assert row(rows, "fused loss faster than torch.compile")[0] == "NOT MET"


def test_gpu_table_judges_by_device_time_and_reports_host_bound_calls(tmp_path):
    """Rows with a device time: the best fused provider is chosen and compared by it, and a wall time
    over 1.5x the device time is a missed target (the call is host-bound)."""
    write_results(tmp_path)
    prod = [4, 19, 512, 1024]
    (tmp_path / "bench_loss.json").write_text(json.dumps({"copy_gb_per_s": 4000.0, "rows": [
        loss_row(prod, "bf16", "compile", 0.9, device_ms=0.55, device_ops_per_call=10),
        loss_row(prod, "bf16", "ext", 0.675, 0.65, device_ms=0.141, device_ops_per_call=9),
        loss_row(prod, "bf16", "triton", 0.4, 0.30, device_ms=0.167, device_ops_per_call=16)]}))
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    result, numbers = row(rows, "fused loss >= 62%")
    assert result == "MET" and numbers.startswith("best ext 0.675 ms (device 0.141 ms, 9 ops): 65.0%")
    assert row(rows, "fused loss wall <= 1.5x") == ("NOT MET", "ext: wall 0.675 ms = 4.79x device")
    result, numbers = row(rows, "fused loss faster than torch.compile")
    assert result == "MET" and numbers.endswith("(3.90x by device time)")


def test_a_failed_provider_keeps_the_others_and_shows_its_error(tmp_path):
    """bench_step.json as a crash in the CUDA-graphs provider leaves it: the other providers' rows make
    the ratio and the MFU, the failure is a row of its own with its error text, and the graphs-vs-eager
    agreement row says what happened."""
    write_results(tmp_path)
    data = json.loads((tmp_path / "bench_step.json").read_text())
    graphs = "engine bf16 channels_last + CUDA graphs"
    data["rows"].append({"provider": graphs, "error": "RuntimeError: CUDA error: operation not permitted "
                                                       "when stream is capturing"})
    data["graphs_agreement"] = {"eager": "engine bf16 channels_last", "graphed": graphs, "steps": 6,
                                "tolerance_rel": 0.02, "max_rel_diff": 1e-3, "agree": True,
                                "captured": False, "capture_failed": "RuntimeError: boom"}
    (tmp_path / "bench_step.json").write_text(json.dumps(data))
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    assert row(rows, "train step engine/eager")[1].endswith("best/eager 2.50x")
    assert row(rows, f"train step provider: {graphs}") == (
        "FAILED", "RuntimeError: CUDA error: operation not permitted when stream is capturing")
    assert row(rows, "CUDA graphs vs eager") == (
        "NOT MET", "max relative difference 1.00e-03; captured: False; capture failed, ran eagerly: "
                   "RuntimeError: boom")
    assert "engine bf16 channels_last 1.0%" in row(rows, "train step MFU")[1]  # 2 TFLOP in 0.2 s


def test_a_failed_loss_provider_and_a_failed_graph_capture_are_rows(tmp_path):
    write_results(tmp_path)
    data = json.loads((tmp_path / "bench_loss.json").read_text())
    prod = [4, 19, 512, 1024]
    data["rows"][2].update(device_ms=0.05, device_ops_per_call=2, graph_ms=0.04, graph_error=None)
    data["rows"][3].update(device_ms=0.06, device_ops_per_call=3, graph_ms=None,
                           graph_error="RuntimeError: capture failed")
    data["rows"].append({"shape": prod, "dtype": "bf16", "provider": "ext_v2", "mode": "fwd+bwd",
                         "error": "RuntimeError: CUDA error: misaligned address"})
    (tmp_path / "bench_loss.json").write_text(json.dumps(data))
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    assert row(rows, "fused loss provider ext_v2 fwd+bwd 4x19x512x1024 bf16") == (
        "FAILED", "RuntimeError: CUDA error: misaligned address")
    assert row(rows, "fused loss graph replay triton fwd+bwd 4x19x512x1024 bf16") == (
        "FAILED", "RuntimeError: capture failed")
    assert "ext 0.200 ms (device 0.050 ms, 2 ops, graph replay 0.040 ms)" in row(
        rows, "fused loss fwd+bwd 4x19x512x1024 bf16")[1]


def test_cpu_dry_run_table_never_passes_a_gpu_row(tmp_path):
    write_results(tmp_path)  # even with numbers that would meet every target
    (tmp_path / "bench_step.json").write_text(json.dumps(step_json(**{
        "eager fp32 NCHW (AdaptSegNet loop)": 1.0, "engine bf16 channels_last": 10.0})))
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "cpu"), "cpu"))
    for prefix in GPU_ROWS:
        assert row(rows, prefix)[0] == "skipped (no GPU)", prefix


def test_missing_files_are_reported_not_crashed_on(tmp_path):
    rows = table_rows(gpu_summary.render(gpu_summary.build_table(tmp_path, "gpu"), "gpu"))
    assert row(rows, "environment")[0] == "missing"
    assert row(rows, "production call")[0] == "not run"
    assert row(rows, "fused loss benchmark")[0] == "not run"
    assert row(rows, "train step MFU")[0] == "not run"


def test_pytest_result_lines_parse():
    for line, counts in [("4 skipped, 174 deselected in 3.58s", {"skipped": 4, "deselected": 174}),
                         ("===== 1 failed, 3 passed in 0.50s =====", {"failed": 1, "passed": 3}),
                         ("2 passed, 1 warning in 1.00s", {"passed": 2, "warning": 1})]:
        log = gpu_summary.parse_run_log(f"@@step t start limit=9\n{line}\n@@step t rc=0 seconds=1 limit=9")
        assert log["pytest"]["t"] == counts and log["steps"]["t"]["rc"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not (BENCH / "bench_step.py").exists(), reason="bench/bench_step.py is not written yet")
def test_cpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--cpu-dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:] + log[-4000:]
    # The table is printed last and is the same as summary.md.
    summary = (out / "summary.md").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip())
    rows = table_rows(summary)
    for prefix in GPU_ROWS:
        assert row(rows, prefix)[0] == "skipped (no GPU)", (prefix, summary)
    assert row(rows, "triton kernel under TRITON_INTERPRET=1")[0] == "pass (cpu interpreter)"
    assert row(rows, "fused loss fwd+bwd 1x19x16x32 bf16")[0] == "ran (cpu, tiny)"
    # One provider fails on purpose (bench_step --fail): its row says so, the others are measured.
    assert row(rows, "train step provider: engine bf16 channels_last") == (
        "FAILED", "RuntimeError: injected failure (--fail): this provider raises on its first step")
    numbers = row(rows, "train step engine/eager")[1]
    assert "eager fp32 NCHW (AdaptSegNet loop)" in numbers and "engine fp32 channels_last" in numbers
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() and p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    assert {"summary.md", "run.log", "bench_loss_production.json", "bench_loss.json", "bench_step.json",
            "step_profile.json"} <= set(files)
