"""Hand-written mutations of the method's core, each applied alone to the working tree, then the tests
that should kill it. A quick, deterministic complement to mutmut (`make mutants` runs both):

    .venv/bin/python tests/mutation_table.py [--tests tests/test_oracle.py ...] [--only TEXT ...]

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
# The independent twin of the networks, and the cited table of the paper presets.
NETWORKS = ["tests/test_networks_independent.py"]
PRESETS = ["tests/test_presets.py"]
# Every state a skipped step could touch; a finished run evaluated, exported and drawn as it was trained;
# exact resume of the paper's recipe; the oracle with MRNet's generator.
SKIPPED = ["tests/test_skipped_step.py"]
FINISHED = ["tests/test_finished_run.py"]
RESUME = ["tests/test_train.py", "-k", "stop_and_resume"]
ORACLE = ["tests/test_oracle.py", "-k", "mrnet"]
# The choices the paper leaves open (issue-level switches): the oracle's iterations of each.
SWITCHES = ["tests/test_oracle.py", "-k", "preheat or d-unweighted or d-normalized or flowing"]
# MRNet's duplicated backbone listing and the toy D's stride.
REPEATS = ["tests/test_models.py", "-k", "repeating_sgd or disc_stride"]
# MRNet's own adversary (adapt.adversary = "mrnet"): the oracle's iterations and the twin of MsImageDis.
MRNET_ADV = ["tests/test_oracle.py", "tests/test_mrnet_adversary.py", "-k", "mrnet-adversary or twin"]
# The edges a long run meets (issue 36): skip streaks and the fp16 calibration boundary, a skipped step
# after a resume, every ranged key's edges, the diagnosis of each loss term.
STREAKS = ["tests/test_skip_streaks.py"]
RESUME_SKIP = ["tests/test_resume_skip.py"]
EDGES = ["tests/test_config_edges.py"]
CAUSES = ["tests/test_likely_causes.py"]

# (what it breaks, file, exact text, replacement[, the tests to run instead of --tests])
MUTATIONS = [
    ("generator stage trains G toward the target label", "pwda_fast/adversaries/pwda.py",
     "loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, SOURCE, weighted)",
     "loss_adv = self._adv_loss(main_t.detach(), z_t, weight_aux, TARGET, weighted)"),
    ("discriminator stage labels source outputs as target", "pwda_fast/adversaries/pwda.py",
     "reference.domain_bce(upsample_to(z[:n_s], size), SOURCE)",
     "reference.domain_bce(upsample_to(z[:n_s], size), TARGET)"),
    ("lambda_adv dropped from the generator loss", "pwda_fast/adversaries/pwda.py",
     "loss_g = a.lambda_adv * loss_adv", "loss_g = loss_adv"),
    ("lambda_seg on the main head instead of the aux head", "pwda_fast/reference.py",
     "return ce(main_logits) + lambda_seg * ce(aux_logits)",
     "return lambda_seg * ce(main_logits) + ce(aux_logits)"),
    ("memory target's aux coefficient changed", "pwda_fast/reference.py",
     "0.5 * aux_logits.float()", "0.4 * aux_logits.float()"),
    ("memory term counted one step late", "pwda_fast/adapt.py",
     "lambda_mem if step >= self.cfg.memory_start", "lambda_mem if step > self.cfg.memory_start"),
    ("class-balance threshold changed", "pwda_fast/reference.py",
     "rare = counts < 64 * 64 * labels.shape[0]", "rare = counts < 32 * 32 * labels.shape[0]"),
    ("running class weight decays differently", "pwda_fast/reference.py",
     "often = 0.9 * often + 0.1 *", "often = 0.8 * often + 0.2 *"),
    ("hard pixels keep the easy ones", "pwda_fast/reference.py",
     "torch.where(loss < cut,", "torch.where(loss > cut,"),
    ("D_aux at feature size where the paper says image size", "pwda_fast/weighting.py",
     'return d_aux(feat, size) if aux_at == "image" else d_aux(feat)', "return d_aux(feat)"),
    ("warm-up starts at lr instead of warmup_start * lr", "pwda_fast/adapt.py",
     "return base * (o.warmup_start + (1 - o.warmup_start) * step / o.warmup_iters)", "return base"),
    ("D warms up without optim.warmup_d (CLAN's ramp leaks into every run)", "pwda_fast/adapt.py",
     "return self._lr(self.optim.lr_d, step, warm=self.optim.warmup_d)",
     "return self._lr(self.optim.lr_d, step, warm=True)"),
    ("gen+aux puts DisMap into w", "pwda_fast/adversaries/pwda.py",
     "self.aux_in_w = weighting.uses_dis(adapt_cfg)", "self.aux_in_w = self.use_aux"),
    ("Fig. 2 maps in eval mode (running statistics)", "pwda_fast/weighting.py",
     "            net.train()\n", "            net.eval()\n", ["tests/test_weight_stats.py"]),
    ("weighting map computed with gradient", "pwda_fast/reference.py",
     "    with torch.no_grad() if detach else contextlib.nullcontext():\n        w = generation_confidence",
     "    if True:\n        w = generation_confidence"),
    ("finite check ignores gradients", "pwda_fast/guard.py", "        if grads:\n", "        if False:\n"),
    ("no fsync before the checkpoint rename", "pwda_fast/checkpoint.py",
     "        os.fsync(f.fileno())\n", ""),
    ("checkpoint written in place", "pwda_fast/checkpoint.py",
     'tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"', "tmp = path"),
    ("keep_last keeps one more", "pwda_fast/checkpoint.py", "ckpts[:-keep_last]", "ckpts[:-keep_last - 1]"),
    ("latest pointer written before the checkpoint", "pwda_fast/checkpoint.py",
     '    atomic_write(path, lambda f: torch.save(state, f))\n'
     '    atomic_write(folder.latest, lambda f: f.write(path.name.encode()))\n',
     '    atomic_write(folder.latest, lambda f: f.write(path.name.encode()))\n'
     '    atomic_write(path, lambda f: torch.save(state, f))\n'),
    ("IoU union off by one", "pwda_fast/metrics.py", "union = conf.sum(0) + conf.sum(1) - tp",
     "union = conf.sum(0) + conf.sum(1) - tp + 1"),
    ("layer3 built without dilation (2 -> 1)", "pwda_fast/models/backbone.py",
     "blocks[2], dilation=2)", "blocks[2], dilation=1)", NETWORKS),
    ("layer4 dilated 2 instead of 4", "pwda_fast/models/backbone.py",
     "blocks[3], dilation=4)", "blocks[3], dilation=2)", NETWORKS),
    ("stride on the 3x3 conv where the 1x1 is asked", "pwda_fast/models/backbone.py",
     '(stride, 1) if stride_on == "1x1" else (1, stride)',
     '(1, stride) if stride_on == "1x1" else (stride, 1)', NETWORKS),
    ("stem max-pool rounds down", "pwda_fast/models/backbone.py", "padding=1, ceil_mode=True)",
     "padding=1, ceil_mode=False)", NETWORKS),
    ('bn = "stats" runs BatchNorm on running statistics', "pwda_fast/models/backbone.py",
     'if self.bn_mode == "frozen":', 'if self.bn_mode in ("frozen", "stats"):', NETWORKS),
    ("SE squeezes by global max instead of mean", "pwda_fast/models/mrnet.py",
     "nn.AdaptiveAvgPool2d(1)", "nn.AdaptiveMaxPool2d(1)", NETWORKS),
    ("head dropout element-wise instead of per channel", "pwda_fast/models/mrnet.py",
     "nn.Dropout2d(dropout)", "nn.Dropout(dropout)", NETWORKS),
    ("GroupNorm with 16 groups instead of MRNet's 32", "pwda_fast/models/mrnet.py",
     "GN_GROUPS = 32", "GN_GROUPS = 16", NETWORKS),
    ("main head on concat(layer3, layer4)", "pwda_fast/models/mrnet.py",
     "torch.cat((x4, x3), 1)", "torch.cat((x3, x4), 1)", NETWORKS),
    ("layer4 features (D_aux's input) detached from the generator", "pwda_fast/models/mrnet.py",
     "torch.cat((x4, x3), 1)), x4", "torch.cat((x4, x3), 1)), x4.detach()", NETWORKS),
    ("ASPP sums two branches (AdaptSegNet's early return)", "pwda_fast/models/deeplab.py",
     "self.conv2d_list[1:]:", "self.conv2d_list[1:2]:", NETWORKS),
    ("D's LeakyReLU slope 0.1", "pwda_fast/models/discriminator.py",
     "layers += [conv, nn.LeakyReLU(0.2, inplace=True)]", "layers += [conv, nn.LeakyReLU(0.1, inplace=True)]",
     NETWORKS),
    ("D_aux's last LeakyReLU slope 0.1", "pwda_fast/models/discriminator.py",
     "width // 4, 1), nn.LeakyReLU(0.2, inplace=True),", "width // 4, 1), nn.LeakyReLU(0.1, inplace=True),",
     NETWORKS),
    ("GTA5 preset's hard-pixel percentile 80 -> 20", "pwda_fast/configs/gta5_to_cityscapes.toml",
     "hard_pixels = 80.0", "hard_pixels = 20.0", PRESETS),
    ("SYNTHIA preset's lambda_seg back to AdaptSegNet's 0.1", "pwda_fast/configs/synthia_to_cityscapes.toml",
     "lambda_seg = 0.5", "lambda_seg = 0.1", PRESETS),
    ("layer4 features detached from the generator, against the oracle", "pwda_fast/models/mrnet.py",
     "torch.cat((x4, x3), 1)), x4", "torch.cat((x4, x3), 1)), x4.detach()", ORACLE),
    ('a skipped step restores BatchNorm statistics for bn = "train" only', "pwda_fast/adapt.py",
     "buffers = [b for net in nets for b in net.buffers()]",
     "buffers = [b for net in nets for b in net.buffers()]"
     ' if getattr(nets.g, "module", nets.g).bn_mode == "train" else []',
     SKIPPED),
    ("a skipped step keeps the running class weight's update", "pwda_fast/adapt.py",
     "buffers + ([self.often] if self.often is not None else [])", "buffers", SKIPPED),
    ("fp16: a step skipped for the loss alone counts towards doubling the scale", "pwda_fast/guard.py",
     "unchanged = ~finite & ~lowered", "unchanged = torch.zeros_like(finite)", SKIPPED),
    ("running class weight left out of checkpoints", "pwda_fast/adapt.py",
     'return {"often": self.often, "scaler": self.guard.scaler.state_dict()}',
     'return {"often": None, "scaler": self.guard.scaler.state_dict()}', RESUME),
    ("evaluation ignores the run's input normalisation", "pwda_fast/data/__init__.py",
     "data_cfg.target_size, data_cfg.normalize,\n                       data_cfg.interpolation)",
     "data_cfg.target_size,\n                       interpolation=data_cfg.interpolation)", FINISHED),
    ("evaluate --checkpoint scores a bf16 run in fp32", "pwda_fast/evaluate.py",
     "args.amp or cfg.train.amp", 'args.amp or "none"', FINISHED),
    ("export's generator.json ignores the run's normalisation", "pwda_fast/export.py",
     "norm = normalization.get(cfg.data.normalize)", 'norm = normalization.get("auto")', FINISHED),
    ("visualize feeds an outside image ImageNet-normalised", "pwda_fast/visualize.py",
     "size=size, train=False, normalize=cfg.data.normalize,", "size=size, train=False,", FINISHED),
    ("w's gradient flowing mode detaches w after all", "pwda_fast/adversaries/pwda.py",
     "label=SOURCE, detach_weights=False,", "label=SOURCE, detach_weights=True,", SWITCHES),
    ("D's target term weighted when asked unweighted", "pwda_fast/adversaries/pwda.py",
     'weighted = self.weighting_on(step) and a.d_target != "unweighted"',
     "weighted = self.weighting_on(step)", SWITCHES),
    ("D's target term normalised by sum(w) instead of mean(w)", "pwda_fast/adversaries/pwda.py",
     "return loss / ops.pixel_weights(seg_logits, aux_logits, **self.weight_kw).mean()",
     "return loss / ops.pixel_weights(seg_logits, aux_logits, **self.weight_kw).sum()", SWITCHES),
    ("CLAN's preheat lasts one step longer", "pwda_fast/adversaries/pwda.py",
     "step >= self.cfg.preheat_iters", "step > self.cfg.preheat_iters", SWITCHES),
    ("backbone repeats keep the momentum of a tensor's first entry", "pwda_fast/engine.py",
     '                            self.state[p].pop("momentum_buffer", None)\n', "", REPEATS),
    ("D's stride-2 convs one fewer than disc_stride asks", "pwda_fast/models/discriminator.py",
     "down = stride.bit_length() - 1", "down = stride.bit_length() - 2", REPEATS),
    ("MRNet's D: gradient penalty not differentiated into D", "pwda_fast/reference.py",
     "real_input, create_graph=True)", "real_input, retain_graph=True)", MRNET_ADV),
    ("MRNet's generator LSGAN term without its factor 2", "pwda_fast/reference.py",
     "sum(2.0 * ((m.float() - 1.0) ** 2).mean() for m in maps)",
     "sum(((m.float() - 1.0) ** 2).mean() for m in maps)", MRNET_ADV),
    ("MRNet's D1 (aux head) and D2 (main head) weights swapped", "pwda_fast/adversaries/mrnet.py",
     "self.cfg.lambda_mrnet_main * loss_adv + self.cfg.lambda_mrnet_aux * loss_adv_aux",
     "self.cfg.lambda_mrnet_aux * loss_adv + self.cfg.lambda_mrnet_main * loss_adv_aux", MRNET_ADV),
    ("MRNet's D stage scores the source as fake", "pwda_fast/adversaries/mrnet.py",
     "[m[:n_t] for m in maps], [m[n_t:] for m in maps]", "[m[n_t:] for m in maps], [m[:n_t] for m in maps]",
     MRNET_ADV),
    ("MRNet's D averages the zero padding into its pooled scales", "pwda_fast/models/ms_discriminator.py",
     "count_include_pad=False", "count_include_pad=True", MRNET_ADV),
    ("MRNet's D residual blocks without the skip", "pwda_fast/models/ms_discriminator.py",
     "return x + self.body(x)", "return self.body(x)", MRNET_ADV),
    ("train.max_skips counts every skip of the run, not those in a row", "pwda_fast/skips.py",
     "        if report.stepped:\n            self.consecutive = 0\n            return\n",
     "        if report.stepped:\n            return\n", STREAKS),
    ("train.max_skips stops one skip late", "pwda_fast/skips.py",
     "if self.consecutive >= self.cfg.train.max_skips:", "if self.consecutive > self.cfg.train.max_skips:",
     STREAKS),
    ("a streak is named by its latest step, not its first", "pwda_fast/skips.py",
     "if self.consecutive == 1:", "if self.consecutive >= 1:", STREAKS),
    ("fp16 calibration skips count towards train.max_skips", "pwda_fast/skips.py",
     "        if report.calibrating:\n", "        if False:\n", STREAKS),
    ("the first non-finite loss read from the last one computed", "pwda_fast/skips.py",
     "next((k for k, v in losses.items() if not", "next((k for k, v in reversed(losses.items()) if not",
     STREAKS),
    ("fp16: the overflow that lands the scale exactly on 1 counts as a divergence", "pwda_fast/guard.py",
     "(scale >= 1.0)", "(scale > 1.0)", STREAKS),
    ("the skip counter hears each step under the number before it", "pwda_fast/train.py",
     "self.skips.record(step, report)", "self.skips.record(step - 1, report)", STREAKS),
    ("a resume replaces the running class weight instead of copying into it", "pwda_fast/adapt.py",
     'self.often.copy_(state["often"])', 'self.often = state["often"]', RESUME_SKIP),
    ("a resume replaces the networks' tensors (load_state_dict assign=True)", "pwda_fast/models/__init__.py",
     "net.load_state_dict(state[name])", "net.load_state_dict(state[name], assign=True)", RESUME_SKIP),
    ("a weight that may be 0 refused at 0 (adapt.lambda_adv)", "pwda_fast/config.py",
     '"adapt.lambda_adv": _non_negative,', '"adapt.lambda_adv": _positive,', EDGES),
    ("[0, 1) ranges accept 1", "pwda_fast/config.py",
     "_fraction = (lambda v: 0 <= v < 1,", "_fraction = (lambda v: 0 <= v <= 1,", EDGES),
    ("data.max_bad_fraction refuses 1", "pwda_fast/config.py",
     '"data.max_bad_fraction": (lambda v: 0 <= v <= 1,', '"data.max_bad_fraction": (lambda v: 0 <= v < 1,',
     EDGES),
    ("data.workers accepts -2", "pwda_fast/config.py", "(lambda v: v >= -1, ", "(lambda v: v >= -2, ", EDGES),
    ("model.aux_disc_width refuses its lowest width, 4", "pwda_fast/config.py",
     "(lambda v: v >= 4, ", "(lambda v: v > 4, ", EDGES),
    ("adapt.hard_pixels accepts 100", "pwda_fast/config.py",
     "(lambda v: 0 <= v < 100,", "(lambda v: 0 <= v <= 100,", EDGES),
    ("data.scale accepts a lower bound of 0", "pwda_fast/config.py", "0 < v[0] <= v[1]", "0 <= v[0] <= v[1]",
     EDGES),
    ("adv_aux and d_aux blamed on the segmenter's learning rate", "pwda_fast/adversaries/base.py",
     'if term not in ("adv", "adv_aux", "d", "d_aux"):', 'if term not in ("adv", "d"):', CAUSES),
    ("the adversarial terms name optim.lr where D's rate is optim.lr_d", "pwda_fast/adversaries/base.py",
     "or optim.lr_d (now {cfg.optim.lr_d:g})", "or optim.lr (now {cfg.optim.lr:g})", CAUSES),
    ("MRNet's lambdas shown with the paper's lambdas' values", "pwda_fast/adversaries/base.py",
     "values = [getattr(cfg.adapt, name) for name in lambdas]",
     "values = [cfg.adapt.lambda_adv, cfg.adapt.lambda_aux]", CAUSES),
    ("MRNet's adversary diagnosed with the paper's lambdas", "pwda_fast/adversaries/mrnet.py",
     '("lambda_mrnet_main", "lambda_mrnet_aux")', '("lambda_adv", "lambda_aux")', CAUSES),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="+", default=FAST,
                        help="test files to run against each mutation that names none of its own")
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only the mutations whose description, file or own tests contain one of "
                             "these (e.g. --only test_skip_streaks skips.py)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(t in " ".join(map(str, m)) for t in args.only)]
    survived, t0 = 0, time.monotonic()
    for what, file, old, new, *own in chosen:
        path = ROOT / file
        source = path.read_text()
        if source.count(old) != 1:
            print(f"{'STALE':9} {what}: the text to mutate is not in {file} exactly once; update this table")
            survived += 1
            continue
        path.write_text(source.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                  *(own[0] if own else args.tests)], cwd=ROOT, capture_output=True, text=True)
        finally:
            path.write_text(source)
        killed = run.returncode == 1  # 1: a test failed; anything else (2-5) is a broken run, not a kill
        survived += not killed
        last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
        print(f"{'KILLED' if killed else 'SURVIVED':9} {what} ({file}): {last}", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} killed in {time.monotonic() - t0:.0f} s")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
