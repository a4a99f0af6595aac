"""The paper's Table 3 ablation on the built-in toy pairs: which part of the pixel weighting helps.

    pwda-ablate [--pair toy|toy_partial|both] [--seeds N | --seeds S1,S2,...]
        [--iters N] [--config toy] [--out DIR] [--doc FILE] [--section.key=value ...]

Rows (the paper's Table 3, its "DA without pixel-wise weighting" as two rows): source-only; MRNet as
published (what the paper's row ran: MRNet's own LSGAN discriminators D1 + D2, adapt.adversary =
mrnet); the paper's D without weighting (AdaptSegNet's BCE D, the setting the weighting rows add to);
GenMap (T=1); GenMap (T=0.9); GenMap (T=0.9) + DisMap ("full"); then the full method with each
choice the paper leaves open switched (docs/METHOD.md): w's gradient flowing in the generator stage
(CLAN), D's target term unweighted or weighted by w / mean(w), CLAN's preheat. Each (pair, row,
seed) is an ordinary `pwda_fast.train` run in OUT/<pair>/<row>-s<seed>, so rerunning resumes
unfinished runs and re-evaluates finished ones.

Every row of a pair runs on the same seeds, so each row is compared with "the paper's D without
weighting" (the weighting rows differ from it in the weighting alone) seed by seed: the mean paired
difference in mIoU with its 95% Student t interval over the seeds, the same for the mean IoU of each
class group (toy_partial: its aligned and its shifted classes; the toy: all its classes) and, without
interval, per class. The Fig. 2 measurements of each run's last evaluation (pwda_fast.weight_stats: the
fraction of target pixels with p* > T and the mean pixel weight per class group) are averaged over the
seeds, beside D_aux's loss at the end of training for the rows with DisMap (at chance, 2 ln 2, DisMap
is a constant).

Writes per pair OUT/<pair>/ablation.md (the tables, with the command and date), OUT/<pair>/ablation.json
(the same numbers and every seed's), OUT/<pair>/curves.png (per row over training: target mIoU and the
fraction of pixels with p* > T, mean and min-max band over seeds), and OUT/<pair>/ablation.png: one
target-val image with each row's prediction (first seed), plus one OUT/<pair>/<row>-s<first seed>.png
per row. With --doc FILE each pair's tables also replace the text between
`<!-- ablation:<pair>:start -->` and `<!-- ablation:<pair>:end -->` in FILE (a marked section is
appended when FILE has none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from pwda_fast import checkpoint, config, curves, pictures, stats, train, weight_stats
from pwda_fast.data import build_val, class_groups
from pwda_fast.data.labels import CLASSES, colorize
from pwda_fast.run_folder import RunFolder

# (slug, row name, train overrides)
# The rows of the paper's Table 3, all on the preset's generator (MRNet's in the paper presets and the
# toy). The paper's "DA without pixel-wise weighting" (45.5) is MRNet's published adaptation, with its
# own discriminators; the paper's weighting rows replace them with AdaptSegNet's D. Both are rows here,
# named for what they run; the paired differences are taken against the second.
FULL = ["--adapt.mode=adapt", "--adapt.weighting=gen+dis", "--adapt.threshold=0.9"]
ROWS = (
    ("source-only", "source-only", ["--adapt.mode=source_only"]),
    ("mrnet-published", "MRNet as published (its D1 + D2)",
     ["--adapt.mode=adapt", "--adapt.weighting=none", "--adapt.adversary=mrnet"]),
    ("no-weighting", "the paper's D without weighting", ["--adapt.mode=adapt", "--adapt.weighting=none"]),
    ("genmap-t1", "GenMap (T=1)", ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=1.0"]),
    ("genmap-t0.9", "GenMap (T=0.9)",
     ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=0.9"]),
    ("genmap-t0.9-dismap", "GenMap (T=0.9) + DisMap", FULL),
    # The choices the paper leaves open (docs/METHOD.md), each on top of the full method.
    ("full-flowing", "full, w's gradient flowing (CLAN)", [*FULL, "--adapt.weight_grad=flowing"]),
    ("full-d-unweighted", "full, D's target term unweighted", [*FULL, "--adapt.d_target=unweighted"]),
    ("full-d-normalized", "full, D's target term by w / mean(w)", [*FULL, "--adapt.d_target=normalized"]),
    ("full-preheat", "full after CLAN's preheat (5% of 400 steps)", [*FULL, "--adapt.preheat_iters=20"]),
)
BASELINE = "the paper's D without weighting"
PAIRS = ("toy", "toy_partial")
LEVEL = 0.95
FIG2_PREFIXES = ("above_t", "weight_")  # the keys pwda_fast.weight_stats logs at each evaluation


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """-> (options with .pairs and .seed_list resolved, the --section.key=value overrides for train)."""
    # No abbreviations: everything unknown passes through to train as --section.key=value.
    parser = argparse.ArgumentParser(prog="pwda-ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add = parser.add_argument
    add("--pair", choices=(*PAIRS, "both"), default="toy",
        help="built-in domain pair(s) every run trains on (data.source and data.target; default toy)")
    add("--config", default="toy", help="preset or TOML file every run starts from (default toy)")
    add("--seeds", default="3", help="N: runs per row seeded first-seed, first-seed + 1, ...; or a "
                                     "comma-separated list of seeds (e.g. 1234,1240); default 3")
    add("--first-seed", type=int, default=1234, help="the first seed of --seeds N (default 1234)")
    add("--iters", type=int, default=None, help="override train.iters of every run (default: the preset's)")
    add("--out", default="runs/ablation", help="folder of the runs and results (default runs/ablation)")
    add("--image", type=int, default=0, help="index of the target-val image to render (default 0)")
    add("--doc", default=None, help="also put each pair's tables between its markers in this Markdown file")
    args, extra = parser.parse_known_args(argv)
    args.pairs = list(PAIRS) if args.pair == "both" else [args.pair]
    try:
        if "," in args.seeds:
            args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        else:
            count = int(args.seeds)
            if count < 1:
                parser.error(f"--seeds must be a count >= 1 or a list of seeds; got {args.seeds}")
            args.seed_list = [args.first_seed + k for k in range(count)]
    except ValueError:
        parser.error(f"--seeds must be a count (3) or a comma-separated list of integers (1234,1240); "
                     f"got {args.seeds!r}")
    if len(set(args.seed_list)) != len(args.seed_list) or not args.seed_list:
        parser.error(f"--seeds lists a seed twice (or none): {args.seeds}")
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters must be >= 1; got {args.iters}")
    return args, extra


def eval_series(run_dir: Path) -> dict[int, dict]:
    """{step: the evaluation line of that step} from a run's metrics.jsonl ({} without one). A
    re-evaluated finished run logs its last step again: the latest line of a step counts (a run trained
    before the Fig. 2 measurements existed gains them that way)."""
    folder = RunFolder(run_dir)
    if not folder.metrics.is_file():
        return {}
    _, evals = folder.read_metrics()  # sorted by step, stable: a step's lines keep their order
    return {r["step"]: r for r in evals}


def fig2_at_end(series: dict[int, dict]) -> dict[str, float]:
    """The Fig. 2 measurements of a run's last evaluation, from its eval_series ({} if it has none)."""
    return {k: v for k, v in series[max(series)].items() if k.startswith(FIG2_PREFIXES)} if series else {}


def plot_training(raw: dict[str, dict[int, dict]], out: Path, pair: str) -> Path:
    """out/curves.png: per row, target mIoU and the fraction of target-val pixels with p* > T at each
    evaluation, mean over seeds with the min-max band."""
    charts = []
    for key, chart in (("miou", "target-val mIoU (%)"), ("above_t", "fraction of target pixels with p* > T")):
        series = {row: {} for row in raw}
        for row, seeds in raw.items():
            for run in seeds.values():
                for step, line in run["curve"].items():
                    if key in line:
                        series[row].setdefault(step, []).append(line[key])
        charts.append((chart, {row: s for row, s in series.items() if s}))
    return curves.plot_rows(charts, out / "curves.png", f"{pair}: mean over seeds, band = min-max (x: step)")


def _group_mean_diff(iou: dict, base: dict, names: list[str]) -> float | None:
    """Mean over `names` of iou - base, over the classes both runs scored (None if none)."""
    diffs = [iou[c] - base[c] for c in names if c in iou and c in base]
    return stats.mean(diffs) if diffs else None


def _interval(per_seed: dict[int, float]) -> dict | None:
    """{seed: difference} -> its t interval as a dict with "per_seed" (None without seeds)."""
    if not per_seed:
        return None
    return {**stats.t_interval(per_seed.values(), LEVEL).to_dict(), "per_seed": per_seed}


def analyse(raw: dict[str, dict[int, dict]], groups: dict[str, list[str]]) -> dict[str, dict]:
    """Per-seed results -> per-row summary.

    raw: {row name: {seed: {"miou": float, "iou": {class: float}, "fig2": {key: float}}}} with the
    baseline row BASELINE among them; groups: {group: [class names]}. -> {row: {"mean", "std" (sample
    sd, None for one seed), "seeds": {seed: mIoU}, "fig2": {key: mean over seeds}, and for rows other
    than the baseline "diff" (t interval of the paired mIoU differences, with "per_seed"),
    "groups": {group: t interval of the paired group-mean IoU differences, with "per_seed"},
    "classes": {class: mean paired IoU difference}}}. Differences use the seeds both rows have.
    """
    base = raw[BASELINE]
    out = {}
    for row, per_seed in raw.items():
        mious = {seed: r["miou"] for seed, r in per_seed.items()}
        keys = sorted({k for r in per_seed.values() for k in r.get("fig2", {})})
        summary = {"mean": stats.mean(mious.values()), "std": stats.sample_sd(mious.values()), "seeds": mious,
                   "fig2": {k: stats.mean(r["fig2"][k] for r in per_seed.values() if k in r.get("fig2", {}))
                            for k in keys}}
        if row != BASELINE:
            paired = [s for s in per_seed if s in base]
            diff = {s: per_seed[s]["miou"] - base[s]["miou"] for s in paired}
            summary["diff"] = _interval(diff)
            summary["groups"] = {}
            for group, names in groups.items():
                per = {s: d for s in paired
                       if (d := _group_mean_diff(per_seed[s]["iou"], base[s]["iou"], names)) is not None}
                if per:
                    summary["groups"][group] = _interval(per)
            summary["classes"] = {}
            for name in (c for names in groups.values() for c in names):
                diffs = [per_seed[s]["iou"][name] - base[s]["iou"][name] for s in paired
                         if name in per_seed[s]["iou"] and name in base[s]["iou"]]
                if diffs:
                    summary["classes"][name] = stats.mean(diffs)
        out[row] = summary
    return out


def _with_interval(interval: dict | None) -> str:
    """"-1.80 [-3.90, +0.30]" (mean and the t interval), the mean alone for one seed, "–" for none."""
    if interval is None:
        return "–"
    if interval["half_width"] is None:
        return f"{interval['mean']:+.2f}"
    return f"{interval['mean']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: the header, the rule, one line per row of cells."""
    return [f"| {' | '.join(cells)} |" for cells in (head, ["---"] * len(head), *rows)]


def markdown_tables(summary: dict[str, dict], groups: dict[str, list[str]]) -> str:
    """The tables of one pair: rows with paired differences; Fig. 2 measurements; per class; per seed."""
    shown = list(groups) if len(groups) > 1 else []  # one group "all" would repeat the mIoU column
    rows = []
    for row, r in summary.items():
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        base = row == BASELINE
        diff = None if base else r["diff"]
        rows.append([row, f"{r['mean']:.2f}{spread}", "–" if base else _with_interval(diff),
                     "–" if not diff or diff["sd"] is None else f"{diff['sd']:.2f}"]
                    + ["–" if base else _with_interval(r["groups"].get(g)) for g in shown])
    lines = _table(["method", "mIoU mean ± sd", "Δ mIoU vs no weighting [95% CI]", "sd of Δ"]
                   + [f"Δ {g} classes [95% CI]" for g in shown], rows)

    if shown:
        titles = {"above_t": "p* > T, all pixels", **{f"above_t_{g}": f"p* > T, {g}" for g in groups},
                  **{f"weight_{g}": f"mean w, {g}" for g in groups}}
    else:  # the one group covers every pixel
        titles = {"above_t": "p* > T", **{f"weight_{g}": "mean w" for g in groups}}
    titles["d_aux_end"] = "D_aux loss, last 1/8 of steps"
    keys = [k for k in titles if any(k in r["fig2"] for r in summary.values())]
    if keys:
        lines += [""] + _table(["method"] + [titles[k] for k in keys],
                               [[row] + [f"{r['fig2'][k]:.3f}" if k in r["fig2"] else "–" for k in keys]
                                for row, r in summary.items()])

    others = [row for row in summary if row != BASELINE]
    lines += [""] + _table(["class"] + (["group"] if shown else []) + [f"Δ IoU {row}" for row in others],
                           [[name] + ([group] if shown else [])
                            + [f"{summary[row]['classes'][name]:+.2f}" if name in summary[row]["classes"]
                               else "–" for row in others]
                            for group, names in groups.items() for name in names])

    seeds = sorted({s for r in summary.values() for s in r["seeds"]})
    lines += [""] + _table(["method"] + [f"seed {s}" for s in seeds],
                           [[row] + [f"{r['seeds'][s]:.2f}" if s in r["seeds"] else "–" for s in seeds]
                            for row, r in summary.items()])
    return "\n".join(lines)


def report(pair: str, summary: dict[str, dict], groups: dict[str, list[str]], seeds: list[int], iters: int,
           command: str, date: str) -> str:
    """ablation.md of one pair: what was run, how the intervals are made, the tables, the command."""
    group_text = "; ".join(f"{g}: {', '.join(names)}" for g, names in groups.items())
    by_group = " by ground-truth class group" if len(groups) > 1 else ""
    return (f"Target-val mIoU (%) on the `{pair}` pair, {iters} iterations, {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}), the same seeds in every row. sd: sample standard deviation "
            f"over seeds. Δ: the paired difference to \"{BASELINE}\" on the same seed, mean over seeds "
            f"[{LEVEL:.0%} Student t interval, n - 1 degrees of freedom]; sd of Δ: the sample standard "
            f"deviation of the per-seed differences (what the number of seeds an interval needs depends "
            f"on); a class group's Δ is the mean of its classes' IoU differences. Classes: {group_text}.\n\n"
            f"Second table: the Fig. 2 measurements of each run's last evaluation on the first target-val "
            f"images (pwda_fast.weight_stats), mean over seeds: the fraction of pixels with p* > T (the "
            f"row's T; T = 1 floors none) and the mean pixel weight w{by_group} (eq. 6 "
            f"for GenMap + DisMap, eq. 4 otherwise; rows that do not weight show what their T would "
            f"give), and for the rows with DisMap D_aux's logged loss over the last eighth of the steps "
            f"(BCE summed over source and target: 2 ln 2 = 1.386 is chance, where sigmoid(D_aux) is a "
            f"constant 0.5 and DisMap carries nothing). Third: mean Δ IoU per class. Last: mIoU per "
            f"seed.\n\n"
            f"{markdown_tables(summary, groups)}\n\nCommand: `{command}` ({date}).\n")


def update_doc(path: Path, pair: str, text: str) -> None:
    """Put `text` between the pair's markers in the Markdown file `path` (appended when it has none)."""
    start, end = f"<!-- ablation:{pair}:start -->", f"<!-- ablation:{pair}:end -->"
    old = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old.split(start, 1)[1]:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


def render_rows(run_dirs: dict[str, Path], out: Path, image_index: int, zoom: int = 0) -> Path:
    """One target-val image: the image, its ground truth and each row's prediction, side by side.

    run_dirs: {panel title: run_dir of that row's first seed}. Also writes out/<run_dir name>.png with
    the prediction alone per row. Returns the path of the side-by-side picture.
    """
    loaded = {title: checkpoint.load_networks(checkpoint.latest(run_dir), torch.device("cpu"))
              for title, run_dir in run_dirs.items()}
    # Every row trains on the same data, so the first row's config names the val set for all.
    cfg = next(iter(loaded.values()))[1]
    val = build_val(cfg.data, log=lambda _: None)
    item = pictures.drop_empty_label(val[min(image_index, len(val) - 1)])
    image = item["image"][None]  # (1, 3, H, W)
    size = tuple(image.shape[2:])
    zoom = zoom or pictures.auto_zoom(size[0])
    panels = [pictures.Panel("target image", pictures.to_rgb(item["image"], cfg.data.normalize))]
    if item["label"] is not None:
        panels.append(pictures.Panel("ground truth", colorize(pictures.label_at(item["label"], size))))
    for title, (nets, _) in loaded.items():
        pred = pictures.Panel(title, colorize(pictures.predict_ids(nets.g, image)[0]))
        pictures.compose([pred], zoom)[0].save(out / f"{run_dirs[title].name}.png")
        panels.append(pred)
    figure, _ = pictures.compose(panels, zoom)
    figure.save(out / "ablation.png")
    return out / "ablation.png"


def run_pair(pair: str, args: argparse.Namespace, extra: list[str]) -> tuple[int, dict, dict, int]:
    """Train (or resume, or re-evaluate) every row and seed of one pair.

    -> (exit code, {row: {seed: {"miou", "iou", "fig2"}}}, {panel title: first seed's run_dir},
    train.iters of the runs).
    """
    raw, first_runs, iters = {}, {}, 0
    for slug, name, flags in ROWS:
        for seed in args.seed_list:
            run_dir = Path(args.out) / pair / f"{slug}-s{seed}"
            argv_run = ["--config", args.config, f"--data.source={pair}", f"--data.target={pair}",
                        f"--train.seed={seed}", f"--train.run_dir={run_dir}", *flags]
            argv_run += [f"--train.iters={args.iters}"] if args.iters else []
            argv_run += extra
            code, final = train.run_for_result(argv_run, f"{pair}: {name}, seed {seed}")
            if code != 0:
                return code, raw, first_runs, iters
            iters = config.load(*config.parse_args(argv_run)).train.iters
            curve = eval_series(run_dir)
            fig2 = {**fig2_at_end(curve), **weight_stats.d_aux_at_end(run_dir)}
            raw.setdefault(name, {})[seed] = {"miou": final["miou"], "iou": final["iou"], "fig2": fig2,
                                              "curve": curve}
            if seed == args.seed_list[0]:
                first_runs[f"{name}: {final['miou']:.1f}"] = run_dir
    return 0, raw, first_runs, iters


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    try:  # curves.png needs matplotlib: say so before the runs, not after hours of them
        curves.require_matplotlib()
    except curves.PlotsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Quoted so that it reruns as printed (list overrides such as --data.crop=[48, 96] hold spaces).
    command = shlex.join(["python", "-m", "pwda_fast.ablate", *argv])
    date = datetime.date.today().isoformat()
    for pair in args.pairs:
        code, raw, first_runs, iters = run_pair(pair, args, extra)
        if code != 0:
            return code
        groups = {g: [CLASSES[i] for i in ids] for g, ids in class_groups(pair).items()}
        summary = analyse(raw, groups)
        out = Path(args.out) / pair
        text = report(pair, summary, groups, args.seed_list, iters, command, date)
        (out / "ablation.md").write_text(text)
        (out / "ablation.json").write_text(json.dumps(
            {"pair": pair, "command": command, "date": date, "iters": iters, "seeds": args.seed_list,
             "level": LEVEL, "groups": groups, "rows": summary}, indent=2))
        print(f"\n{text}")
        if args.doc:
            update_doc(Path(args.doc), pair, text)
        plot_training(raw, out, pair)
        print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'curves.png'}"
              + (f", {args.doc}" if args.doc else "") + f" and {render_rows(first_runs, out, args.image)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
