"""bench/tables.py (BENCHMARKS.md's tables from the bench suites' JSON) on hand-written results, and
the bench suites' interleaving plumbing (bench/conftest.py) under a real pytest-benchmark run."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

TRITON_REASON = "Triton on CPU runs in its interpreter: not a benchmark"


def stats(median, q1, q3, rounds=15):
    # mean and min deliberately far from the median: the tables must report the median.
    return {"median": median, "q1": q1, "q3": q3, "mean": 3 * median, "min": median / 3, "rounds": rounds}


def loss_bench(provider, median, q1, q3, *, shape=(2, 19, 256, 512), mode="fwd+bwd", nbytes=2e7, **info):
    extra = {"suite": "loss", "device": "cpu", "provider": provider, "shape": list(shape),
             "disc_hw": list(shape[2:]), "aux_hw": list(shape[2:]), "channels_last": False,
             "production": False, "dtype": "fp32", "mode": mode, "bytes": nbytes, "copy_gb_per_s": 50.0,
             "calls_per_sample": 1, "warmup": 2, **info}
    return {"name": f"test_weighted_adv_loss[{provider}]", "extra_info": extra,
            "stats": stats(median, q1, q3)}


def run_json(benchmarks, not_measured=()):
    return {"machine_info": {"python_version": "3.11.7", "pwda_fast": {
                "device": "cpu", "machine": "AMD EPYC (AVX-512), 2 threads", "torch": "2.14.1+cu130",
                "threads": 2, "load_average_1min": {"start": 0.1, "end": 0.25},
                "command": "python -m pytest bench/test_bench_loss.py --benchmark-json=x.json"}},
            "commit_info": {"id": "abcdef1234567890", "dirty": True},
            "datetime": "2026-11-29T08:50:12.345678+00:00", "benchmarks": benchmarks,
            "not_measured": list(not_measured)}


LOSS = run_json([
    loss_bench("eager", 8e-3, 7.5e-3, 9e-3), loss_bench("compile", 4e-3, 3.9e-3, 4.2e-3),
    loss_bench("ext", 2e-3, 1.95e-3, 2.1e-3),
    loss_bench("eager", 0.150, 0.140, 0.160, shape=(2, 19, 512, 1024), mode="fwd", nbytes=1.5e8,
               channels_last=True, production=True, disc_hw=[16, 32]),
    loss_bench("ext", 0.0125, 0.0120, 0.0131, shape=(2, 19, 512, 1024), mode="fwd", nbytes=1.5e8,
               channels_last=True, production=True, disc_hw=[16, 32]),
], not_measured=[{"test": "t[a-triton]", "provider": "triton", "reason": TRITON_REASON},
                 {"test": "t[b-triton]", "provider": "triton", "reason": TRITON_REASON}])


def step_bench(provider, median, q1, q3):
    extra = {"suite": "step", "device": "cpu", "provider": provider, "preset": "toy", "batch": 4,
             "crop": [96, 192], "depth": 14, "width": 16, "images_per_step": 8, "loss_backend": "ext",
             "iterations_per_round": 4, "warmup": 2}
    return {"name": f"test_train_step[{provider}]", "extra_info": extra, "stats": stats(median, q1, q3, 20)}


STEP = run_json([step_bench("eager fp32 NCHW (AdaptSegNet loop)", 0.150, 0.140, 0.170),
                 step_bench("engine fp32 channels_last", 0.150, 0.130, 0.160),
                 step_bench("engine bf16 channels_last", 0.100, 0.095, 0.110)])


def table_lines(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| case ")
            and not ln.startswith("| provider ")]


def test_loss_table_median_iqr_ratio_and_bandwidth():
    block = tables.render(LOSS, "bench/results/loss-cpu.json")
    assert table_lines(block) == [
        "| (2, 19, 256, 512) | fp32 | fwd+bwd | eager | 8.000 | 7.500-9.000 | 1.00 | 2.50 | 5.0% |",
        "| (2, 19, 256, 512) | fp32 | fwd+bwd | compile | 4.000 | 3.900-4.200 | 2.00 | 5.00 | 10.0% |",
        "| (2, 19, 256, 512) | fp32 | fwd+bwd | ext | 2.000 | 1.950-2.100 | 4.00 | 10.00 | 20.0% |",
        "| production: (2, 19, 512, 1024) channels_last, D 16x32, D_aux full size | fp32 | fwd | eager | "
        "150.0 | 140.0-160.0 | 1.00 | 1.00 | 2.0% |",
        "| production: (2, 19, 512, 1024) channels_last, D 16x32, D_aux full size | fp32 | fwd | ext | "
        "12.50 | 12.00-13.10 | 12.00 | 12.00 | 24.0% |",
    ]
    assert "Command: `python -m pytest bench/test_bench_loss.py --benchmark-json=x.json`" in block
    assert "commit abcdef1 with uncommitted changes. Date: 2026-11-29 08:50 UTC." in block
    assert "Load average (1 min): 0.10 at the start, 0.25 at the end." in block
    assert "same 15 rounds, after 2 untimed call(s) each" in block and "50.0 GB/s" in block
    # Each skipped provider once, with its reason.
    assert block.count(f"Not measured: triton ({TRITON_REASON}).") == 1


def test_step_table_images_per_second_and_ratio():
    block = tables.render(STEP, "bench/results/step-cpu.json")
    assert table_lines(block) == [
        "| eager fp32 NCHW (AdaptSegNet loop) | 150.0 | 140.0-170.0 | 53.33 | 1.00 |",
        "| engine fp32 channels_last | 150.0 | 130.0-160.0 | 53.33 | 1.00 |",
        "| engine bf16 channels_last | 100.0 | 95.00-110.0 | 80.00 | 1.50 |",
    ]
    assert "Preset toy (depth 14, width 16), batch 4+4 (source + target) at 96x192" in block
    assert "20 samples per provider, each 4 iterations back to back up to one device sync" in block
    assert "Not measured" not in block


def test_no_eager_row_gives_no_ratio():
    data = run_json([loss_bench("ext", 2e-3, 1.9e-3, 2.1e-3)])
    assert "| ext | 2.000 | 1.900-2.100 | n/a | 10.00 | 20.0% |" in tables.render(data, "x.json")


DOC = ("# Benchmarks\n\nintro\n<!-- bench:loss-cpu:start -->\nold loss table\n<!-- bench:loss-cpu:end -->\n"
       "between\n<!-- bench:step-cpu:start -->\nold step table\n<!-- bench:step-cpu:end -->\nafter\n")


def test_blocks_replace_only_between_their_markers(tmp_path):
    (tmp_path / "loss.json").write_text(json.dumps(LOSS))
    (tmp_path / "step.json").write_text(json.dumps(STEP))
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(DOC)
    args = ["--write", str(md), str(tmp_path / "loss.json"), str(tmp_path / "step.json")]
    assert tables.main(args) == 0
    text = md.read_text()
    assert "old loss table" not in text and "old step table" not in text
    loss_block = tables.render(LOSS, str(tmp_path / "loss.json"))
    step_block = tables.render(STEP, str(tmp_path / "step.json"))
    assert text == ("# Benchmarks\n\nintro\n<!-- bench:loss-cpu:start -->\n" + loss_block
                    + "<!-- bench:loss-cpu:end -->\nbetween\n<!-- bench:step-cpu:start -->\n" + step_block
                    + "<!-- bench:step-cpu:end -->\nafter\n")
    assert tables.main(args) == 0 and md.read_text() == text  # a rerun replaces, never appends


def test_missing_or_doubled_marker_is_an_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "loss.json").write_text(json.dumps(LOSS))
    md = tmp_path / "BENCHMARKS.md"
    for doc in ("# no markers\n", DOC + "<!-- bench:loss-cpu:start -->\n"):
        md.write_text(doc)
        assert tables.main(["--write", str(md), str(tmp_path / "loss.json")]) == 2
        assert md.read_text() == doc
        assert "<!-- bench:loss-cpu:start -->" in capsys.readouterr().err


def test_json_of_mixed_or_no_suites_is_refused(tmp_path):
    mixed = run_json(LOSS["benchmarks"] + STEP["benchmarks"])
    for name, data in (("mixed.json", mixed), ("empty.json", run_json([]))):
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(tables.TablesError, match=name):
            tables.load(tmp_path / name)


REPLAY_SUITE = '''
import pytest

SAMPLES = {"a": [0.003, 0.001, 0.002], "b": [0.004, 0.006, 0.005], "c": [0.5, 0.5, 0.5]}
CALLS = {}


def measure_for(case):
    def measure(selected):
        CALLS.setdefault(case, []).append(selected)
        scale = 1 if case == "x" else 10
        return {(p,): [scale * t for t in ts] for p, ts in SAMPLES.items()}
    return measure


@pytest.mark.parametrize("case", ["x", "y"])
@pytest.mark.parametrize("provider", ["a", "b", "c"])
def test_provider(record, round_robin, request, case, provider):
    samples = round_robin.samples(request, ("provider",), measure_for(case))
    record(samples, f"g {case}", suite="loss", case=case, provider=provider)
    # One measurement per comparison (case), of its selected tests only (c-x is deselected).
    assert CALLS[case] == [[("a",), ("b",)] if case == "x" else [("a",), ("b",), ("c",)]]


def test_not_run():
    pytest.skip("a reason")
'''


def test_suites_hand_interleaved_samples_to_pytest_benchmark(tmp_path):
    """bench/conftest.py under a real pytest-benchmark run: each test's samples come back as its
    rounds exactly, each comparison is measured once over its selected tests, skips are listed."""
    (tmp_path / "test_replay.py").write_text(textwrap.dedent(REPLAY_SUITE))
    out = tmp_path / "out.json"
    path = [str(ROOT / "bench")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "test_replay.py", "--deselect", "test_replay.py::test_provider[c-x]",
                          "--bench-device", "cpu", f"--benchmark-json={out}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    got = {(b["extra_info"]["case"], b["extra_info"]["provider"]): b["stats"] for b in data["benchmarks"]}
    assert sorted(got) == [("x", "a"), ("x", "b"), ("y", "a"), ("y", "b"), ("y", "c")]
    assert got[("x", "a")]["data"] == [0.003, 0.001, 0.002] and got[("x", "a")]["median"] == 0.002
    assert got[("x", "b")]["data"] == [0.004, 0.006, 0.005] and got[("x", "b")]["median"] == 0.005
    assert got[("y", "c")]["data"] == [5.0, 5.0, 5.0]
    assert data["not_measured"] == [{"test": "test_not_run", "provider": None, "reason": "a reason"}]
    info = data["machine_info"]["pwda_fast"]
    assert info["device"] == "cpu" and "test_replay.py" in info["command"]
