"""Hand-written mutations of the method's core, each applied alone to the working tree, then the tests
that should kill it. A quick, deterministic complement to mutmut (`make mutants` runs both):

    .venv/bin/python tests/mutation_table.py [--tests tests/test_oracle.py ...]

Prints one line per mutation, KILLED or SURVIVED, and exits 1 if any survived. The file is restored
after each run, also on Ctrl-C. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["tests/test_oracle.py", "tests/test_checkpoint.py", "tests/test_reference.py",
        "tests/test_metrics.py", "tests/test_discriminator.py"]

# (what it breaks, file, exact text, replacement)
MUTATIONS = [
    ("generator stage trains G toward the target label", "pwda_fast/adapt.py",
     "loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, SOURCE)",
     "loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, TARGET)"),
    ("discriminator stage labels source outputs as target", "pwda_fast/adapt.py",
     "reference.domain_bce(upsample_to(z[:n_s], size), SOURCE)",
     "reference.domain_bce(upsample_to(z[:n_s], size), TARGET)"),
    ("lambda_adv dropped from the generator loss", "pwda_fast/adapt.py",
     "loss_g = self.a.lambda_adv * loss_adv", "loss_g = loss_adv"),
    ("lambda_seg on the main head instead of the aux head", "pwda_fast/reference.py",
     "return ce(main_logits) + lambda_seg * ce(aux_logits)",
     "return lambda_seg * ce(main_logits) + ce(aux_logits)"),
    ("memory target's aux coefficient changed", "pwda_fast/reference.py",
     "0.5 * aux_logits.float()", "0.4 * aux_logits.float()"),
    ("memory term counted one step late", "pwda_fast/adapt.py",
     "step >= self.a.memory_start", "step > self.a.memory_start"),
    ("class-balance threshold changed", "pwda_fast/reference.py",
     "rare = counts < 64 * 64 * labels.shape[0]", "rare = counts < 32 * 32 * labels.shape[0]"),
    ("running class weight decays differently", "pwda_fast/reference.py",
     "often = 0.9 * often + 0.1 *", "often = 0.8 * often + 0.2 *"),
    ("hard pixels keep the easy ones", "pwda_fast/reference.py",
     "torch.where(loss < cut,", "torch.where(loss > cut,"),
    ("D_aux at feature size where the paper says image size", "pwda_fast/adapt.py",
     'return d_aux(feat, size) if self.a.aux_at == "image" else d_aux(feat)', "return d_aux(feat)"),
    ("warm-up starts at lr instead of warmup_start * lr", "pwda_fast/adapt.py",
     "return o.lr * (o.warmup_start + (1 - o.warmup_start) * step / o.warmup_iters)", "return o.lr"),
    ("weighting map computed with gradient", "pwda_fast/reference.py",
     "    with torch.no_grad():\n        w = generation_confidence",
     "    if True:\n        w = generation_confidence"),
    ("finite check ignores gradients", "pwda_fast/adapt.py", "        if grads:\n", "        if False:\n"),
    ("no fsync before the checkpoint rename", "pwda_fast/checkpoint.py",
     "        os.fsync(f.fileno())\n", ""),
    ("checkpoint written in place", "pwda_fast/checkpoint.py",
     'tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"', "tmp = path"),
    ("keep_last keeps one more", "pwda_fast/checkpoint.py", "ckpts[:-keep_last]", "ckpts[:-keep_last - 1]"),
    ("latest pointer written before the checkpoint", "pwda_fast/checkpoint.py",
     '    _atomic_write(path, lambda f: torch.save(state, f))\n'
     '    _atomic_write(run_dir / "latest", lambda f: f.write(path.name.encode()))\n',
     '    _atomic_write(run_dir / "latest", lambda f: f.write(path.name.encode()))\n'
     '    _atomic_write(path, lambda f: torch.save(state, f))\n'),
    ("IoU union off by one", "pwda_fast/metrics.py", "union = conf.sum(0) + conf.sum(1) - tp",
     "union = conf.sum(0) + conf.sum(1) - tp + 1"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="+", default=FAST, help="test files to run against each mutation")
    args = parser.parse_args(argv)
    survived, t0 = 0, time.monotonic()
    for what, file, old, new in MUTATIONS:
        path = ROOT / file
        source = path.read_text()
        if source.count(old) != 1:
            print(f"{'STALE':9} {what}: the text to mutate is not in {file} exactly once; update this table")
            survived += 1
            continue
        path.write_text(source.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                  *args.tests], cwd=ROOT, capture_output=True, text=True)
        finally:
            path.write_text(source)
        killed = run.returncode == 1  # 1: a test failed; anything else (2-5) is a broken run, not a kill
        survived += not killed
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
        print(f"{'KILLED' if killed else 'SURVIVED':9} {what} ({file}): {last}", flush=True)
    print(f"{len(MUTATIONS) - survived} of {len(MUTATIONS)} killed in {time.monotonic() - t0:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
