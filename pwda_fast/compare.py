"""`make train`: source-only vs PWDA on the toy domains, same seed, target mIoU side by side.

    pwda-compare [--seed 1234] [--iters N] [extra --section.key=value overrides]

Each run is an ordinary `pwda_fast.train` run in its own run_dir (runs/toy-<mode>-s<seed>), so
rerunning resumes or, when finished, just reprints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pwda_fast import train, weight_stats
from pwda_fast.data.labels import CLASSES

RUNS = (("source-only", ["--adapt.mode=source_only"]),
        ("PWDA (gen+dis)", ["--adapt.mode=adapt", "--adapt.weighting=gen+dis"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pwda-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1234, help="train.seed of both runs (default 1234)")
    parser.add_argument("--iters", type=int, default=None, help="train.iters of both runs (default: toy's)")
    parser.add_argument("--runs", default="runs", help="parent folder of the run dirs (default runs)")
    args, extra = parser.parse_known_args(argv)
    results, run_dirs = {}, {}
    for name, flags in RUNS:
        run_dirs[name] = run_dir = Path(args.runs) / f"toy-{flags[0].split('=')[1]}-s{args.seed}"
        argv_run = ["--config", "toy", f"--train.seed={args.seed}", f"--train.run_dir={run_dir}", *flags]
        argv_run += [f"--train.iters={args.iters}"] if args.iters else []
        code, results[name] = train.run_for_result(argv_run + extra, name)
        if results[name] is None:  # failed, or stopped before its end
            return code
    names = list(results)
    print(f"\ntarget-val IoU (%) on the toy domains, seed {args.seed}")
    print(f"  {'class':<14}" + "".join(f"{n:>16}" for n in names))
    for cls in CLASSES:
        if any(cls in r["iou"] for r in results.values()):
            print(f"  {cls:<14}" + "".join(f"{r['iou'].get(cls, float('nan')):>16.2f}"
                                          for r in results.values()))
    print(f"  {'mIoU':<14}" + "".join(f"{r['miou']:>16.2f}" for r in results.values()))
    gain = results[names[1]]["miou"] - results[names[0]]["miou"]
    print(f"\nadaptation {'gains' if gain >= 0 else 'loses'} {abs(gain):.2f} mIoU over source-only")
    d_aux = weight_stats.d_aux_at_end(run_dirs[names[1]]).get("d_aux_end")
    if d_aux is not None:
        print(f"D_aux's loss over the last eighth of training: {d_aux:.3f} (2 ln 2 = "
              f"{weight_stats.CHANCE:.3f} is chance, where DisMap would be a constant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
