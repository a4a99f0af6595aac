"""An independent oracle of whole training iterations: what the losses and the parameter updates must be.

The engine (adapt.Adapter + its optimizers) runs two iterations on hand-made tensors; this file
recomputes the same two iterations from the method's equations (docs/METHOD.md) in float64, with its
own plainly written BCE, CE, KL, pixel weights, poly schedule, SGD-with-momentum and Adam, on copies of
the networks taken before the step. Nothing here calls reference.py or adapt.py helpers, so a slip in
either (a flipped domain label, a dropped lambda, a weighting map that leaks gradient, a D that is not
frozen in the generator stage, a wrong learning-rate multiplier) shows up as a loss or an update that
disagrees with the oracle.

The lambdas are O(1) and all different, so every term moves the parameters visibly.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_step

from pwda_fast import config, engine

CPU = torch.device("cpu")
TOL = 1e-3  # of the largest value: float32 engine vs float64 oracle (worst seen: about 1e-4)
# Odd sizes (heads 13x17, D map 3x4), large enough that one class passes MRNet's 64*64*N-pixel
# class-balance threshold while the others stay "rare".
N, H, W = 2, 97, 131
STEPS = (3, 4)  # two consecutive iterations, not the first: the poly schedule is already below 1
# A random D's adversarial gradient is ~1e-3 of the CE gradient: lambda_adv and lambda_aux are large
# here so that each term carries a visible share of G's update (test_oracle_sees_each_term).
LAMBDAS = {"adapt.lambda_adv": 30.0, "adapt.lambda_aux": 20.0, "adapt.lambda_seg": 0.4,
           "adapt.lambda_mem": 0.25}
MRNET_LAMBDAS = {"adapt.lambda_mrnet_aux": 40.0, "adapt.lambda_mrnet_main": 60.0}


def _cfg(weighting: str, memory: bool, mode: str = "adapt", bn: str = "frozen", nesterov: bool = False,
         aux_at: str = "image", recipe: bool = False, arch: str = "deeplabv2", **extra) -> config.Config:
    """A tiny run with O(1) lambdas; recipe=True adds MRNet's class balance (with the running "often"
    weight), hard pixels and a memory term that starts at the second step. arch "mrnet" is MRNet's
    generator at toy size, with its heads' GroupNorm (64 and 128 channels in 32 groups: with one
    channel per group a norm cancels the conv bias before it, whose gradient is then round-off),
    squeeze-excitation and channel dropout."""
    mrnet = {"adapt.class_balance": True, "adapt.often_balance": True, "adapt.class_balance_max": 7.0,
             "adapt.hard_pixels": 80.0, "adapt.memory_start": 4, "optim.poly_iters": 30} if recipe \
        else {"adapt.memory_start": 0}
    return config.load("toy", {
        "model.arch": arch, "model.head_width": 64, "adapt.aux_at": aux_at, **mrnet,
        "model.depth": 14, "model.width": 8, "model.bn": bn, "model.disc_width": 4,
        # The paper's D (the toy preset's stride-4 D has its own tests in test_models.py): at stride 4
        # its 16x32 cells of 1x1 LeakyReLU layers move G's first gradient by float32 round-off alone
        # by ~5e-3 of its largest value, over this oracle's 1e-3.
        "model.disc_stride": 32,
        # MRNet's backbone gradient at the first step is mostly D_aux's fool term; through 8-wide
        # LeakyReLU layers at image size, float32 round-off flips enough units across the kink to move
        # it by 1.3e-3 of its largest value (a float32 copy of this oracle differs from it as much as
        # the engine does); at width 32 by 1.3e-4.
        "model.aux_disc_width": 32 if arch == "mrnet" else 8,
        "adapt.mode": mode, "adapt.weighting": weighting, "adapt.memory": memory,
        # a threshold the random logits straddle, so both branches of eq. (3) are taken
        "adapt.threshold": 0.12, "adapt.floor": 0.03, "adapt.mu": 0.2, **LAMBDAS,
        "optim.lr": 0.05, "optim.lr_d": 0.02, "optim.head_lr_mult": 3.0, "optim.momentum": 0.8,
        "optim.weight_decay": 0.01, "optim.power": 0.7, "optim.betas": [0.5, 0.9], "optim.impl": "torch",
        "optim.nesterov": nesterov, "optim.warmup_iters": 4, "optim.warmup_start": 0.3,  # step 3 warms up
        "train.iters": 10, "kernels.loss": "torch", **extra})


def _batches(blocks: bool = True):
    """Hand-made source and target batches, one pair per step. blocks=False leaves the labels uniformly
    random (no road/sidewalk blocks), where no class dominates the CE gradient."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for k, _ in enumerate(STEPS):
        # Class 17 is absent from the first batch and present in the second: its running "often" weight
        # (raised by the absence) then weighs its pixels. Class 18 never occurs.
        labels = torch.randint(0, 17 + k, (N, H, W), generator=gen)
        if blocks:
            labels[:, :, :80] = 0  # 15520 pixels of road: more than 64*64*N, so road is not "rare"
            labels[:, :, 80:100] = 1  # about 3900 of sidewalk: rare under 64*64*N, not under 32*32*N
        labels[:, :3] = 255  # void rows: ignored by CE
        src = {"image": torch.randn(N, 3, H, W, generator=gen), "label": labels}
        tgt = {"image": torch.randn(N, 3, H, W, generator=gen)}
        out.append((src, tgt))
    return out


# -- the oracle's own formulation --------------------------------------------------------------------

def up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear, corners aligned, to the image size (the paper's upsampling of every map)."""
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=True)


def bce(z: torch.Tensor, y: float) -> torch.Tensor:
    """-[y log s(z) + (1 - y) log(1 - s(z))], written out; float64 keeps log(1 - s) exact enough."""
    s = 1.0 / (1.0 + torch.exp(-z))
    return -(y * torch.log(s) + (1.0 - y) * torch.log(1.0 - s))


def pixel_ce(logits: torch.Tensor, labels: torch.Tensor, class_w: list[float] | None) -> torch.Tensor:
    """(N, H, W): w[label] * -log softmax(logits)[label], 0 on void pixels."""
    e = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = e / e.sum(1, keepdim=True)
    valid = labels != 255
    picked = torch.gather(p, 1, torch.where(valid, labels, 0).unsqueeze(1))[:, 0]
    w = torch.ones_like(picked) if class_w is None else torch.tensor(class_w, dtype=picked.dtype)[
        torch.where(valid, labels, 0)]
    return torch.where(valid, -w * torch.log(picked), torch.zeros_like(picked)), torch.where(valid, w, 0.0)


def ce(logits: torch.Tensor, labels: torch.Tensor, class_w: list[float] | None = None,
       hard: float = 0.0) -> torch.Tensor:
    """Weighted mean over non-void pixels of -log softmax(logits)[label]; with `hard`, first void
    every pixel whose loss is below the hard-th percentile (numpy's, of all N*H*W pixel losses)."""
    if hard:
        loss, _ = pixel_ce(logits.detach(), labels, class_w)
        cut = float(np.percentile(loss.numpy(), hard))
        labels = torch.where(loss < cut, 255, labels)
    loss, w = pixel_ce(logits, labels, class_w)
    return loss.sum() / w.sum()


def class_weights(labels: torch.Tensor, often: list[float] | None, a) -> tuple[list, list | None]:
    """MRNet's batch class weights, class by class: max_value below 64*64*N pixels, else 1; times the
    running often weight 0.9 * often + 0.1 * (max_value if absent else 1)."""
    counts = [int((labels == c).sum()) for c in range(19)]
    w = [a.class_balance_max if n < 64 * 64 * labels.shape[0] else 1.0 for n in counts]
    if often is None:
        return w, None
    often = [0.9 * o + 0.1 * (a.class_balance_max if n == 0 else 1.0) for o, n in zip(often, counts)]
    return [x * o for x, o in zip(w, often)], often


def softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def weights(main_up: torch.Tensor, a_up: torch.Tensor | None, a, detach: bool = True) -> torch.Tensor:
    """Eqs. (3), (4), (6) pixel by pixel: (d + mu) * sigmoid(a), d = floor above T else exp(-p*); a
    constant map unless detach=False (adapt.weight_grad = "flowing")."""
    p_star = softmax(main_up).max(1).values
    d = torch.where(p_star > a.threshold, torch.full_like(p_star, a.floor), torch.exp(-p_star))
    w = d + a.mu
    if a_up is not None:
        w = w / (1.0 + torch.exp(-a_up[:, 0]))
    return w.detach() if detach else w


def kl_to_fused(aux_up: torch.Tensor, main_up: torch.Tensor) -> torch.Tensor:
    """MRNet's memory term: sum over both heads of KL(q || p_head), q = softmax(0.5 aux + main) fixed."""
    q = softmax(0.5 * aux_up + main_up).detach()
    total = 0.0
    for head in (aux_up, main_up):
        log_p = torch.log(softmax(head))
        total = total + (q * (torch.log(q) - log_p)).sum(1).mean()
    return total


def generate(g, x: torch.Tensor, arch: str):
    """G = C(F(x)) composed as the method says -> (aux logits, main logits, D_aux's input): the aux head
    on layer3, the main head on layer4 (DeepLab-v2) or on concat(layer4, layer3) (MRNet), D_aux on
    layer4. Composed here rather than by g's forward, so a forward that cut a path (e.g. features
    detached from the backbone) changes the engine's gradients and not the oracle's."""
    x3, x4 = g.features(x)
    aux = g.aux_head(x3)  # before the main head: the heads' dropout draws in the engine's order
    return aux, g.main_head(torch.cat((x4, x3), 1) if arch == "mrnet" else x4), x4


def oracle_losses(g, d, d_aux, src, tgt, cfg, step: int, state: dict):
    """-> (losses to compare with the engine's log, then the terms of G's, D's and D_aux's objectives).

    The discriminators' objectives stay split into their source and target terms: their gradients
    nearly cancel at a random D, and the larger term's gradient sets the float32 round-off scale."""
    a, adapt = cfg.adapt, cfg.adapt.mode == "adapt"
    aux_s, main_s, feat_s = generate(g, src["image"].double(), cfg.model.arch)
    class_w = None
    if a.class_balance:
        class_w, state["often"] = class_weights(src["label"], state.get("often", [1.0] * 19), a)
    seg = (ce(up(main_s), src["label"], class_w, a.hard_pixels)
           + a.lambda_seg * ce(up(aux_s), src["label"], class_w, a.hard_pixels))
    losses, g_obj, d_obj, daux_obj = {"seg": seg}, seg, None, None
    if not adapt:
        return losses, (g_obj,), d_obj, daux_obj
    aux_t, main_t, feat_t = generate(g, tgt["image"].double(), cfg.model.arch)
    if a.adversary == "mrnet":
        g_adv, d_obj = mrnet_adversary(d, up(aux_s), up(main_s), up(aux_t), up(main_t), a, losses)
        g_obj = g_obj + g_adv
        if a.memory:
            losses["mem"] = kl_to_fused(up(aux_t), up(main_t))
            if step >= a.memory_start:
                g_obj = g_obj + a.lambda_mem * losses["mem"]
        return losses, (g_obj,), d_obj, None
    use_aux = a.weighting in ("gen+dis", "gen+aux")  # D_aux and eq. 8's term train

    def d_aux_up(feat):  # the paper's D_aux on encodings upsampled to the image, literally
        return d_aux(up(feat)) if a.aux_at == "image" else up(d_aux(feat))

    a_t_up = d_aux_up(feat_t) if use_aux else None
    # CLAN's preheat: no weighting before adapt.preheat_iters.
    a_in_w = a_t_up if a.weighting == "gen+dis" else None  # gen+aux: w is GenMap's (eq. 4)
    w = None if a.weighting == "none" or step < a.preheat_iters else weights(up(main_t), a_in_w, a)

    def adv(z_up, y, w=w):
        per_pixel = bce(z_up[:, 0], y)
        return per_pixel.mean() if w is None else (w * per_pixel).mean()

    # Generator stage: fool D (target outputs labelled as source), and D_aux likewise; with
    # weight_grad "flowing" the generator also descends through w (CLAN).
    flowing = w is not None and a.weight_grad == "flowing"
    losses["adv"] = adv(up(d(softmax(up(main_t)))), 0.0,
                        weights(up(main_t), a_in_w, a, detach=False) if flowing else w)
    g_obj = g_obj + a.lambda_adv * losses["adv"]
    if use_aux:
        losses["adv_aux"] = bce(a_t_up, 0.0).mean()
        g_obj = g_obj + a.lambda_aux * losses["adv_aux"]
    if a.memory:
        losses["mem"] = kl_to_fused(up(aux_t), up(main_t))
        if step >= a.memory_start:
            g_obj = g_obj + a.lambda_mem * losses["mem"]
    # Discriminator stage: detached outputs, source labelled 0, target 1 (weighted for D).
    p_s, p_t = softmax(up(main_s)).detach(), softmax(up(main_t)).detach()
    # D's target term: w as eq. 9 writes it, no weights, or w / mean(w).
    w_d = {"weighted": w, "unweighted": None,
           "normalized": None if w is None else w / w.mean()}[a.d_target]
    d_obj = (bce(up(d(p_s)), 0.0).mean(), adv(up(d(p_t)), 1.0, w_d))
    losses["d"] = sum(d_obj)
    if use_aux:
        daux_obj = (bce(d_aux_up(feat_s.detach()), 0.0).mean(), bce(d_aux_up(feat_t.detach()), 1.0).mean())
        losses["d_aux"] = sum(daux_obj)
    return losses, (g_obj,), d_obj, daux_obj


def ms_scores(net, p: torch.Tensor) -> list[torch.Tensor]:
    """MsImageDis.forward: scale k's net sees the input average-pooled k times (3x3, stride 2, pad 1,
    the padding not counted in the mean)."""
    out = []
    for k, scale_net in enumerate(net.nets):
        if k:
            p = F.avg_pool2d(p, 3, stride=2, padding=1, count_include_pad=False)
        out.append(scale_net(p))
    return out


def mrnet_adversary(d, aux_s, main_s, aux_t, main_t, a, losses: dict):
    """MRNet's own adversary (trainer_ms.py gen_update / dis_update, MsImageDis calc_gen_loss /
    calc_dis_loss with lsgan), on image-size logits -> (G's adversarial objective, D's objective terms).

    G: lambda1 * sum_k 2 mean((D1_k(softmax(aux_t)) - 1)^2) + lambda2 * the same for D2 on softmax(main_t).
    D1 (D2): fake softmax(aux_t) (softmax(main_t)), real softmax(0.5 aux_s + main_s), each D called on
    fake and on real separately as calc_dis_loss does: sum_k mean(fake_k^2) + mean((real_k - 1)^2) +
    0.01 * mean_n sum_chw (d sum(real_k) / d real)^2."""
    gen = {name: sum(2.0 * ((z - 1.0) ** 2).mean() for z in ms_scores(net, softmax(x)))
           for name, net, x in (("adv_aux", d.d1, aux_t), ("adv", d.d2, main_t))}
    losses.update(gen)
    real = softmax(0.5 * aux_s + main_s).detach().requires_grad_()
    terms = {}
    for name, net, x in (("d_aux", d.d1, aux_t), ("d", d.d2, main_t)):
        terms[name] = []
        for fake, real_k in zip(ms_scores(net, softmax(x).detach()), ms_scores(net, real)):
            (grad,) = torch.autograd.grad(real_k.sum(), real, create_graph=True)
            terms[name] += [(fake ** 2).mean(), ((real_k - 1.0) ** 2).mean(),
                            0.01 * (grad ** 2).sum((1, 2, 3)).mean()]
        losses[name] = sum(terms[name])
    return a.lambda_mrnet_aux * gen["adv_aux"] + a.lambda_mrnet_main * gen["adv"], \
        tuple(terms["d_aux"] + terms["d"])


def poly(base: float, step: int, cfg) -> float:
    return base * (1.0 - step / (cfg.optim.poly_iters or cfg.train.iters)) ** cfg.optim.power


def lr_g(step: int, cfg) -> float:
    """G: linear from warmup_start * lr to lr over warmup_iters steps, then poly (not re-based)."""
    o = cfg.optim
    if step < o.warmup_iters:
        return o.lr * (o.warmup_start + (1.0 - o.warmup_start) * step / o.warmup_iters)
    return poly(o.lr, step, cfg)


class OracleSGD:
    """buf <- momentum * buf + (grad + wd * p), the first buf being the first such gradient;
    p <- p - lr * buf, or with Nesterov p <- p - lr * (grad + wd * p + momentum * buf)."""

    def __init__(self, cfg, head_params: set[int]):
        self.cfg, self.heads, self.buf = cfg, head_params, {}

    def step(self, params, grads, step: int) -> None:
        o = self.cfg.optim
        for p, g in zip(params, grads):
            mult = o.head_lr_mult if id(p) in self.heads else 1.0
            d_p = g + o.weight_decay * p
            self.buf[id(p)] = d_p if id(p) not in self.buf else o.momentum * self.buf[id(p)] + d_p
            direction = d_p + o.momentum * self.buf[id(p)] if o.nesterov else self.buf[id(p)]
            p.data -= lr_g(step, self.cfg) * mult * direction


class OracleAdam:
    """Adam without weight decay, bias-corrected, eps 1e-8 outside the square root."""

    def __init__(self, cfg):
        self.cfg, self.m, self.v, self.t = cfg, {}, {}, 0

    def step(self, params, grads, step: int) -> None:
        b1, b2 = self.cfg.optim.betas
        self.t += 1
        lr = poly(self.cfg.optim.lr_d, step, self.cfg)
        for p, g in zip(params, grads):
            self.m[id(p)] = (1 - b1) * g + b1 * self.m.get(id(p), torch.zeros_like(g))
            self.v[id(p)] = (1 - b2) * g * g + b2 * self.v.get(id(p), torch.zeros_like(g))
            m_hat = self.m[id(p)] / (1 - b1 ** self.t)
            v_hat = self.v[id(p)] / (1 - b2 ** self.t)
            p.data -= lr * m_hat / (v_hat.sqrt() + 1e-8)


def _grads(terms, params):
    """-> (gradient of the sum of `terms`, per tensor the largest |gradient| of any single term; a
    term that does not reach a tensor counts 0 there)."""
    if terms is None:
        return None, None
    total = torch.autograd.grad(sum(terms), params, retain_graph=True)
    per_term = [torch.autograd.grad(t, params, retain_graph=True, allow_unused=True) for t in terms]
    scale = [max(0.0 if g[i] is None else g[i].abs().max().item() for g in per_term)
             for i in range(len(params))]
    return total, scale


def run_oracle(snapshots, cfg, batches):
    """The oracle's iterations in float64 -> per step (losses, {net: (gradients, scales)}, nets after).

    Step k starts from the engine's parameters before step k (snapshots[k]), with the oracle's own
    optimizer state carried over: each step is checked on its own, so Adam's amplification of float32
    round-off in one step (below) cannot drift into the next step's losses.
    """
    g, d, d_aux = (copy.deepcopy(m).double() for m in snapshots[0])
    g.train()
    heads = {id(p) for m in (g.aux_head, g.main_head) for p in m.parameters()}
    g_params = [p for p in g.parameters() if p.requires_grad]
    sgd, adam_d, adam_aux = OracleSGD(cfg, heads), OracleAdam(cfg), OracleAdam(cfg)
    history, state = [], {}
    for step, (src, tgt), start in zip(STEPS, batches, snapshots):
        with torch.no_grad():
            for mine, theirs in zip((g, d, d_aux), start):
                for p, q in zip(mine.parameters(), theirs.parameters()):
                    p.copy_(q)
        torch.manual_seed(step)  # the engine's dropout masks (a mask does not depend on the dtype)
        losses, g_obj, d_obj, daux_obj = oracle_losses(g, d, d_aux, src, tgt, cfg, step, state)
        # Each network's gradient is taken from its own objective only: D and D_aux get nothing from
        # the generator stage (frozen there), G nothing from the discriminator stage (detached inputs).
        grads = {"g": _grads(g_obj, g_params), "d": _grads(d_obj, list(d.parameters())),
                 "d_aux": _grads(daux_obj, list(d_aux.parameters()))}
        sgd.step(g_params, grads["g"][0], step)
        if grads["d"][0] is not None:
            adam_d.step(list(d.parameters()), grads["d"][0], step)
        if grads["d_aux"][0] is not None:
            adam_aux.step(list(d_aux.parameters()), grads["d_aux"][0], step)
        after = tuple(copy.deepcopy(m) for m in (g, d, d_aux))
        history.append(({k: v.item() for k, v in losses.items()},
                        {k: v for k, v in grads.items() if v[0] is not None}, after))
    return history


def run_engine(cfg, batches):
    """The engine's iterations -> (snapshots of the networks before each step and after the last,
    per step (logged losses, {net: gradients}))."""
    eng = engine.build(cfg, CPU)
    adapter, nets = eng.adapter, eng.nets
    snapshots, history = [tuple(copy.deepcopy(m) for m in nets)], []
    for step, (src, tgt) in zip(STEPS, batches):
        torch.manual_seed(step)  # the oracle draws MRNet's dropout masks from the same stream
        losses, stepped = run_step(adapter, step, src, tgt if cfg.adapt.mode == "adapt" else None)
        assert stepped
        grads = {name: [p.grad.clone() for p in net.parameters() if p.requires_grad and p.grad is not None]
                 for name, net in zip(("g", "d", "d_aux"), nets)}
        history.append((losses, {k: v for k, v in grads.items() if v}))
        snapshots.append(tuple(copy.deepcopy(m) for m in nets))
    return snapshots, history


def _close(what: str, got: torch.Tensor, want: torch.Tensor, mask=None, scale: float | None = None) -> None:
    """Agreement to 1e-3 of `scale` (default: the largest oracle value): float32 engine vs float64
    oracle (measured worst case about 1e-4 of it)."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item() if scale is None else scale
    err = (got - want).abs()
    err = err if mask is None else err[mask]
    err = err.max().item() if err.numel() else 0.0
    assert err <= TOL * scale + 1e-12, f"{what}: differs from the oracle by {err:.3g} (largest {scale:.3g})"


def _assert_same_update(what, name, before, engine, oracle, grads: list[list[torch.Tensor]]):
    """One step's parameter change. SGD's is linear in the gradients: compared everywhere. Adam
    divides by sqrt(v): an element whose gradient is ~0 gets a step of about +-lr from float32
    round-off alone, so D's and D_aux's changes are compared where every step's gradient so far is at
    least 5% of its tensor's largest (the gradients themselves are compared everywhere)."""
    for i, ((key, p0), p1, p2) in enumerate(zip(before.named_parameters(), engine.parameters(),
                                                oracle.parameters())):
        mask = None
        if name != "g":
            mask = torch.stack([step[i].abs() >= 0.05 * step[i].abs().max() for step in grads]).all(0)
        _close(f"{what} {name}.{key} update", p1 - p0.double(), p2 - p0.double(), mask)


CASES = {  # id: (mode, weighting, memory, nesterov, aux_at, MRNet recipe, generator, backbone BN)
    "none": ("adapt", "none", False, False, "image", False, "deeplabv2", "frozen"),
    "gen": ("adapt", "gen", False, False, "image", False, "deeplabv2", "frozen"),
    "gen+dis": ("adapt", "gen+dis", False, False, "image", False, "deeplabv2", "frozen"),
    "gen+dis-feature-size-d_aux": ("adapt", "gen+dis", False, False, "feature", False, "deeplabv2", "frozen"),
    "gen-memory": ("adapt", "gen", True, False, "image", False, "deeplabv2", "frozen"),
    "paper-mrnet-recipe": ("adapt", "gen+dis", True, True, "image", True, "deeplabv2", "frozen"),
    "source-only-recipe": ("source_only", "gen+dis", False, True, "image", True, "deeplabv2", "frozen"),
    # The paper's generator: every term's gradient reaches the backbone through MRNet's heads and
    # layer4, dropout included. Frozen BN: with batch statistics ("stats") float32 round-off alone
    # moves the second step's backbone gradient by up to 7e-3 of its largest value.
    "mrnet-gen+dis-memory": ("adapt", "gen+dis", True, False, "image", False, "mrnet", "frozen"),
    "mrnet-paper-recipe": ("adapt", "gen+dis", True, True, "image", True, "mrnet", "frozen"),
    # The switches the paper leaves open: D's target term, CLAN's preheat (STEPS = (3, 4): the first
    # unweighted, the second weighted), and the generator's gradient through w (CLAN).
    "gen+dis-d-unweighted": ("adapt", "gen+dis", False, False, "image", False, "deeplabv2", "frozen",
                             {"adapt.d_target": "unweighted"}),
    "gen+dis-d-normalized": ("adapt", "gen+dis", False, False, "image", False, "deeplabv2", "frozen",
                             {"adapt.d_target": "normalized"}),
    "gen-preheat": ("adapt", "gen", False, False, "image", False, "deeplabv2", "frozen",
                    {"adapt.preheat_iters": 4}),
    "gen+dis-weight-grad-flowing": ("adapt", "gen+dis", False, False, "image", False, "deeplabv2", "frozen",
                                    {"adapt.weight_grad": "flowing"}),
    # D_aux and its feature-level term without DisMap in w (the ablation's row that separates them).
    "gen+aux": ("adapt", "gen+aux", False, False, "image", False, "deeplabv2", "frozen"),
    "gen+aux-weight-grad-flowing": ("adapt", "gen+aux", False, False, "image", False, "deeplabv2", "frozen",
                                    {"adapt.weight_grad": "flowing"}),
    # MRNet as published: its own LSGAN D1 (aux head) and D2 (main head), gradient penalty, memory on,
    # on MRNet's generator (the oracle's own multi-scale pass and losses: mrnet_adversary).
    "mrnet-adversary": ("adapt", "none", True, False, "image", False, "mrnet", "frozen",
                        {"adapt.adversary": "mrnet", **MRNET_LAMBDAS}),
}


@pytest.mark.parametrize("case", CASES)
def test_two_iterations_match_the_oracle(case, one_thread):
    mode, weighting, memory, nesterov, aux_at, recipe, arch, bn, *extra = CASES[case]
    cfg = _cfg(weighting, memory, mode, bn=bn, nesterov=nesterov, aux_at=aux_at, recipe=recipe, arch=arch,
               **(extra[0] if extra else {}))
    batches = _batches()
    snapshots, engine_log = run_engine(cfg, batches)
    oracle_log = run_oracle(snapshots, cfg, batches)
    names = ("g", "d", "d_aux")
    for step, ((got, got_grads), (want, want_grads, after)) in enumerate(zip(engine_log, oracle_log)):
        assert set(got) == set(want), f"step {step}: logged terms {sorted(got)} != {sorted(want)}"
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), f"step {step} loss {k}"
        assert set(got_grads) == set(want_grads), f"step {step}: networks with gradients"
        for name, (grads, scales) in want_grads.items():
            for i, (a, b, sc) in enumerate(zip(got_grads[name], grads, scales)):
                _close(f"step {step} {name} gradient #{i}", a, b, scale=sc)
            k = names.index(name)
            history = [entry[1][name][0] for entry in oracle_log[:step + 1]]
            _assert_same_update(f"step {step}", name, snapshots[step][k], snapshots[step + 1][k], after[k],
                                history)
    untouched = (["d", "d_aux"] if mode == "source_only" else [] if weighting in ("gen+dis", "gen+aux")
                 else ["d_aux"])
    for name in untouched:  # networks that must not move
        k = names.index(name)
        first, last = snapshots[0][k].parameters(), snapshots[-1][k].parameters()
        assert all(torch.equal(a, b) for a, b in zip(first, last))


def test_oracle_sees_each_term(one_thread):
    """The oracle's check is sharp: with any one lambda changed by 10%, G's update moves by
    several times the tolerance (so a dropped or misplaced lambda in the engine cannot hide in it)."""
    batches = _batches(blocks=False)
    base = _cfg("gen+dis", True)  # without the recipe: its class weights make the CE gradient dominate
    snapshots, _ = run_engine(base, batches)
    g_ref = run_oracle(snapshots, base, batches)[1][2][0]
    for key, value in LAMBDAS.items():
        cfg = _cfg("gen+dis", True)
        setattr(cfg.adapt, key.split(".")[1], value * 1.1)
        g_alt = run_oracle(snapshots, cfg, batches)[1][2][0]
        worst = max(((a - b).abs().max() / max((a - p0.double()).abs().max(), 1e-30)).item()
                    for a, b, p0 in zip(g_ref.parameters(), g_alt.parameters(), snapshots[1][0].parameters()))
        assert worst > 5 * TOL, f"{key} +10% moves G's update by only {worst:.2g} of its size"


def test_learning_rate_schedule_by_hand():
    cfg = _cfg("gen+dis", False)
    adapter = engine.build(cfg, CPU).adapter
    g = adapter.nets.g
    for step, base in ((0, 0.05 * 0.3), (2, 0.05 * (0.3 + 0.7 * 2 / 4)), (3, 0.05 * (0.3 + 0.7 * 3 / 4)),
                       (4, 0.05 * (1 - 4 / 10) ** 0.7), (9, 0.05 * (1 - 9 / 10) ** 0.7)):
        adapter.set_lr(step)
        assert [grp["lr"] for grp in adapter.opt.g.param_groups] == pytest.approx([base, 3 * base])
        assert adapter.opt.d.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - step / 10) ** 0.7)
        assert adapter.opt.d_aux.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - step / 10) ** 0.7)
    # CLAN's preheat ramps D and D_aux with G (optim.warmup_d), from 0 here.
    clan = engine.build(_cfg("gen+dis", False, **{"optim.warmup_d": True, "optim.warmup_start": 0.0}), CPU)
    for step, factor in ((0, 0.0), (2, 2 / 4), (4, (1 - 4 / 10) ** 0.7)):
        clan.adapter.set_lr(step)
        assert clan.adapter.opt.g.param_groups[0]["lr"] == pytest.approx(0.05 * factor)
        assert clan.adapter.opt.d.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
        assert clan.adapter.opt.d_aux.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
    heads = {id(p) for m in (g.aux_head, g.main_head) for p in m.parameters()}
    assert {id(p) for p in adapter.opt.g.param_groups[1]["params"]} == heads
    assert not heads & {id(p) for p in adapter.opt.g.param_groups[0]["params"]}


def test_non_finite_gradient_with_finite_losses_skips_every_optimizer():
    """The finite check covers gradients too: a NaN that appears only in backward skips the step."""
    cfg = _cfg("gen+dis", False)
    batches = _batches()
    adapter = engine.build(cfg, CPU).adapter
    g, d, d_aux = adapter.nets
    before = [p.detach().clone() for m in (g, d, d_aux) for p in m.parameters()]
    g.main_head.conv2d_list[0].weight.register_hook(lambda grad: grad * math.nan)
    losses, stepped = run_step(adapter, STEPS[0], *batches[0])
    assert all(math.isfinite(v) for v in losses.values())
    assert not stepped
    after = [p.detach() for m in (g, d, d_aux) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
