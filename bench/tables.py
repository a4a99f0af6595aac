"""BENCHMARKS.md's measured tables, from the JSON the bench suites write (`make bench`).

    python bench/tables.py bench/results/loss-cpu.json bench/results/step-cpu.json           # print
    python bench/tables.py --write BENCHMARKS.md bench/results/loss-cpu.json ...             # publish

Each JSON holds one suite on one device (`pytest bench/test_bench_SUITE.py --benchmark-json=...`)
and becomes one block: what ran, where and when (command, machine, commit, date, load average), then
a table with, per case and provider, the median and the interquartile range (pytest-benchmark's q1
and q3) of its interleaved samples, the ratio to eager (eager's median / its median) and, for the
loss, the achieved bandwidth (minimal bytes / median) and its fraction of the device's copy
bandwidth. --write puts each block between `<!-- bench:SUITE-DEVICE:start -->` and
`<!-- bench:SUITE-DEVICE:end -->` in the file (e.g. bench:loss-cpu), replacing what was there and
nothing else. Needs no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path


class TablesError(Exception):
    """A JSON or markdown file this script cannot use; the message says which and what to do."""


def load(path: Path) -> dict:
    """The pytest-benchmark JSON of one bench suite run on one device."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TablesError(f"cannot read {path}: {e}") from None
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not benches:
        raise TablesError(f"{path} holds no benchmarks: write it with `python -m pytest "
                          f"bench/test_bench_SUITE.py --benchmark-json={path}` (a run whose tests all "
                          "skipped writes none)")
    kinds = {(b.get("extra_info", {}).get("suite"), b.get("extra_info", {}).get("device")) for b in benches}
    if len(kinds) != 1 or None in next(iter(kinds)):
        raise TablesError(f"{path} is not one bench suite on one device (suite, device found: "
                          f"{sorted(kinds, key=str)}); run each suite with its own --benchmark-json")
    return data


def block_name(data: dict) -> str:
    """e.g. "loss-cpu": the marker name of this JSON's block."""
    info = data["benchmarks"][0]["extra_info"]
    return f"{info['suite']}-{info['device']}"


def fmt_ms(seconds: float) -> str:
    """Milliseconds to about four significant digits: 0.274, 13.77, 111.8."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def iqr(stats: dict) -> str:
    return f"{fmt_ms(stats['q1'])}-{fmt_ms(stats['q3'])}"


def case_label(info: dict) -> str:
    """e.g. "(2, 19, 256, 512)", "production: (2, 19, 512, 1024) channels_last, D 16x32, D_aux full size"."""
    shape = info["shape"]
    text = str(tuple(shape)) + (" channels_last" if info.get("channels_last") else "")
    maps = {"D": info.get("disc_hw"), "D_aux": info.get("aux_hw")}
    if any(hw not in (None, shape[2:]) for hw in maps.values()):
        text += "".join(f", {name} " + ("full size" if hw in (None, shape[2:]) else f"{hw[0]}x{hw[1]}")
                        for name, hw in maps.items())
    return ("production: " if info.get("production") else "") + text


def _comparisons(benches: list[dict], key) -> dict:
    """key(bench) -> [benches], in first-appearance order (the order the suite ran them)."""
    out = {}
    for b in benches:
        out.setdefault(key(b), []).append(b)
    return out


def loss_table(benches: list[dict]) -> list[str]:
    lines = ["| case | dtype | mode | provider | median ms | IQR ms (q1-q3) | x eager | GB/s | of copy |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = _comparisons(benches, lambda b: (case_label(b["extra_info"]), b["extra_info"]["dtype"],
                                          b["extra_info"]["mode"]))
    for group in by.values():
        eager = next((b["stats"]["median"] for b in group if b["extra_info"]["provider"] == "eager"), None)
        for b in group:
            info, stats = b["extra_info"], b["stats"]
            gbs = info["bytes"] / stats["median"] / 1e9
            ratio = f"{eager / stats['median']:.2f}" if eager else "n/a"
            lines.append(f"| {case_label(info)} | {info['dtype']} | {info['mode']} | {info['provider']} | "
                         f"{fmt_ms(stats['median'])} | {iqr(stats)} | {ratio} | {gbs:.2f} | "
                         f"{gbs / info['copy_gb_per_s']:.1%} |")
    return lines


def step_table(benches: list[dict]) -> list[str]:
    lines = ["| provider | median ms | IQR ms (q1-q3) | images/s | x eager |", "|---|---|---|---|---|"]
    eager = next((b["stats"]["median"] for b in benches if b["extra_info"]["provider"].startswith("eager")),
                 None)
    for b in benches:
        info, stats = b["extra_info"], b["stats"]
        ratio = f"{eager / stats['median']:.2f}" if eager else "n/a"
        lines.append(f"| {info['provider']} | {fmt_ms(stats['median'])} | {iqr(stats)} | "
                     f"{info['images_per_step'] / stats['median']:.2f} | {ratio} |")
    return lines


def _one(values, what: str) -> str:
    """The value when all agree, else their range (e.g. rounds that differ between providers)."""
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]} ({what} differ)"


def header(data: dict, source: str) -> list[str]:
    """What ran, where and when: the lines above the table."""
    run = data.get("machine_info", {}).get("pwda_fast", {})
    commit = data.get("commit_info", {})
    when = datetime.fromisoformat(data["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    load = run.get("load_average_1min") or {}
    load_text = (f"{load['start']:.2f} at the start, {load['end']:.2f} at the end"
                 if load.get("start") is not None and load.get("end") is not None else "not recorded")
    commit_text = (commit.get("id") or "unknown")[:7]
    if commit.get("dirty"):
        commit_text += " with uncommitted changes"
    return [f"Command: `{run.get('command', 'not recorded')}`; JSON `{source}`, table by `bench/tables.py`.",
            f"Machine: {run.get('machine', 'not recorded')}; torch {run.get('torch', '?')}, Python "
            f"{data.get('machine_info', {}).get('python_version', '?')}; commit {commit_text}. Date: {when}.",
            f"Load average (1 min): {load_text}."]


def render(data: dict, source: str) -> str:
    """The markdown block of one suite's JSON (no markers)."""
    benches = data["benchmarks"]
    suite = benches[0]["extra_info"]["suite"]
    lines = header(data, source)
    rounds = _one([b["stats"]["rounds"] for b in benches], "rounds")
    first = benches[0]["extra_info"]
    if suite == "loss":
        lines.append(f"Every provider and mode of a case timed in the same {rounds} rounds, after "
                     f"{first['warmup']} untimed call(s) each; {first['calls_per_sample']} back-to-back "
                     f"call(s) per sample. Copy bandwidth (fp32 copy, read + write): "
                     f"{first['copy_gb_per_s']:.1f} GB/s; GB/s = minimal bytes (seg, disc, aux read once; "
                     "fwd+bwd also dL/dz written once) / median; of copy = GB/s / copy bandwidth.")
        table = loss_table(benches)
    elif suite == "step":
        b = first["batch"]
        lines.append(f"Preset {first['preset']} (depth {first['depth']}, width {first['width']}), "
                     f"batch {b}+{b} (source + target) at {first['crop'][0]}x{first['crop'][1]}, "
                     f"weighted-loss backend {first['loss_backend']}. {rounds} samples per provider, each "
                     f"{first['iterations_per_round']} iterations back to back up to one device sync (as "
                     f"training queues them), the providers interleaved round by round, after "
                     f"{first['warmup']} untimed iterations; images/s = {2 * b} / median per iteration.")
        table = step_table(benches)
    else:
        raise TablesError(f"{source}: unknown suite {suite!r} (known: loss, step)")
    skipped = {}
    for s in data.get("not_measured", []):
        skipped.setdefault(s.get("provider") or s["test"], s["reason"])
    if skipped:
        lines.append("Not measured: " + "; ".join(f"{p} ({reason})" for p, reason in skipped.items()) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(table) + "\n"


def replace_block(text: str, name: str, block: str, where: str = "the file") -> str:
    """text with what lies between the bench:NAME markers replaced by block."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise TablesError(f"{where} needs exactly one '{start}' line followed by one '{end}' line "
                          f"(found {text.count(start)} and {text.count(end)}); add them around the "
                          f"place the {name} table belongs")
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + block.strip("\n") + "\n" + text[j:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON of one suite on one device")
    p.add_argument("--write", type=Path, metavar="MARKDOWN",
                   help="replace each block between its markers in this file (else print the blocks)")
    args = p.parse_args(argv)
    try:
        blocks = {}
        for path in args.json:
            data = load(path)
            blocks[block_name(data)] = render(data, str(path))
        if args.write is None:
            for name, block in blocks.items():
                print(f"<!-- bench:{name}:start -->\n{block}<!-- bench:{name}:end -->\n")
            return 0
        try:
            text = args.write.read_text()
        except OSError as e:
            raise TablesError(f"cannot read {args.write}: {e}") from None
        for name, block in blocks.items():
            text = replace_block(text, name, block, str(args.write))
        args.write.write_text(text)
    except TablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(blocks)} into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
