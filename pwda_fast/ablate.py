"""The paper's Table 3 ablation on the built-in toy pairs: which part of the pixel weighting helps.

    pwda-ablate [--pair toy|toy_partial|both] [--seeds N | --seeds S1,S2,...] [--rows SLUG,...]
        [--iters N] [--config toy] [--out DIR] [--records DIR] [--variant NAME] [--no-train]
        [--doc FILE] [--summary-doc FILE] [--section.key=value ...]

Rows (the paper's Table 3, its "DA without pixel-wise weighting" as three rows): source-only; MRNet
as published (what the paper's row ran: MRNet's own LSGAN discriminators D1 + D2, adapt.adversary =
mrnet), with its D's fields scaled to the crop as the preset scales the paper's D
(model.ms_disc_stride) and unscaled; the paper's D without weighting (AdaptSegNet's BCE D, the
setting the weighting rows add to); GenMap (T=1); GenMap (T=0.9); GenMap (T=0.9) with D_aux and its
feature-level loss but no DisMap in w (adapt.weighting = gen+aux); GenMap (T=0.9) + DisMap ("full");
then the full method with each choice the paper leaves open switched (docs/METHOD.md): w's gradient
flowing in the generator stage (CLAN), D's target term unweighted or weighted by w / mean(w), CLAN's
preheat (start and learning-rate ramp as CLAN_train.py runs them).

A study grows by records: each (row, seed) is an ordinary `pwda_fast.train` run in
OUT/<study>/<row>-s<seed> whose result (config, seed, source tree, build, mIoU, per-class IoU, the
Fig. 2 numbers, the evaluation curve) is written as one small JSON record to
RECORDS/<study>/<row>-s<seed>.json as soon as it finishes. A (row, seed) whose record is stored with
the same config (up to the keys that keep the method, config.SAME_METHOD) is not rerun, so more
seeds, more rows (--rows) or another pair extend a study without repeating it; a record made with
another config is rerun. The tables, intervals and curves are made from every stored record of the
study (--no-train: from the records alone), and name the builds the records ran with (the extension,
loss kernel, torch, threads, CPU kernels): a weighted run is chaotic in the loss kernel's last bits,
so one seed's result moves with the build (a new record whose build none of the stored ones had is
warned about as it is stored). A study is a pair (toy, toy_partial), or <pair>-<variant>
for one with other overrides (--variant s32 --model.disc_stride=32).

Every row of a study runs on the same seeds, so each row is compared with "the paper's D without
weighting" (the weighting rows differ from it in the weighting alone) seed by seed: the mean paired
difference in mIoU with its 95% Student t interval over the seeds, the same for the mean IoU of each
class group (toy_partial: its aligned and its shifted classes; the toy: all its classes) and, without
interval, per class. The Fig. 2 measurements of each run's last evaluation (pwda_fast.weight_stats: the
fraction of target pixels with p* > T and the mean pixel weight per class group, as the generator
stage computes them) are averaged over the seeds, beside D_aux's loss at the end of training for the
rows with D_aux (at chance, 2 ln 2, DisMap is a constant). Beside the differences to the unweighted D,
"one change at a time" pairs the rows that differ in one part (STEPS: T = 0.9 against 1, adding D_aux's
loss, weighting by DisMap, MRNet's D unscaled against scaled). A variant study is also compared row by
row with its pair's study (the same row and seed without the variant's overrides: what, say, D's
stride 32 does to each row), from the pair's records that differ from it in those overrides alone.

Writes per study OUT/<study>/ablation.md (the tables, with the command and date), ablation.json (the
same numbers and every seed's), curves.png (per row over training: target mIoU and the fraction of
pixels with p* > T, mean and min-max band over seeds) and, where the first seed's run folders are at
hand, ablation.png: one target-val image with each row's prediction. With --doc FILE each study's
tables also replace the text between `<!-- ablation:<study>:start -->` and `<!-- ablation:<study>:end -->`
in FILE (a marked section is appended when FILE has none); --summary-doc FILE does the same with the
main table between `<!-- study:<study>:... -->` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
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
MRNET = ["--adapt.mode=adapt", "--adapt.weighting=none", "--adapt.adversary=mrnet"]
# CLAN's preheat of P = 20 steps (5% of 400, its NUM_STEPS_STOP / 20): both learning rates ramp from 0
# over steps 0..19, weighting from step 21 (CLAN_train.py: `i_iter > PREHEAT_STEPS`).
CLAN_PREHEAT = ["--adapt.preheat_iters=21", "--optim.warmup_iters=20", "--optim.warmup_start=0",
                "--optim.warmup_d=true"]
ROWS = (
    ("source-only", "source-only", ["--adapt.mode=source_only"]),
    # MRNet's D as the preset scales it (the toy: model.ms_disc_stride 1, fields of 21 px beside the
    # BCE D's 10), and as MRNet built it (stride 8: every scale-0 cell sees the whole toy crop).
    ("mrnet-published", "MRNet as published (its D1 + D2, fields scaled)", MRNET),
    ("mrnet-whole-crop", "MRNet as published, its D unscaled (whole-crop fields)",
     [*MRNET, "--model.ms_disc_stride=8"]),
    ("no-weighting", "the paper's D without weighting", ["--adapt.mode=adapt", "--adapt.weighting=none"]),
    ("genmap-t1", "GenMap (T=1)", ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=1.0"]),
    ("genmap-t0.9", "GenMap (T=0.9)",
     ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=0.9"]),
    # D_aux and F's feature-level term (lambda_aux, eq. 8) as the full method has them, sigmoid(a) out
    # of w: what adding the feature-level adversary does, apart from weighting by it.
    ("genmap-t0.9-aux", "GenMap (T=0.9) + D_aux's loss, no DisMap",
     ["--adapt.mode=adapt", "--adapt.weighting=gen+aux", "--adapt.threshold=0.9"]),
    ("genmap-t0.9-dismap", "GenMap (T=0.9) + DisMap", FULL),
    # The choices the paper leaves open (docs/METHOD.md), each on top of the full method.
    ("full-flowing", "full, w's gradient flowing (CLAN)", [*FULL, "--adapt.weight_grad=flowing"]),
    ("full-d-unweighted", "full, D's target term unweighted", [*FULL, "--adapt.d_target=unweighted"]),
    ("full-d-normalized", "full, D's target term by w / mean(w)", [*FULL, "--adapt.d_target=normalized"]),
    ("full-preheat", "full after CLAN's preheat (20 of 400 steps, LR ramp)", [*FULL, *CLAN_PREHEAT]),
)
SLUGS = [slug for slug, _, _ in ROWS]
BY_SLUG = {slug: (name, flags) for slug, name, flags in ROWS}
BASELINE = "the paper's D without weighting"
# One change at a time, beside the differences to BASELINE: (row slug, the row it is compared with, what
# the paired difference measures).
STEPS = (
    ("genmap-t0.9", "genmap-t1", "GenMap's threshold: T = 0.9 against T = 1"),
    ("genmap-t0.9-aux", "genmap-t0.9", "adding D_aux and F's feature-level loss (eq. 8), w without DisMap"),
    ("genmap-t0.9-dismap", "genmap-t0.9-aux", "weighting by DisMap: the full method against the row "
                                              "with D_aux's loss and no DisMap"),
    ("genmap-t0.9-dismap", "genmap-t0.9", "DisMap with D_aux's loss: the full method against GenMap (T=0.9)"),
    ("mrnet-whole-crop", "mrnet-published", "MRNet's D unscaled (whole-crop fields) against scaled"),
)
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
    add("--rows", default=None, help="comma-separated row slugs to run, in this order (default: every "
                                     "row); the tables show every stored row. Rows: " + ", ".join(SLUGS))
    add("--records", default=None, help="folder of the per-run records the tables are made from "
                                        "(default OUT/records); a run whose record is stored is not rerun")
    add("--variant", default="", help="name of a study with other overrides than the preset's (e.g. s32 "
                                      "for --model.disc_stride=32): its records and outputs go to "
                                      "<pair>-<variant>")
    add("--no-train", action="store_true", help="train nothing: make the tables from the stored records")
    add("--summary-doc", default=None, help="also put each study's main table (rows, mean, interval "
                                            "against the unweighted D) between its markers in this file")
    args, extra = parser.parse_known_args(argv)
    args.pairs = list(PAIRS) if args.pair == "both" else [args.pair]
    args.row_list = SLUGS if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_list if r not in SLUGS]
    if unknown or not args.row_list:
        parser.error(f"--rows names no row or unknown rows {unknown}; rows are {', '.join(SLUGS)}")
    if args.variant and not args.variant.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--variant must be a short name of letters, digits, - and _; got {args.variant!r}")
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
            summary.update(paired(per_seed, base, groups))
        out[row] = summary
    return out


def paired(runs: dict[int, dict], base: dict[int, dict], groups: dict[str, list[str]]) -> dict:
    """The paired differences of `runs` to `base` ({seed: {"miou", "iou"}} each) over the seeds both
    have -> {"diff": t interval of the mIoU differences with "per_seed" (None without common seeds),
    "groups": {group: t interval of the group-mean IoU differences}, "classes": {class: mean
    difference}}."""
    seeds = [s for s in runs if s in base]
    out = {"diff": _interval({s: runs[s]["miou"] - base[s]["miou"] for s in seeds}), "groups": {},
           "classes": {}}
    for group, names in groups.items():
        per = {s: d for s in seeds
               if (d := _group_mean_diff(runs[s]["iou"], base[s]["iou"], names)) is not None}
        if per:
            out["groups"][group] = _interval(per)
    for name in (c for names in groups.values() for c in names):
        diffs = [runs[s]["iou"][name] - base[s]["iou"][name] for s in seeds
                 if name in runs[s]["iou"] and name in base[s]["iou"]]
        if diffs:
            out["classes"][name] = stats.mean(diffs)
    return out


def steps(raw: dict[str, dict[int, dict]], groups: dict[str, list[str]]) -> dict[str, dict]:
    """{what the step measures: paired(row, the row it is compared with)} for each of STEPS whose two
    rows are in `raw` (analyse's input) with a seed in common."""
    out = {}
    for slug, against, label in STEPS:
        row, other = BY_SLUG[slug][0], BY_SLUG[against][0]
        if row in raw and other in raw and (diff := paired(raw[row], raw[other], groups))["diff"]:
            out[label] = diff
    return out


def steps_table(diffs: dict[str, dict], groups: dict[str, list[str]], head: str) -> str:
    """Markdown: one line per paired difference (paired()'s output) named by its key."""
    shown = _group_columns(groups)
    rows = [[name, _with_interval(d["diff"]), _sd(d["diff"])]
            + [_with_interval(d["groups"].get(g)) for g in shown] + [str(d["diff"]["n"])]
            for name, d in diffs.items()]
    return "\n".join(_table([head, "Δ mIoU [95% CI]", "sd of Δ"] + [f"Δ {g} classes [95% CI]" for g in shown]
                            + ["seeds"], rows))


def _group_columns(groups: dict[str, list[str]]) -> list[str]:
    """The class groups that get their own column: none where one group ("all") would repeat the mIoU's."""
    return list(groups) if len(groups) > 1 else []


def _sd(interval: dict | None) -> str:
    """The sample sd of an interval's values, "–" without one (no interval, or one seed)."""
    return "–" if not interval or interval["sd"] is None else f"{interval['sd']:.2f}"


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
    shown = _group_columns(groups)
    rows = []
    for row, r in summary.items():
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        base = row == BASELINE
        diff = None if base else r["diff"]
        rows.append([row, f"{r['mean']:.2f}{spread}", "–" if base else _with_interval(diff),
                     _sd(diff)]
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


def report(study: str, summary: dict[str, dict], groups: dict[str, list[str]], seeds: list[int], iters,
           command: str, date: str, changes: dict[str, dict] | None = None) -> str:
    """ablation.md of one study: what was run, how the intervals are made, the tables (with `changes`,
    steps()' output, one change at a time), the command."""
    group_text = "; ".join(f"{g}: {', '.join(names)}" for g, names in groups.items())
    by_group = " by ground-truth class group" if len(groups) > 1 else ""
    uneven = len({tuple(sorted(r["seeds"])) for r in summary.values()}) > 1
    return (f"Target-val mIoU (%) of the `{study}` study, {iters} iterations, {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}), "
            + ("not every row on every seed (the last table says which). " if uneven
               else "the same seeds in every row. ")
            + f"sd: sample standard deviation over seeds. Δ: the paired difference to \"{BASELINE}\" on "
            f"the same seed, mean over the seeds both rows have [{LEVEL:.0%} Student t interval, n - 1 "
            f"degrees of freedom]; sd of Δ: the sample standard deviation of the per-seed differences "
            f"(what the number of seeds an interval needs depends on); a class group's Δ is the mean of "
            f"its classes' IoU differences. Classes: {group_text}.\n\n"
            f"Second table: the Fig. 2 measurements of each run's last evaluation on the first target-val "
            f"images (pwda_fast.weight_stats: G and D_aux as the generator stage runs them, BatchNorm on "
            f"the statistics of batches of data.batch_size images), mean over seeds: the fraction of "
            f"pixels with p* > T (the row's T; T = 1 floors none) and the mean pixel weight w{by_group} "
            f"(eq. 6 for GenMap + DisMap, eq. 4 otherwise; rows that do not weight show what their T "
            f"would give), and for the rows with D_aux its logged loss over the last eighth of the steps "
            f"(BCE summed over source and target: 2 ln 2 = 1.386 is chance, where sigmoid(D_aux) is a "
            f"constant 0.5 and DisMap carries nothing). Third: mean Δ IoU per class. Last: mIoU per "
            f"seed.\n\n"
            f"{markdown_tables(summary, groups)}\n\n"
            + (f"One change at a time: the paired difference between two rows that differ in one part "
               f"(same seeds, same interval as above).\n\n{steps_table(changes, groups, 'change')}\n\n"
               if changes else "")
            + f"Command: `{command}` ({date}).\n")


def doc_markers(pair: str, tag: str = "ablation") -> tuple[str, str]:
    """The markers `<!-- TAG:PAIR:start/end -->` around a study's text in a Markdown file."""
    return f"<!-- {tag}:{pair}:start -->", f"<!-- {tag}:{pair}:end -->"


def doc_block(text: str, pair: str, tag: str = "ablation") -> str | None:
    """The text between a study's markers in a Markdown file's `text` (as update_doc puts it there),
    None where the markers are not both there."""
    start, end = doc_markers(pair, tag)
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].removeprefix("\n")


def update_doc(path: Path, pair: str, text: str, tag: str = "ablation") -> None:
    """Put `text` between the study's markers (doc_markers) in the Markdown file `path` (appended when
    it has none)."""
    start, end = doc_markers(pair, tag)
    old = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if doc_block(old, pair, tag) is not None:
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


def study_name(pair: str, variant: str) -> str:
    """The folder name of a study: the pair, or <pair>-<variant>."""
    return f"{pair}-{variant}" if variant else pair


def source_tree() -> str:
    """The git commit the runs train from, "+dirty" with uncommitted changes ("unknown" outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def changed_keys(saved: dict, cfg_dict: dict) -> list[str]:
    """The keys of the method (those not in config.SAME_METHOD) in which the config dict of a
    record differs from `cfg_dict`; both read by config.from_dict, so a key added since the record was
    made takes the value that means what the record ran."""
    diff = config.differences(config.from_dict(saved), config.from_dict(cfg_dict))
    return sorted(k for k in diff if k not in config.SAME_METHOD)


def fresh(record: dict, cfg_dict: dict, path: Path) -> bool:
    """Whether a record was made with `cfg_dict` (the config its run would use now); where not, its
    result is not this row's any more, and the keys that differ are printed."""
    changed = changed_keys(record["config"], cfg_dict)
    if changed:
        print(f"{path}: stored with another config ({', '.join(changed[:6])}): not this row's", flush=True)
    return not changed


def read_record(path: Path, cfg_dict: dict) -> dict | None:
    """A stored record made with `cfg_dict`, or None where there is none or it is not fresh."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if fresh(record, cfg_dict, path) else None


def record_path(records: Path, slug: str, seed: int) -> Path:
    """The record of one (row, seed) in a study's records folder."""
    return records / f"{slug}-s{seed}.json"


def records_dir(args: argparse.Namespace, study: str) -> Path:
    """Where a study's records are: RECORDS/<study>, by default OUT/records/<study>."""
    return (Path(args.records) if args.records else Path(args.out) / "records") / study


def row_run(pair: str, slug: str, seed: int, args: argparse.Namespace, extra: list[str]):
    """-> (train's argv, run_dir, the config that run trains with) of one (row, seed) of a study."""
    flags = BY_SLUG[slug][1]
    run_dir = Path(args.out) / study_name(pair, args.variant) / f"{slug}-s{seed}"
    argv_run = ["--config", args.config, f"--data.source={pair}", f"--data.target={pair}",
                f"--train.seed={seed}", f"--train.run_dir={run_dir}", *flags]
    argv_run += [f"--train.iters={args.iters}"] if args.iters else []
    argv_run += extra
    return argv_run, run_dir, config.load(*config.parse_args(argv_run))


def run_row(pair: str, slug: str, seed: int, args: argparse.Namespace,
            extra: list[str]) -> tuple[int, dict | None]:
    """One (row, seed) of a study: its stored record where it has one for the same config, else the run
    (trained, resumed or re-evaluated in OUT/<study>/<slug>-s<seed>) made into a record and stored at
    once, so that a stop loses nothing finished. -> (exit code, the record: None where the run failed or
    stopped before its end, or under --no-train where none is stored)."""
    name, flags = BY_SLUG[slug]
    study = study_name(pair, args.variant)
    argv_run, run_dir, cfg = row_run(pair, slug, seed, args, extra)
    records = records_dir(args, study)
    path = record_path(records, slug, seed)
    record = read_record(path, cfg.to_dict())
    if record is not None or args.no_train:
        return 0, record
    start = time.monotonic()
    code, final = train.run_for_result(argv_run, f"{study}: {name}, seed {seed}")
    if final is None:
        return code, None
    curve = eval_series(run_dir)
    record = {"study": study, "pair": pair, "row": slug, "name": name, "seed": seed, "flags": flags,
              "overrides": extra, "iters": cfg.train.iters, "tree": args.tree, "build": final.get("build"),
              "date": datetime.date.today().isoformat(), "minutes": round((time.monotonic() - start) / 60, 2),
              "miou": final["miou"], "iou": final["iou"],
              "fig2": {**fig2_at_end(curve), **weight_stats.d_aux_at_end(run_dir)},
              "curve": {str(step): {k: v for k, v in line.items()
                                    if k == "miou" or k.startswith(FIG2_PREFIXES)}
                        for step, line in curve.items()},
              "run_dir": str(run_dir), "config": cfg.to_dict()}
    warn_other_build(records, record)
    records.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    return 0, record


def warn_other_build(records: Path, record: dict) -> None:
    """Says when a new record ran with a build that none of the study's stored records (those that name
    theirs) ran with: its seeds will not repeat theirs to the last digit, so a user who meant to extend
    the study with the same build can stop after one run."""
    label = build_label(record.get("build"))
    labels = {build_label(r["build"]) for seeds in stored(records).values() for r in seeds.values()
              if r.get("build")}
    if labels and label not in labels:
        print(f"warning: {record['row']}-s{record['seed']} ran with another build than the records in "
              f"{records} ({label}; theirs: {'; '.join(sorted(labels))}). A weighted run is chaotic in "
              "the loss kernel's last bits: this study now mixes builds, and its report says so.",
              flush=True)


def stored(records: Path) -> dict[str, dict[int, dict]]:
    """{row name: {seed: record}} of every record in a study's folder, rows in ROWS order; a record of
    a row this version no longer has is left out."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(records.glob("*.json")) if records.is_dir() else []:
        record = json.loads(path.read_text())
        if record.get("row") in BY_SLUG:
            found.setdefault(record["row"], {})[record["seed"]] = record
    return {BY_SLUG[slug][0]: dict(sorted(found[slug].items())) for slug in SLUGS if slug in found}


def as_raw(by_row: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """Records -> analyse()'s input ({"miou", "iou", "fig2", "curve" with int steps})."""
    return {row: {seed: {"miou": r["miou"], "iou": r["iou"], "fig2": r["fig2"],
                         "curve": {int(step): line for step, line in r["curve"].items()}}
                  for seed, r in seeds.items()} for row, seeds in by_row.items()}


def build_label(build: dict | None) -> str:
    """A record's build (Engine.build) in a few words; records made before builds were stored say so."""
    if not build:
        return "build not recorded"
    return (f"extension {build['ext'] or 'absent'}, loss kernel {build['kernels']['loss']}, torch "
            f"{build['torch']}, {build['device']} with {build['threads']} threads, {build['cpu_capability']}")


def builds_note(by_row: dict[str, dict[int, dict]]) -> str:
    """The builds a study's records ran with (how many records each) and, where more than one, what
    that means for reading them."""
    counts: dict[str, int] = {}
    for seeds in by_row.values():
        for r in seeds.values():
            label = build_label(r.get("build"))
            counts[label] = counts.get(label, 0) + 1
    text = "Builds: " + "; ".join(f"{label} ({n} records)" for label, n in counts.items()) + ".\n"
    if len(counts) > 1:
        text += ("These records come from more than one build. A weighted run is chaotic in the loss "
                 "kernel's last bits, so one seed's result moves with the build; compare rows as means "
                 "over seeds only.\n")
    return text


def main_table(summary: dict[str, dict]) -> str:
    """The study's main table: each row's mean and its paired difference to the unweighted D."""
    rows = [[row, f"{r['mean']:.2f}", "–" if row == BASELINE else _with_interval(r["diff"]),
             str(len(r["seeds"]))] for row, r in summary.items()]
    head = ["method", "mIoU", "Δ vs the paper's D without weighting [95% CI]", "seeds"]
    return "\n".join(_table(head, rows))


def against_pair(pair: str, by_row: dict[str, dict[int, dict]], args, extra: list[str],
                 groups: dict[str, list[str]]) -> dict[str, dict]:
    """A variant study's rows against the pair's own study: {row: paired(variant's records, the pair's)}
    over the seeds both have, for the rows whose stored `pair` records differ from the variant's config in
    the variant's overrides alone (another record of the pair is named and left out)."""
    overridden = set(config.parse_args(extra)[1])
    base_dir = records_dir(args, pair)
    out = {}
    for row, base_seeds in stored(base_dir).items():
        if row not in by_row:
            continue
        base = {}
        for seed, r in base_seeds.items():
            if seed not in by_row[row]:
                continue
            changed = set(changed_keys(r["config"], by_row[row][seed]["config"]))
            if changed <= overridden:
                base[seed] = r
            else:
                print(f"{record_path(base_dir, r['row'], seed)}: differs from the variant's run in "
                      f"{', '.join(sorted(changed - overridden)[:6])} too: left out of the comparison")
        if base:
            out[row] = paired(by_row[row], base, groups)
    return out


def report_study(pair: str, study: str, args, extra: list[str], command: str, date: str) -> int:
    """The tables, JSON, curves (and, where the first seeds' runs are at hand, the prediction panel) of
    one study, from its stored records: those made with the config this command gives their row and
    seed (the others are named and left out)."""
    records = records_dir(args, study)
    raw_records = {row: {seed: r for seed, r in seeds.items()
                         if fresh(r, row_run(pair, r["row"], seed, args, extra)[2].to_dict(),
                                  record_path(records, r["row"], seed))}
                   for row, seeds in stored(records).items()}
    raw_records = {row: seeds for row, seeds in raw_records.items() if seeds}
    if BASELINE not in raw_records:
        print(f"error: {records} holds no record of \"{BASELINE}\", the baseline of every difference; "
              f"run --rows no-weighting first", file=sys.stderr)
        return 1
    raw = as_raw(raw_records)
    groups = {g: [CLASSES[i] for i in ids] for g, ids in class_groups(pair).items()}
    summary = analyse(raw, groups)
    changes = steps(raw, groups)
    seeds = sorted({s for r in raw.values() for s in r})
    iters = sorted({r["iters"] for seeds_ in raw_records.values() for r in seeds_.values()})
    trees = sorted({r["tree"] for seeds_ in raw_records.values() for r in seeds_.values()})
    out = Path(args.out) / study
    out.mkdir(parents=True, exist_ok=True)
    text = report(study, summary, groups, seeds, iters[0] if len(iters) == 1 else iters, command, date,
                  changes)
    against = against_pair(pair, raw_records, args, extra, groups) if args.variant else {}
    if against:
        text += (f"\nAgainst the `{pair}` study: each row of this study minus the same row of `{pair}` on "
                 f"the same seed, from `{pair}`'s records made with the config this study's runs have but "
                 f"for its overrides ({' '.join(extra)}).\n\n"
                 f"{steps_table(against, groups, f'row: {study} - {pair}')}\n")
    text += f"\nFrom {sum(len(v) for v in raw.values())} records in `{records}` (trees {', '.join(trees)}).\n"
    text += builds_note(raw_records)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(
        {"pair": pair, "study": study, "command": command, "date": date, "iters": iters, "seeds": seeds,
         "level": LEVEL, "groups": groups, "trees": trees, "rows": summary, "steps": changes,
         "against_pair": against}, indent=2))
    print(f"\n{text}")
    if args.doc:
        update_doc(Path(args.doc), study, text)
    if args.summary_doc:
        update_doc(Path(args.summary_doc), study, main_table(summary) + "\n", tag="study")
    plot_training(raw, out, study)
    wrote = [out / "ablation.md", out / "ablation.json", out / "curves.png"]
    first = {f"{row}: {seeds_[min(seeds_)]['miou']:.1f}": Path(seeds_[min(seeds_)]["run_dir"])
             for row, seeds_ in raw_records.items()}
    if all(d.is_dir() and checkpoint.latest(d) is not None for d in first.values()):
        wrote.append(render_rows(first, out, args.image))
    print("wrote " + ", ".join(map(str, wrote)) + (f", {args.doc}" if args.doc else ""))
    return 0


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
    args.tree = source_tree()  # the code this process trains with, read once (the tree may change meanwhile)
    for pair in args.pairs:
        for slug in args.row_list:
            for seed in args.seed_list:
                code, record = run_row(pair, slug, seed, args, extra)
                if record is None and not args.no_train:  # failed, or stopped before its end
                    return code
        code = report_study(pair, study_name(pair, args.variant), args, extra, command, date)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
