"""The results table of bench/gpu_check.sh: reads what the steps left in OUT, writes OUT/summary.md.

    python bench/gpu_summary.py --out DIR --mode gpu|cpu

Inputs (any may be missing; the table says so): run.log ("@@step NAME rc=.. seconds=.." markers,
"@@probe {json}", "@@backends {json}", pytest's result lines), build.log, bench_loss_production.json
(the training loop's call, run first), bench_loss.json (the bandwidth rows), bench_step.json,
bench_step_compile.json, step_profile.json. Needs no torch, so the table logic is
testable anywhere. In cpu (dry-run) mode every row that needs a GPU says "skipped (no GPU)", never
a pass: the dry run only shows that the steps run and the files parse.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# Fused loss fwd+bwd by device time, fraction of the device copy bandwidth (<= 35 us on an H200).
COPY_TARGET = 0.62
HOST_TARGET = 1.5  # fused loss fwd+bwd: wall time per call at most this many times its device time
BUSY_TARGET = 0.95  # train step: device-busy time over wall time
STEP_TARGET = 3.0  # engine images/s over the eager fp32 loop's (the product's target)
PRODUCTION_SHAPE = [4, 19, 512, 1024]  # the bandwidth target's shape (full-size maps, bf16)
PRODUCTION_CALL = "production call (2x19x512x1024 fp32 channels_last, D 16x32, D_aux at image size)"
FUSED = ("ext", "ext_v2", "triton")
NO_GPU = "skipped (no GPU)"
BANDWIDTH_ROW = f"fused loss >= {COPY_TARGET:.0%} of copy bandwidth by device time (4x19x512x1024 bf16)"

_STEP_RE = re.compile(r"^@@step (\S+) (?:rc=(-?\d+) seconds=(\d+) limit=(\d+)|skipped (.*)|start .*)$")
_PYTEST_RE = re.compile(r"^(?:=+ )?((?:\d+ \w+(?:, )?)+) in [\d.]+s")


def parse_run_log(text: str) -> dict:
    """-> {"steps": {name: {"rc", "seconds", "limit"} | {"skipped": reason}}, "probe", "backends",
    "real_size", "pytest": {step name: {"passed": n, ...}}} from run.log."""
    steps, pytest, probe, backends, real_size, current = {}, {}, None, None, None, None
    for line in text.splitlines():
        m = _STEP_RE.match(line)
        if m:
            name = m.group(1)
            if m.group(2) is not None:
                steps[name] = {"rc": int(m.group(2)), "seconds": int(m.group(3)), "limit": int(m.group(4))}
                current = None
            elif m.group(5) is not None:
                steps[name] = {"skipped": m.group(5)}
            else:
                current = name
            continue
        if line.startswith("@@probe "):
            probe = _loads(line[len("@@probe "):])
        elif line.startswith("@@backends "):
            backends = _loads(line[len("@@backends "):])
        elif line.startswith("@@real_size "):
            real_size = _loads(line[len("@@real_size "):])
        elif current is not None and (m := _PYTEST_RE.match(line.strip())):
            pytest[current] = {w: int(n) for n, w in (part.split() for part in m.group(1).split(", "))}
    return {"steps": steps, "pytest": pytest, "probe": probe, "backends": backends, "real_size": real_size}


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_status(steps: dict, name: str) -> str | None:
    """None when the step ran and exited 0; else a short reason for the table."""
    s = steps.get(name)
    if s is None:
        return "not run"
    if "skipped" in s:
        return f"skipped ({s['skipped']})"
    if s["rc"] in (124, 137):
        return f"TIMEOUT after {s['seconds']} s"
    if s["rc"] != 0:
        return f"FAIL (exit {s['rc']})"
    return None


def _ms(row: dict) -> str:
    """e.g. "ext 0.675 ms (device 0.141 ms, 9 ops)"; rows from before device time: wall only."""
    text = f"{row['provider']} {row['median_ms']:.3f} ms"
    if row.get("device_ms") is not None:
        graph = f", graph replay {row['graph_ms']:.3f} ms" if row.get("graph_ms") is not None else ""
        text += f" (device {row['device_ms']:.3f} ms, {row['device_ops_per_call']:.0f} ops{graph})"
    return text


def loss_failure_rows(bench: dict | None) -> list[tuple[str, str, str]]:
    """A row per fused-loss provider, mode and case that raised (its error text), or whose graph
    capture failed (the device time by graph replay is then missing)."""
    rows = []
    for r in (bench or {}).get("rows", []):
        where = f"{r['provider']} {_mode(r)} {_case_label(r)}"
        if "error" in r:
            rows.append((f"fused loss provider {where}", "FAILED", r["error"]))
        elif r.get("graph_error"):
            rows.append((f"fused loss graph replay {where}", "FAILED", r["graph_error"]))
    return rows


def _timed(bench: dict | None) -> list[dict]:
    return [r for r in (bench or {}).get("rows", []) if "error" not in r]


def _dev_ms(row: dict) -> float:
    """Device time where measured, else wall (CPU rows and rows from before device time)."""
    return row["device_ms"] if row.get("device_ms") is not None else row["median_ms"]


def _mode(row: dict) -> str:
    return row.get("mode", "fwd+bwd")  # rows written before fwd was timed separately are fwd+bwd


def _case_label(r: dict) -> str:
    """e.g. "4x19x512x1024 bf16", "1x19x512x1024 fp32 CL D16x32 Daux65x129"."""
    label = f"{'x'.join(map(str, r['shape']))} {r['dtype']}" + (" CL" if r.get("channels_last") else "")
    full = list(r["shape"][2:])
    for name, key in (("D", "disc_hw"), ("Daux", "aux_hw")):
        if r.get(key) not in (None, full):
            label += f" {name}{'x'.join(map(str, r[key]))}"
    return label


def production_rows(bench: dict | None, gpu: bool, status: str | None) -> list[tuple[str, str, str]]:
    """The training loop's own call, fwd and fwd+bwd: fused vs eager and torch.compile."""
    rows = [r for r in _timed(bench) if r.get("production")]
    if not gpu:
        return [(PRODUCTION_CALL, NO_GPU, "cpu dry run times a tiny stand-in; see the per-case rows")]
    if not rows:
        return [(PRODUCTION_CALL, status or "missing", "no production rows in bench_loss_production.json")]
    parts = []
    for mode in ("fwd", "fwd+bwd"):
        by = {r["provider"]: r for r in rows if _mode(r) == mode}
        fused = [r for p, r in by.items() if p in FUSED]
        if not fused:
            parts.append(f"{mode}: no fused row")
            continue
        best = min(fused, key=_dev_ms)
        text = f"{mode}: best {_ms(best)} ({best['fraction_of_copy']:.1%} of copy)"
        for ref in ("eager", "compile"):
            if ref in by:
                text += f", {by[ref]['median_ms'] / best['median_ms']:.2f}x {ref}"
        parts.append(text)
    return [(PRODUCTION_CALL, "measured", "; ".join(parts))]


def loss_rows(bench: dict, gpu: bool) -> list[tuple[str, str, str]]:
    """Table rows from the loss benchmark: the targets at the bandwidth shape (GPU), then each case."""
    rows, by_case = [], {}
    for r in _timed(bench):
        if not r.get("production"):
            by_case.setdefault((_mode(r), _case_label(r)), {})[r["provider"]] = r
    copy = bench.get("copy_gb_per_s")
    if gpu:
        rows.append(("device copy bandwidth", "measured" if copy else "missing",
                     f"{copy:.0f} GB/s (1 GiB fp32 copy, read + write)" if copy else "no copy_gb_per_s"))
        prod = by_case.get(("fwd+bwd", f"{'x'.join(map(str, PRODUCTION_SHAPE))} bf16"), {})
        fused = {p: r for p, r in prod.items() if p in FUSED}
        if not fused:
            rows.append((BANDWIDTH_ROW, "missing", "no ext or triton row at the production shape"))
        else:
            best = max(fused.values(), key=lambda r: r.get("fraction_of_copy") or 0)
            frac = best.get("fraction_of_copy") or 0
            rows.append((BANDWIDTH_ROW, "MET" if frac >= COPY_TARGET else "NOT MET",
                         f"best {_ms(best)}: {frac:.1%} of copy ({best['gb_per_s']:.0f} GB/s); "
                         + "; ".join(f"{p} {r.get('fraction_of_copy', 0):.1%}" for p, r in fused.items())))
            if best.get("device_ms") is not None:
                ratio = best["median_ms"] / best["device_ms"]
                rows.append((f"fused loss wall <= {HOST_TARGET}x device time (4x19x512x1024 bf16)",
                             "MET" if ratio <= HOST_TARGET else "NOT MET",
                             f"{best['provider']}: wall {best['median_ms']:.3f} ms = {ratio:.2f}x device"))
            comp = prod.get("compile")
            if comp is None:
                rows.append(("fused loss faster than torch.compile(reference)", "missing", "no compile row"))
            else:
                rows.append(("fused loss faster than torch.compile(reference)",
                             "MET" if _dev_ms(best) < _dev_ms(comp) else "NOT MET",
                             f"{_ms(best)} vs {_ms(comp)} "
                             f"({_dev_ms(comp) / _dev_ms(best):.2f}x by device time)"))
    for (mode, label), provs in by_case.items():
        nums = ", ".join(_ms(r) for r in provs.values())
        fracs = [f"{p} {r['fraction_of_copy']:.1%}" for p, r in provs.items()
                 if p in FUSED and r.get("fraction_of_copy") is not None]
        rows.append((f"fused loss {mode} {label}", "measured" if gpu else "ran (cpu, tiny)",
                     nums + (f"; of copy: {', '.join(fracs)}" if fracs and gpu else "")))
    return rows


def _step_ratio_row(label: str, bench: dict, gpu: bool, compiled: bool) -> tuple[str, str, str]:
    rows = [r for r in bench.get("rows", []) if "images_per_s" in r]  # failed providers: step_failure_rows
    eager = next((r for r in rows if r["provider"].startswith("eager")), None)
    engines = [r for r in rows
               if r["provider"].startswith("engine") and ("compile" in r["provider"]) == compiled]
    if eager is None or not engines:
        return label, "missing", "no eager or engine row in the JSON"
    best = max(engines, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / eager["images_per_s"]
    nums = "; ".join(f"{r['provider']} {r['images_per_s']:.2f} img/s" for r in [eager] + engines)
    nums += f"; best/eager {ratio:.2f}x"
    if not gpu:
        return label, NO_GPU, f"cpu toy dry run (not the target measurement): {nums}"
    return label, "MET" if ratio >= STEP_TARGET else "NOT MET", nums


def step_failure_rows(bench: dict, gpu: bool) -> list[tuple[str, str, str]]:
    """A row per train-step provider that failed (its error text), and the graphs-vs-eager agreement."""
    rows = [(f"train step provider: {r['provider']}", "FAILED",
             r["error"] + (" (after some timed samples)" if "median_s" in r else ""))
            for r in bench.get("rows", []) if "error" in r]
    agree = bench.get("graphs_agreement")
    if agree:
        label = (f"CUDA graphs vs eager: first {agree['steps']} steps' losses within "
                 f"{agree['tolerance_rel']:.0%}")
        if "error" in agree:
            rows.append((label, "FAILED", agree["error"]))
        else:
            text = f"max relative difference {agree['max_rel_diff']:.2e}; captured: {agree['captured']}"
            if agree["capture_failed"]:
                text += f"; capture failed, ran eagerly: {agree['capture_failed']}"
            ok = agree["agree"] and agree["captured"]
            rows.append((label, ("MET" if ok else "NOT MET") if gpu else NO_GPU, text))
    return rows


def real_size_row(result: dict | None, gpu: bool, status: str | None) -> tuple[str, str, str]:
    """The real-size pipeline runs: training images/s per loader worker count against the bench step."""
    label = "real-size pipeline keeps up (GTA5 -> Cityscapes trees, torchrun, images/s vs bench step)"
    if result is None:
        return label, status or "missing", "no @@real_size line; log: run.log"
    parts = []
    for r in result.get("runs", []):
        if r.get("rc") != 0:
            parts.append(f"{r['workers']} workers: exit {r.get('rc')}")
        elif r.get("images_per_s") is None:
            parts.append(f"{r['workers']} workers: ran ({r['seconds']} s), too few steps to time")
        else:
            ratio = f" = {r['of_bench_step']:.0%} of the bench step" if r.get("of_bench_step") else ""
            parts.append(f"{r['workers']} workers: {r['images_per_s']:.2f} img/s{ratio}")
    text = "; ".join(parts) or "no runs"
    if not gpu:
        return label, NO_GPU, f"cpu dry run (tiny model): {text}"
    return label, status or "measured", text


def _gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def profile_rows(profile: dict | None, steps_json: list[dict], gpu: bool,
                 status: str | None = None) -> list[tuple[str, str, str]]:
    if profile is None:
        result = NO_GPU if not gpu else (status or "missing")
        return [("train step peak memory", result, "no step_profile.json; log: run.log"),
                ("train step MFU", result, "no step_profile.json; log: run.log")]
    mem = "; ".join(f"{name} {_gib(b)}" for name, b in profile.get("peak_memory_bytes", {}).items())
    flops = profile.get("flops_per_iter")
    peak = profile.get("peak_flops")
    timed = {}
    for bench in steps_json:
        for r in bench.get("rows", []):
            if "median_s" in r:
                timed.setdefault(r["provider"], r["median_s"])
    if flops and peak:
        mfu = "; ".join(f"{name} {flops / s / peak:.1%}" for name, s in timed.items())
        mfu += f" (model FLOPs {flops / 1e9:.0f} GFLOP/iter vs {profile.get('peak_note')})"
    else:
        mfu = f"model FLOPs {flops / 1e9:.2f} GFLOP/iter; {profile.get('peak_note')}" if flops \
            else "no FLOP count"
    if not gpu:
        return [("train step peak memory", NO_GPU, "cpu dry run: " + mem),
                ("train step MFU", NO_GPU, "cpu dry run: " + mfu),
                *breakdown_rows(profile.get("breakdown", {}), gpu)]
    return [("train step peak memory", "measured", mem), ("train step MFU", "measured", mfu),
            *breakdown_rows(profile.get("breakdown", {}), gpu)]


def breakdown_rows(breakdown: dict, gpu: bool) -> list[tuple[str, str, str]]:
    """Per provider: the GPU-busy fraction against its target, and the shares of the step's time by
    category (step_profile.py CATEGORIES)."""
    rows = []
    for name, b in breakdown.items():
        total = sum(b["ms_per_step"].values()) or 1.0
        shares = ", ".join(f"{cat} {ms / total:.0%}" for cat, ms in
                           sorted(b["ms_per_step"].items(), key=lambda kv: -kv[1]) if ms / total >= 0.005)
        label = f"train step GPU busy >= {BUSY_TARGET:.0%}: {name}"
        if not gpu or "busy_fraction" not in b:
            rows.append((label, NO_GPU, f"cpu dry run, {b['time_kind']}: {shares}"))
            continue
        rows.append((label, "MET" if b["busy_fraction"] >= BUSY_TARGET else "NOT MET",
                     f"busy {b['busy_fraction']:.0%} ({b['device_busy_ms_per_step']:.1f} of "
                     f"{b['wall_ms_per_step']:.1f} ms/step); device time: {shares}"))
    return rows


def _environment_row(p: dict | None, steps: dict) -> tuple[str, str, str]:
    p = p or {}
    return ("environment", "ok" if p else "missing",
            f"python {p.get('python')}, torch {p.get('torch')} (CUDA {p.get('cuda')}), "
            f"triton {p.get('triton')}, device {p.get('device_name') or 'cpu only'}" if p
            else step_status(steps, "probe") or "no @@probe line")


def _build_row(b: dict | None, steps: dict, gpu: bool) -> tuple[str, str, str]:
    b = b or {}
    ext_cuda = (b.get("ext") or {}).get("cuda", "unknown") if b else "unknown"
    ext_note = "ext CUDA kernel registered" if b and ext_cuda is None else f"ext on cuda: {ext_cuda}"
    st = step_status(steps, "build")
    secs = steps.get("build", {}).get("seconds")
    if gpu:
        return ("build extension in place (CUDA sm_90)",
                st or ("pass" if b and ext_cuda is None else "FAIL (no CUDA kernel)"),
                (f"{secs} s; " if secs is not None else "") + ext_note + "; log: build.log")
    ext_cpu = (b.get("ext") or {}).get("cpu", "unknown") if b else "unknown"
    return ("build extension in place (CUDA sm_90)", NO_GPU,
            "dry run compiles nothing: setup.py evaluated "
            + ("OK" if st is None else st) + "; existing pwda_fast._C on cpu: "
            + ("loads" if ext_cpu is None else str(ext_cpu)))


GPU_TEST_STEPS = {"gpu_tests_kernels": "GPU tests: loss and upsample kernels (pytest -m gpu)",
                  "gpu_tests": "GPU tests: step, skips, fp16 (pytest -m gpu)",
                  "gpu_tests_graphs": "GPU tests: CUDA graphs (pytest -m gpu, own process)"}


def _test_rows(pytest_counts: dict, steps: dict, gpu: bool) -> list[tuple[str, str, str]]:
    rows = []
    for name, label in GPU_TEST_STEPS.items():
        counts = pytest_counts.get(name, {})
        count_txt = ", ".join(f"{n} {w}" for w, n in counts.items()) or "no pytest summary line"
        st = step_status(steps, name)
        bad = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
        if gpu:
            result = st or ("FAIL" if bad else "pass" if counts.get("passed") else "none ran")
        else:
            result = "FAIL" if bad else (st or NO_GPU)
        rows.append((label, result, count_txt + f"; log: run.log (@@step {name})"))
    if not gpu:
        counts = pytest_counts.get("triton_interpret", {})
        st = step_status(steps, "triton_interpret")
        ok = st is None and counts.get("passed") and not counts.get("failed")
        rows.append(("triton kernel under TRITON_INTERPRET=1 (cpu, cheap cases)",
                     "pass (cpu interpreter)" if ok else (st or "FAIL"),
                     ", ".join(f"{n} {w}" for w, n in counts.items()) or "no pytest summary line"))
    return rows


def _kernel_bench_rows(out: Path, steps: dict, gpu: bool) -> list[tuple[str, str, str]]:
    """The training loop's call first, then bandwidth and the fused loss per case, then the upsample."""
    production = _read_json(out / "bench_loss_production.json")
    rows = production_rows(production, gpu, step_status(steps, "bench_loss_production"))
    rows.extend(loss_failure_rows(production))
    bench = _read_json(out / "bench_loss.json")
    st = step_status(steps, "bench_loss")
    if gpu and bench is None:
        rows.append(("fused loss benchmark", st or "missing", "no bench_loss.json; log: run.log"))
    elif not gpu:
        rows.append(("device copy bandwidth", NO_GPU, "measured on CUDA only"))
        rows.append((BANDWIDTH_ROW, NO_GPU, ""))
        rows.append(("fused loss faster than torch.compile(reference)", NO_GPU, ""))
    if bench is not None:
        rows.extend(loss_rows(bench, gpu))
        rows.extend(loss_failure_rows(bench))
    elif not gpu:
        rows.append(("fused loss benchmark (cpu, tiny)", st or "missing", "no bench_loss.json"))
    st = step_status(steps, "bench_upsample")
    rows.append(("D_aux upsample_leaky_relu: eager, compile, triton (fwd, fwd+bwd)",
                 st or ("measured" if gpu else "ran (cpu, tiny)"),
                 "table in run.log (@@step bench_upsample)"))
    return rows


def _train_step_rows(out: Path, log: dict, gpu: bool) -> list[tuple[str, str, str]]:
    steps, rows, step_jsons = log["steps"], [], []
    for name, label, compiled in (("bench_step", "train step engine/eager >= 3x (R101 512x1024)", False),
                                  ("bench_step_compile", "train step engine+compile/eager >= 3x", True)):
        data = _read_json(out / f"{name}.json")
        if data is None:
            st = step_status(steps, name)
            rows.append((label, NO_GPU if not gpu else (st or "missing"),
                         f"no {name}.json" + (f" ({st})" if st and not gpu else "") + "; log: run.log"))
            continue
        step_jsons.append(data)
        rows.append(_step_ratio_row(label, data, gpu, compiled))
        rows.extend(step_failure_rows(data, gpu))
    rows.extend(profile_rows(_read_json(out / "step_profile.json"), step_jsons, gpu,
                             step_status(steps, "step_profile")))
    rows.append(real_size_row(log["real_size"], gpu, step_status(steps, "real_size")))
    return rows


def build_table(out: Path, mode: str) -> list[tuple[str, str, str]]:
    """The table's rows from a gpu_check output folder: environment, build, tests, kernel benchmarks,
    train step."""
    gpu = mode == "gpu"
    log = parse_run_log((out / "run.log").read_text() if (out / "run.log").exists() else "")
    steps = log["steps"]
    return [_environment_row(log["probe"], steps), _build_row(log["backends"], steps, gpu),
            *_test_rows(log["pytest"], steps, gpu), *_kernel_bench_rows(out, steps, gpu),
            *_train_step_rows(out, log, gpu)]


def render(rows, mode: str) -> str:
    head = ("## gpu_check: " + ("GPU run" if mode == "gpu" else "CPU dry run (no GPU: GPU rows are skipped)")
            + f"\n\nTargets: fused loss >= {COPY_TARGET:.0%} of copy bandwidth at N=4, C=19, 512x1024 and "
            f"faster than torch.compile; train step >= {STEP_TARGET:.0f}x the eager fp32 loop.\n\n")
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| check | result | numbers |", "|---|---|---|"]
    lines += [f"| {esc(c)} | {esc(r)} | {esc(n)} |" for c, r, n in rows]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    args = p.parse_args(argv)
    text = render(build_table(args.out, args.mode), args.mode)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
