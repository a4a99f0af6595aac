"""The paper's Table 3 ablation on the toy domains: which part of the pixel weighting helps.

    python -m pwda_fast.ablate --config toy --seeds 3 [--iters N] [--out DIR] [--section.key=value ...]

Rows (the paper's Table 3): source-only; DA without pixel-wise weighting; GenMap (T=1); GenMap (T=0.9);
GenMap (T=0.9) + DisMap.
Each (row, seed) is an ordinary `pwda_fast.train` run in OUT/<row>-s<seed>, so rerunning resumes
unfinished runs and re-evaluates finished ones. Writes OUT/ablation.md (mean, sample std and per-seed
target mIoU, with the command and date), OUT/ablation.json (the same numbers), and OUT/ablation.png:
one target-val image with each row's prediction (first seed) in the Cityscapes palette, plus one
OUT/<row>-s<first seed>.png per row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from pwda_fast import checkpoint, pictures, train
from pwda_fast.data import build_val
from pwda_fast.data.labels import colorize

# (slug, row name as in the paper's Table 3, train overrides)
# The rows of the paper's Table 3, all on the preset's generator (MRNet's in the paper presets and the
# toy): its baseline is MRNet's adaptation without pixel-wise weighting.
ROWS = (
    ("source-only", "source-only", ["--adapt.mode=source_only"]),
    ("no-weighting", "DA without pixel-wise weighting", ["--adapt.mode=adapt", "--adapt.weighting=none"]),
    ("genmap-t1", "GenMap (T=1)", ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=1.0"]),
    ("genmap-t0.9", "GenMap (T=0.9)",
     ["--adapt.mode=adapt", "--adapt.weighting=gen", "--adapt.threshold=0.9"]),
    ("genmap-t0.9-dismap", "GenMap (T=0.9) + DisMap",
     ["--adapt.mode=adapt", "--adapt.weighting=gen+dis", "--adapt.threshold=0.9"]),
)


def summarise(results: dict[str, dict[int, float]]) -> dict[str, dict]:
    """{row: {seed: mIoU}} -> {row: {"mean", "std" (sample std; None for one seed), "seeds"}}."""
    out = {}
    for row, per_seed in results.items():
        values = list(per_seed.values())
        out[row] = {"mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None, "seeds": per_seed}
    return out


def markdown_table(summary: dict[str, dict]) -> str:
    """The Table 3 layout: one line per row, mean ± std, then the per-seed values."""
    seeds = sorted({s for row in summary.values() for s in row["seeds"]})
    lines = ["| method | mIoU mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for row, r in summary.items():
        spread = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        per_seed = " | ".join(f"{r['seeds'][s]:.2f}" if s in r["seeds"] else "–" for s in seeds)
        lines.append(f"| {row} | {r['mean']:.2f}{spread} | {per_seed} |")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
    # No abbreviations: everything unknown passes through to train as --section.key=value.
    parser = argparse.ArgumentParser(prog="python -m pwda_fast.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", default="toy", help="preset or TOML file every run starts from")
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs per row, seeded first-seed, first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=1234)
    parser.add_argument("--iters", type=int, default=None, help="override train.iters of every run")
    parser.add_argument("--out", default="runs/ablation", help="folder of the run dirs and the results")
    parser.add_argument("--image", type=int, default=0, help="index of the target-val image to render")
    args, extra = parser.parse_known_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.first_seed + k for k in range(args.seeds)]
    results, first_runs = {}, {}
    for slug, name, flags in ROWS:
        for seed in seeds:
            run_dir = out / f"{slug}-s{seed}"
            argv_run = ["--config", args.config, f"--train.seed={seed}", f"--train.run_dir={run_dir}", *flags]
            argv_run += [f"--train.iters={args.iters}"] if args.iters else []
            argv_run += extra
            code, final = train.run_for_result(argv_run, f"{name}, seed {seed}")
            if code != 0:
                return code
            results.setdefault(name, {})[seed] = final["miou"]
            first_runs.setdefault(f"{name}: {results[name][seed]:.1f}", run_dir)
    summary = summarise(results)
    # Quoted so that it reruns as printed (list overrides such as --data.crop=[48, 96] hold spaces).
    command = shlex.join(["python", "-m", "pwda_fast.ablate", *(argv if argv is not None else sys.argv[1:])])
    date = datetime.date.today().isoformat()
    table = markdown_table(summary)
    text = (f"Target-val mIoU (%) on the {args.config} domains, {len(seeds)} seed(s) {seeds}; "
            f"std is the sample standard deviation over seeds.\n\n{table}\n\n"
            f"Command: `{command}` ({date}).\n")
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"command": command, "date": date, "seeds": seeds,
                                                   "rows": summary}, indent=2))
    print(f"\n{text}")
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and "
          f"{render_rows(first_runs, out, args.image)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
