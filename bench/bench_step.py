"""The train step's benchmark providers: the whole three-stage PWDA iteration, engine vs the eager
AdaptSegNet loop, on the same networks, initial weights and random batches.

The suite is bench/test_bench_step.py (`make bench`, bench/gpu_check.sh); step_profile.py builds the
same providers one at a time. Providers:
  eager   the AdaptSegNet way: fp32, NCHW, a separate forward and backward per loss (D and D_aux
          see source and target in separate calls), the unfused reference loss, plain torch.optim
          with foreach=False.
  engine  pwda_fast.adapt.Adapter as training runs it: channels_last, the fused loss through
          ops (backend auto), foreach (CPU) / fused (CUDA) optimizers; fp32 and bf16 autocast; on
          CUDA also bf16 with train.cuda_graphs.
  engine+compile  the same with the generator under torch.compile (opt-in: minutes of warm-up).
An iteration reads `batch` source and `batch` target images: images/s counts both.
"""

from __future__ import annotations

import itertools
import math
import warnings

import common
import torch

from pwda_fast import config, engine, reference
from pwda_fast.adversaries.base import SOURCE, TARGET, set_requires_grad
from pwda_fast.models import build_networks
from pwda_fast.reference import upsample_to

PRESETS = {"toy": "toy", "paper": "gta5_to_cityscapes"}


def make_batches(cfg, n: int, device) -> list[tuple[dict, dict]]:
    h, w = cfg.data.crop
    b, k = cfg.data.batch_size, cfg.model.num_classes
    g = torch.Generator().manual_seed(0)
    make = lambda: {"image": torch.randn(b, 3, h, w, generator=g).to(device),  # noqa: E731
                    "label": torch.randint(0, k, (b, h, w), generator=g).to(device)}
    return [(make(), make()) for _ in range(n)]


def build(cfg, device, channels_last: bool):
    torch.manual_seed(0)
    nets = build_networks(cfg.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for net in nets:
        net.to(device, memory_format=fmt).train()
    return nets


class EagerLoop:
    """AdaptSegNet's train_gta2cityscapes_multi.py loop on our networks, with the paper's weighting
    (GenMap + DisMap: adapt.weighting = "gen+dis", the presets'). It is AdaptSegNet's recipe: no class
    balance, no hard pixels and no memory term, which the paper presets' engine rows do run (more work
    for the engine, not less). tests/test_bench_step_twin.py ties its gradients to the Adapter's."""

    def __init__(self, cfg, device):
        if cfg.adapt.weighting != "gen+dis" or cfg.adapt.adversary != "pwda":
            raise ValueError("the eager loop is written for the paper's adversary with adapt.weighting = "
                             f"gen+dis; got {cfg.adapt.adversary!r}, {cfg.adapt.weighting!r}")
        self.cfg, self.a = cfg, cfg.adapt
        self.g, self.d, self.d_aux = build(cfg, device, channels_last=False)
        o = cfg.optim
        groups = self.g.param_groups(o.lr, o.head_lr_mult)
        if o.backbone_repeats:  # AdaptSegNet's (and MRNet's) own list, each tensor named 1-4 times
            groups[0]["params"] = self.g.backbone_listing()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the duplicates are the point
            self.opt_g = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         foreach=False)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=o.lr_d, betas=tuple(o.betas), foreach=False)
        self.opt_d_aux = torch.optim.Adam(self.d_aux.parameters(), lr=o.lr_d, betas=tuple(o.betas),
                                          foreach=False)

    def _aux(self, feat, size):
        """D_aux's logits at image size, the same function as the engine's (adapt.aux_at)."""
        if self.a.aux_at == "image":
            return self.d_aux(feat, size)
        return upsample_to(self.d_aux(feat), size)

    def _weighted(self, seg, z, a, label):
        return reference.weighted_adv_loss(seg, z, a, label=label, threshold=self.a.threshold,
                                           floor=self.a.floor, mu=self.a.mu)

    def step(self, step: int, source: dict, target: dict) -> None:
        a = self.a
        for opt in (self.opt_g, self.opt_d, self.opt_d_aux):
            opt.zero_grad()
        x_s, y_s, x_t = source["image"], source["label"], target["image"]
        size = tuple(x_s.shape[2:])
        # train G: source CE, then target adversarial losses against frozen discriminators
        set_requires_grad(self.d, False)
        set_requires_grad(self.d_aux, False)
        aux_s, main_s, feat_s = self.g(x_s)
        main_s = upsample_to(main_s, size)
        loss_seg = reference.multi_level_seg_loss(upsample_to(aux_s, size), main_s, y_s, a.lambda_seg)
        loss_seg.backward()
        _, main_t, feat_t = self.g(x_t)
        main_t = upsample_to(main_t, size)
        z_t = upsample_to(self.d(torch.softmax(main_t, 1)), size)
        a_t = self._aux(feat_t, size)
        loss_adv = (a.lambda_adv * self._weighted(main_t.detach(), z_t, a_t.detach(), SOURCE)
                    + a.lambda_aux * reference.domain_bce(a_t, SOURCE))
        loss_adv.backward()
        # train D and D_aux: source and target in separate passes, each with its own backward
        set_requires_grad(self.d, True)
        set_requires_grad(self.d_aux, True)
        main_s, main_t, feat_s, feat_t = main_s.detach(), main_t.detach(), feat_s.detach(), feat_t.detach()
        (reference.domain_bce(upsample_to(self.d(torch.softmax(main_s, 1)), size), SOURCE) / 2).backward()
        z_t = upsample_to(self.d(torch.softmax(main_t, 1)), size)
        (self._weighted(main_t, z_t, a_t.detach(), TARGET) / 2).backward()
        (reference.domain_bce(self._aux(feat_s, size), SOURCE) / 2).backward()
        (reference.domain_bce(self._aux(feat_t, size), TARGET) / 2).backward()
        self.opt_g.step()
        self.opt_d.step()
        self.opt_d_aux.step()


class Engine:
    """The training loop's own Adapter, built the way train.py builds it (engine.build)."""

    def __init__(self, cfg, device, compile_g: bool):
        cfg.train.compile = compile_g
        cfg.train.seed = 0  # the eager loop's initial weights
        self.adapter = engine.build(cfg, device).adapter

    def step(self, step: int, source: dict, target: dict) -> None:
        self.adapter.launch(step, source, target)  # as training runs it: nothing waits for the device


EAGER = "eager fp32 NCHW (AdaptSegNet loop)"


def providers(preset: str, device, *, batch: int | None = None, crop=None, bf16: bool = True,
              compile_g: bool = False):
    """(the preset's config, {provider label: constructor}) in table order, the eager loop first.

    Every engine row runs channels_last; bf16 adds the bf16-autocast row; on CUDA the engine in that
    precision also runs with train.cuda_graphs (give --warmup >= 4: three eager steps and the capture
    come before its replays); compile_g adds the engine with torch.compile(G) (bf16 when bf16, else
    fp32)."""
    overrides = {"train.device": torch.device(device).type}
    if batch:
        overrides["data.batch_size"] = batch
    if crop:
        overrides["data.crop"] = list(crop)
    base = config.load(PRESETS[preset], overrides)

    def engine(amp: str, compiled: bool, graphs: bool = False):
        cfg = config.load(PRESETS[preset], {**overrides, "train.channels_last": True, "train.amp": amp,
                                            "train.cuda_graphs": graphs})
        return lambda: Engine(cfg, device, compiled)

    ctors = {EAGER: lambda: EagerLoop(base, device), "engine fp32 channels_last": engine("none", False)}
    if bf16:
        ctors["engine bf16 channels_last"] = engine("bf16", False)
    if torch.device(device).type == "cuda":
        amp = "bf16" if bf16 else "none"
        ctors[f"engine {'bf16' if bf16 else 'fp32'} channels_last + CUDA graphs"] = engine(amp, False, True)
    if compile_g:
        ctors[f"engine {'bf16' if bf16 else 'fp32'} channels_last + compile"] = engine(
            "bf16" if bf16 else "none", True)
    return base, ctors


def interleaved_steps(provs: dict, batches: list, device, rounds: int, warmup: int,
                      errors: dict | None = None) -> dict:
    """label -> seconds per iteration: `warmup` untimed iterations each, then per round each provider
    runs one iteration per batch back to back, timed together up to one final device sync (one sample
    per round): as the training loop runs them, where the host queues the next iteration while the
    device finishes this one (Adapter.launch waits for nothing). Providers interleaved round by round
    (common.interleave)."""
    def stepper(prov):
        count = itertools.count()  # the step index goes on rising, as in training

        def step():
            i = next(count)
            prov.step(i, *batches[i % len(batches)])
        return step

    return common.interleave({name: stepper(prov) for name, prov in provs.items()}, device, rounds,
                             warmup, calls_per_sample=len(batches), errors=errors)


GRAPHS_AGREE_REL = 2e-2  # graph replay vs eager, first steps' losses (bf16; atomics in some backward kernels)


def graphs_agreement(provs: dict, batches: list, steps: int = 6) -> dict | None:
    """The CUDA-graphs row against its eager twin (same preset, precision and initial weights): their
    first `steps` losses side by side, run before the timing (whose warm-up they also are). The graphed
    engine captures at step 3 (its first step of a seen phase), so steps 3-5 are replays. A non-finite
    loss on either side is a disagreement. None when there is no graphs row."""
    graphed = next((name for name in provs if name.endswith("+ CUDA graphs")), None)
    if graphed is None:
        return None
    eager = graphed.removesuffix(" + CUDA graphs")
    out = {"eager": eager, "graphed": graphed, "steps": steps, "tolerance_rel": GRAPHS_AGREE_REL}
    try:
        losses = {name: [provs[name].adapter.launch(i, *batches[i % len(batches)]).read().losses
                         for i in range(steps)] for name in (eager, graphed)}
    except Exception as e:
        return {**out, "error": common.error_text(e)}
    diffs = [abs(g[k] - e[k]) / max(abs(e[k]), 1e-6)
             for e, g in zip(losses[eager], losses[graphed]) for k in e]
    worst = max(diffs) if all(math.isfinite(d) for d in diffs) else math.inf  # max() would skip a NaN
    captured = getattr(provs[graphed].adapter, "captured", None) is not None
    return {**out, "max_rel_diff": worst, "agree": worst <= GRAPHS_AGREE_REL, "captured": captured,
            "capture_failed": getattr(provs[graphed].adapter, "failed", None)}
