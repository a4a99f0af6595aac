"""The one row schema of every benchmark and of the GPU check; the one writer; the one renderer.

    python bench/rows.py write BENCHMARKS.md ROWS.jsonl ...   # a block per (suite, device) between markers
    python bench/rows.py print ROWS.jsonl ...                 # the same blocks, printed
    python bench/rows.py summary OUT_DIR --mode gpu|cpu       # OUT_DIR/rows.jsonl -> OUT_DIR/summary.md

A rows file is JSON lines, appended one row at a time and flushed as each is measured, so a crash
keeps every row written before it (a torn last line is skipped when read). Kinds of row:

  run      one pytest session of the bench suites: device, machine, torch, python, threads, command,
           commit, date, load average at its start (a second "run" row at its end adds the end's)
  time     one provider of one comparison: suite, group (the comparison), provider, samples_s (one
           per round, seconds per call or per iteration), note (how it was timed) and what else it
           measured: bytes and copy_gb_per_s (bandwidth), device_s and device_ops (CUDA profiler sum),
           graph_s or graph_error (CUDA graph replay), images_per_step
  failed   a provider that raised: suite, group, provider, error (its text); the others go on
  skipped  a provider that cannot run here: suite, provider, reason
  step     one step of bench/gpu_check.sh: name, rc, seconds, limit; or name and skipped (why)
  fact     anything else a step measured, by name: probe, backends, pytest (counts, failures),
           graphs_agreement, profile (per provider), real_size

Time and failed rows carry "run", the id of their run row. Every table, in BENCHMARKS.md and in the
GPU check's summary, comes from `table` below. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# The GPU check's targets (issue 33; docs in BENCHMARKS.md).
COPY_TARGET = 0.62  # fused loss fwd+bwd by device time, fraction of copy bandwidth (<= 35 us on an H200)
HOST_TARGET = 1.5  # fused loss fwd+bwd: wall time per call at most this many times its device time
BUSY_TARGET = 0.95  # train step: device-busy time over wall time
STEP_TARGET = 3.0  # engine images/s over the eager fp32 loop's
BANDWIDTH_GROUP = "(4, 19, 512, 1024) bf16 fwd+bwd"
FUSED = ("ext", "ext_v2", "triton")
NO_GPU = "skipped (no GPU)"


# --- writing and reading -------------------------------------------------------------------------

def append(path: str | Path | None, row: dict) -> None:
    """Append one row to the rows file at `path` (nothing when path is None), written through at once."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read(*paths: str | Path) -> list[dict]:
    """Every row of the files in order; missing files and torn lines (a crash mid-write) are skipped.
    Run rows with the same id merge; each row that names a run gets it as row["run_info"]."""
    rows, runs = [], {}
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            if row.get("kind") == "run":
                runs.setdefault(row.get("id"), {}).update(row)
            else:
                rows.append(row)
    for row in rows:
        if "run" in row:
            row["run_info"] = runs.get(row["run"], {})
    return rows


def quantile(xs, q: float) -> float:
    """The q-quantile of xs by nearest rank on the sorted samples: every reported value is a sample."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def median(row: dict) -> float:
    return statistics.median(row["samples_s"])


# --- the one table -------------------------------------------------------------------------------

def fmt_ms(seconds: float | None) -> str:
    """Milliseconds to about four significant digits: 0.274, 13.77, 111.8 ("-" for None)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _gb_per_s(r: dict) -> float | None:
    """Achieved bandwidth: minimal bytes over the device time where measured, else the wall median."""
    return r["bytes"] / (r.get("device_s") or median(r)) / 1e9 if r.get("bytes") else None


# Optional columns: (header, value of a time row or None); a column shows when any row has a value.
OPTIONAL = [
    ("device ms", lambda r: fmt_ms(r["device_s"]) if r.get("device_s") is not None else None),
    ("ops/call", lambda r: f"{r['device_ops']:.0f}" if r.get("device_ops") is not None else None),
    ("graph replay ms", lambda r: fmt_ms(r["graph_s"]) if r.get("graph_s") is not None
     else "failed" if r.get("graph_error") else None),
    ("GB/s", lambda r: f"{_gb_per_s(r):.2f}" if _gb_per_s(r) else None),
    ("of copy", lambda r: f"{_gb_per_s(r) / r['copy_gb_per_s']:.1%}"
     if _gb_per_s(r) and r.get("copy_gb_per_s") else None),
    ("images/s", lambda r: f"{r['images_per_step'] / median(r):.2f}" if r.get("images_per_step") else None),
]


def eager_of(rows: list[dict], group: str) -> dict | None:
    """The eager reference of a comparison: its provider named "eager..."."""
    return next((r for r in rows if r["group"] == group and r["provider"].startswith("eager")), None)


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: one line per time row, in the order measured; x eager = eager's median / its."""
    timed = [r for r in rows if r.get("kind") == "time" and r.get("samples_s")]
    if not timed:
        return []
    cols = [(h, f) for h, f in OPTIONAL if any(f(r) is not None for r in timed)]
    head = ["comparison", "provider", "median ms", "IQR ms (q1-q3)", "x eager", *(h for h, _ in cols)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in timed:
        eager = eager_of(timed, r["group"])
        ratio = f"{median(eager) / median(r):.2f}" if eager else "n/a"
        iqr = f"{fmt_ms(quantile(r['samples_s'], 0.25))}-{fmt_ms(quantile(r['samples_s'], 0.75))}"
        extra = "".join(f" {f(r) or '-'} |" for _, f in cols)
        lines.append(f"| {r['group']} | {r['provider']} | {fmt_ms(median(r))} | {iqr} | {ratio} |{extra}")
    return lines


def _not_timed(rows: list[dict]) -> list[str]:
    """Lines for the providers that failed (their error), whose graph capture failed (its error), or
    that could not run here (why)."""
    lines, seen = [], set()
    for r in rows:
        if r.get("kind") == "time" and r.get("graph_error"):
            lines.append(f"Graph replay failed: {r['provider']} ({r['group']}): {r['graph_error']}")
        elif r.get("kind") == "failed":
            lines.append(f"FAILED: {r['provider']} ({r.get('group') or r.get('test')}): {r['error']}")
        elif r.get("kind") == "skipped" and r["provider"] not in seen:
            seen.add(r["provider"])
            lines.append(f"Not measured: {r['provider']} ({r['reason']}).")
    return lines


def block(rows: list[dict]) -> str:
    """One run of one suite: what ran, where and when, how it was timed, the table, what was not."""
    run = rows[0].get("run_info", {})
    load = [run.get("load_start"), run.get("load_end")]
    head = [f"Command: `{run.get('command', 'not recorded')}`; rows `{run.get('rows_file', '?')}`, "
            "table by `bench/rows.py`.",
            f"Machine: {run.get('machine', 'not recorded')}; torch {run.get('torch', '?')}, Python "
            f"{run.get('python', '?')}; commit {run.get('commit', 'unknown')}. Date: {run.get('date', '?')}.",
            "Load average (1 min): " + (f"{load[0]:.2f} at the start, {load[1]:.2f} at the end."
                                        if None not in load else "not recorded.")]
    notes = list(dict.fromkeys(r["note"] for r in rows if r.get("kind") == "time" and r.get("note")))
    return "\n".join(head + notes + _not_timed(rows)) + "\n\n" + "\n".join(table(rows)) + "\n"


def blocks(rows: list[dict]) -> dict[str, str]:
    """{"SUITE-DEVICE": text} for every suite and device in the rows (the markers' names): a block per
    run of the suite (make bench has one; the GPU check runs the loss and step suites twice)."""
    by = {}
    for r in rows:
        if r.get("kind") in ("time", "failed", "skipped") and r.get("suite"):
            name = f"{r['suite']}-{r.get('run_info', {}).get('device', '?')}"
            by.setdefault(name, {}).setdefault(r.get("run"), []).append(r)
    return {name: "\n".join(block(rs) for rs in runs.values() if any(r["kind"] == "time" for r in rs))
            for name, runs in by.items() if any(r["kind"] == "time" for rs in runs.values() for r in rs)}


class MarkerError(Exception):
    """A markdown file without exactly one pair of a block's markers."""


def replace_block(text: str, name: str, content: str, where: str = "the file") -> str:
    """text with what lies between the bench:NAME markers replaced by content."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise MarkerError(f"{where} needs exactly one '{start}' line followed by one '{end}' line "
                          f"(found {text.count(start)} and {text.count(end)}); add them around the "
                          f"place the {name} table belongs")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + content.strip("\n") + "\n" + text[j:]


# --- the GPU check's summary ---------------------------------------------------------------------

def _facts(rows, name):
    return [r for r in rows if r.get("kind") == "fact" and r.get("name") == name]


def step_lines(rows: list[dict]) -> list[str]:
    """| step | status | seconds | details |: each gpu_check step, with its tests' counts and failures."""
    tests = {f.get("step"): f for f in _facts(rows, "pytest")}
    lines = ["| step | status | seconds (limit) | details |", "|---|---|---|---|"]
    for s in (r for r in rows if r.get("kind") == "step"):
        if "skipped" in s:
            status, secs = f"skipped ({s['skipped']})", "-"
        else:
            rc = s["rc"]
            status = ("ok" if rc == 0 else f"TIMEOUT after {s['seconds']} s" if rc in (124, 137)
                      else f"FAIL (exit {rc})")
            secs = f"{s['seconds']} ({s['limit']})"
        t = tests.get(s["name"])
        detail = ""
        if t:
            detail = ", ".join(f"{n} {w}" for w, n in t["counts"].items())
            if t.get("failures"):
                detail += "; failed: " + "; ".join(t["failures"])
        lines.append(f"| {s['name']} | {status} | {secs} | {_esc(detail)} |")
    return lines


def _esc(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def target_lines(rows: list[dict], gpu: bool) -> list[str]:
    """| target | result | numbers |: each of issue 33's targets, judged from the rows (never on CPU)."""
    timed = [r for r in rows if r.get("kind") == "time" and r.get("samples_s")]
    out = []

    def judge(name, met, numbers):
        result = ("missing" if met is None else "MET" if met else "NOT MET") if gpu else NO_GPU
        out.append(f"| {_esc(name)} | {result} | {_esc(numbers)} |")

    def dev(r):
        return r.get("device_s") or median(r)

    def of_copy(r):
        return _gb_per_s(r) / r["copy_gb_per_s"]

    band = [r for r in timed if r["group"] == BANDWIDTH_GROUP]
    fused = [r for r in band if r["provider"] in FUSED]
    if fused:
        best = max(fused, key=of_copy)
        judge(f"fused loss >= {COPY_TARGET:.0%} of copy bandwidth by device time ({BANDWIDTH_GROUP})",
              of_copy(best) >= COPY_TARGET,
              "; ".join(f"{r['provider']} {of_copy(r):.1%} (device {fmt_ms(r.get('device_s'))} ms)"
                        for r in fused))
        ratio = median(best) / best["device_s"] if best.get("device_s") else None
        judge(f"fused loss wall <= {HOST_TARGET}x device time", ratio and ratio <= HOST_TARGET,
              f"{best['provider']}: wall {fmt_ms(median(best))} ms"
              + (f" = {ratio:.2f}x device" if ratio else ""))
        comp = next((r for r in band if r["provider"] == "compile"), None)
        judge("fused loss faster than torch.compile(reference)", comp and dev(best) < dev(comp),
              f"{best['provider']} {fmt_ms(dev(best))} ms vs compile {fmt_ms(dev(comp)) if comp else '-'} ms")
    else:
        judge(f"fused loss at {BANDWIDTH_GROUP}", None, "no fused row at the bandwidth shape")
    steps = [r for r in timed if r.get("suite") == "step"]
    for compiled in (False, True):
        engines = [r for r in steps if r["provider"].startswith("engine")
                   and ("compile" in r["provider"]) == compiled]
        eager = next((r for r in steps if r["provider"].startswith("eager")
                      and (not engines or r.get("run") == engines[0].get("run"))), None)
        name = f"train step engine{'+compile' if compiled else ''} >= {STEP_TARGET:.0f}x the eager fp32 loop"
        if eager and engines:
            judge(name, median(eager) / min(map(median, engines)) >= STEP_TARGET,
                  "; ".join(f"{r['provider']} {median(eager) / median(r):.2f}x" for r in engines))
        elif not compiled:
            judge(name, None, "no eager or engine row")
    for a in _facts(rows, "graphs_agreement"):
        judge(f"CUDA graphs vs eager: first {a['steps']} steps' losses within {a['tolerance_rel']:.0%}",
              None if "error" in a else a["agree"] and a["captured"],
              a.get("error") or f"max relative difference {a['max_rel_diff']:.2e}; captured {a['captured']}"
              + (f"; capture failed, ran eagerly: {a['capture_failed']}" if a.get("capture_failed") else ""))
    step_median = {r["provider"]: median(r) for r in steps}
    for p in _facts(rows, "profile"):
        name = f"train step GPU busy >= {BUSY_TARGET:.0%}: {p['provider']}"
        if "error" in p:
            judge(name, None, f"profile failed: {p['error']}")
            continue
        b, mem = p["breakdown"], p.get("peak_memory_bytes")
        total = sum(b["ms_per_step"].values()) or 1.0
        by_share = sorted(b["ms_per_step"].items(), key=lambda kv: -kv[1])
        shares = ", ".join(f"{c} {ms / total:.0%}" for c, ms in by_share if ms / total >= 0.005)
        flops, busy = p.get("flops_per_iter"), b.get("busy_fraction")
        numbers = (f"busy {busy:.0%}; " if busy is not None else "") + "peak memory " + (
            "n/a" if mem is None else f"{mem / 2**30:.2f} GiB")
        if flops and p.get("peak_flops") and p["provider"] in step_median:
            numbers += f"; MFU {flops / step_median[p['provider']] / p['peak_flops']:.1%} ({p['peak_note']})"
        if flops:
            numbers += f"; {flops / 1e9:.1f} GFLOP/iter"
        judge(name, None if busy is None else busy >= BUSY_TARGET, f"{numbers}; {b['time_kind']}: {shares}")
    for s in _facts(rows, "real_size"):
        parts = [f"{r['workers']} workers: " + (
            f"exit {r['rc']}" if r["rc"] else f"{r['images_per_s']:.2f} img/s" if r.get("images_per_s")
            else f"ran ({r['seconds']} s), untimed")
            + (f" = {r['of_bench_step']:.0%} of the bench step" if r.get("of_bench_step") else "")
            for r in s["runs"]]
        result = ("measured" if all(r["rc"] == 0 for r in s["runs"]) else "FAIL") if gpu else NO_GPU
        out.append(f"| real-size pipeline (GTA5 -> Cityscapes trees, torchrun) | {result} | "
                   f"{'; '.join(parts)} |")
    return ["| target | result | numbers |", "|---|---|---|", *out]


def summary(rows: list[dict], gpu: bool) -> str:
    """The GPU check's summary: environment, steps, targets, then every suite's block (its failures,
    with their errors, and its table)."""
    probe = next(iter(_facts(rows, "probe")), {})
    env = (f"python {probe.get('python')}, torch {probe.get('torch')} (CUDA {probe.get('cuda')}), "
           f"triton {probe.get('triton')}, device {probe.get('device_name') or 'cpu only'}"
           if probe else "no probe row")
    backends = next(iter(_facts(rows, "backends")), None)
    parts = ["## gpu_check: " + ("GPU run" if gpu else "CPU dry run (no GPU: no target is judged)"), "",
             f"Environment: {env}.",
             "Backends: " + "; ".join(f"{b} " + ", ".join(f"{d} " + ("ok" if why is None else f"NO ({why})")
                                                          for d, why in devs.items())
                                      for b, devs in backends["problems"].items()) + "." if backends else "",
             "", *step_lines(rows), "", *target_lines(rows, gpu)]
    for name, text in blocks(rows).items():
        parts += ["", f"### {name}", "", text]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="replace each block between its markers in a markdown file")
    w.add_argument("markdown", type=Path)
    w.add_argument("rows", nargs="+", type=Path)
    pr = sub.add_parser("print", help="print the blocks")
    pr.add_argument("rows", nargs="+", type=Path)
    s = sub.add_parser("summary", help="OUT/rows.jsonl -> OUT/summary.md (bench/gpu_check.sh)")
    s.add_argument("out", type=Path)
    s.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    args = p.parse_args(argv)
    if args.command == "summary":
        text = summary(read(args.out / "rows.jsonl"), args.mode == "gpu")
        (args.out / "summary.md").write_text(text)
        print(text)
        return 0
    found = blocks(read(*args.rows))
    if not found:
        print(f"error: no timed rows in {', '.join(map(str, args.rows))}", file=sys.stderr)
        return 2
    if args.command == "print":
        for name, text in found.items():
            print(f"<!-- bench:{name}:start -->\n{text}<!-- bench:{name}:end -->\n")
        return 0
    text = args.markdown.read_text()
    try:
        for name, content in found.items():
            text = replace_block(text, name, content, str(args.markdown))
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.markdown.write_text(text)
    print(f"wrote {', '.join(found)} into {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
