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

import pytest
import torch
import torch.nn.functional as F

from pwda_fast import config, distributed, train
from pwda_fast.adapt import Adapter, Nets
from pwda_fast.models import build_networks

CPU = torch.device("cpu")
N, H, W = 2, 49, 67  # odd sizes: heads 8x10 (stride-8 backbone), D map 1x2
STEPS = (3, 4)  # two consecutive iterations, not the first: the poly schedule is already below 1
# A random D's adversarial gradient is ~1e-3 of the CE gradient: lambda_adv and lambda_aux are large
# here so that each term carries a visible share of G's update (test_oracle_sees_each_term).
LAMBDAS = {"adapt.lambda_adv": 30.0, "adapt.lambda_aux": 20.0, "adapt.lambda_seg": 0.4,
           "adapt.lambda_mem": 0.25}


def _cfg(weighting: str, memory: bool, mode: str = "adapt", bn: str = "frozen") -> config.Config:
    return config.load("toy", {
        "model.depth": 14, "model.width": 8, "model.bn": bn, "model.disc_width": 4,
        "model.aux_disc_width": 8,
        "adapt.mode": mode, "adapt.weighting": weighting, "adapt.memory": memory,
        # a threshold the random logits straddle, so both branches of eq. (3) are taken
        "adapt.threshold": 0.12, "adapt.floor": 0.03, "adapt.mu": 0.2, **LAMBDAS,
        "optim.lr": 0.05, "optim.lr_d": 0.02, "optim.head_lr_mult": 3.0, "optim.momentum": 0.8,
        "optim.weight_decay": 0.01, "optim.power": 0.7, "optim.betas": [0.5, 0.9], "optim.impl": "torch",
        "train.iters": 10, "kernels.backend": "torch"})


def _batches():
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in STEPS:
        labels = torch.randint(0, 19, (N, H, W), generator=gen)
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


def ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over non-void pixels of -log softmax(logits)[label]."""
    e = torch.exp(logits - logits.max(1, keepdim=True).values)
    p = e / e.sum(1, keepdim=True)
    valid = labels != 255
    picked = torch.gather(p, 1, labels.clamp_max(18).unsqueeze(1))[:, 0]
    return -torch.log(picked[valid]).sum() / valid.sum()


def softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def weights(main_up: torch.Tensor, a_up: torch.Tensor | None, a) -> torch.Tensor:
    """Eqs. (3), (4), (6) pixel by pixel: (d + mu) * sigmoid(a), d = floor above T else exp(-p*)."""
    p_star = softmax(main_up).max(1).values
    d = torch.where(p_star > a.threshold, torch.full_like(p_star, a.floor), torch.exp(-p_star))
    w = d + a.mu
    if a_up is not None:
        w = w / (1.0 + torch.exp(-a_up[:, 0]))
    return w.detach()


def kl_to_fused(aux_up: torch.Tensor, main_up: torch.Tensor) -> torch.Tensor:
    """MRNet's memory term: sum over both heads of KL(q || p_head), q = softmax(0.5 aux + main) fixed."""
    q = softmax(0.5 * aux_up + main_up).detach()
    total = 0.0
    for head in (aux_up, main_up):
        log_p = torch.log(softmax(head))
        total = total + (q * (torch.log(q) - log_p)).sum(1).mean()
    return total


def oracle_losses(g, d, d_aux, src, tgt, cfg):
    """-> (losses to compare with the engine's log, G's objective, D's objective, D_aux's objective)."""
    a, adapt = cfg.adapt, cfg.adapt.mode == "adapt"
    aux_s, main_s, feat_s = g(src["image"].double())
    seg = ce(up(main_s), src["label"]) + a.lambda_seg * ce(up(aux_s), src["label"])
    losses, g_obj, d_obj, daux_obj = {"seg": seg}, seg, None, None
    if not adapt:
        return losses, g_obj, d_obj, daux_obj
    aux_t, main_t, feat_t = g(tgt["image"].double())
    use_aux = a.weighting == "gen+dis"
    a_t_up = up(d_aux(feat_t)) if use_aux else None
    w = None if a.weighting == "none" else weights(up(main_t), a_t_up, a)

    def adv(z_up, y):
        per_pixel = bce(z_up[:, 0], y)
        return per_pixel.mean() if w is None else (w * per_pixel).mean()

    # Generator stage: fool D (target outputs labelled as source), and D_aux likewise.
    losses["adv"] = adv(up(d(softmax(up(main_t)))), 0.0)
    g_obj = g_obj + a.lambda_adv * losses["adv"]
    if use_aux:
        losses["adv_aux"] = bce(a_t_up, 0.0).mean()
        g_obj = g_obj + a.lambda_aux * losses["adv_aux"]
    if a.memory:
        losses["mem"] = kl_to_fused(up(aux_t), up(main_t))
        g_obj = g_obj + a.lambda_mem * losses["mem"]
    # Discriminator stage: detached outputs, source labelled 0, target 1 (weighted for D).
    p_s, p_t = softmax(up(main_s)).detach(), softmax(up(main_t)).detach()
    d_obj = bce(up(d(p_s)), 0.0).mean() + adv(up(d(p_t)), 1.0)
    losses["d"] = d_obj
    if use_aux:
        daux_obj = bce(up(d_aux(feat_s.detach())), 0.0).mean() + bce(up(d_aux(feat_t.detach())), 1.0).mean()
        losses["d_aux"] = daux_obj
    return losses, g_obj, d_obj, daux_obj


def poly(base: float, step: int, cfg) -> float:
    return base * (1.0 - step / cfg.train.iters) ** cfg.optim.power


class OracleSGD:
    """p <- p - lr * buf, buf <- momentum * buf + (grad + wd * p); the first buf is the first gradient."""

    def __init__(self, cfg, head_params: set[int]):
        self.cfg, self.heads, self.buf = cfg, head_params, {}

    def step(self, params, grads, step: int) -> None:
        o = self.cfg.optim
        for p, g in zip(params, grads):
            mult = o.head_lr_mult if id(p) in self.heads else 1.0
            d_p = g + o.weight_decay * p
            self.buf[id(p)] = d_p if id(p) not in self.buf else o.momentum * self.buf[id(p)] + d_p
            p.data -= poly(o.lr, step, self.cfg) * mult * self.buf[id(p)]


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


def _grads(objective, params):
    if objective is None:
        return None
    return torch.autograd.grad(objective, params, allow_unused=True)


def run_oracle(nets, cfg, batches):
    """Float64 copies of (g, d, d_aux) stepped twice by the oracle -> (copies, per-step losses)."""
    g, d, d_aux = (copy.deepcopy(m).double() for m in nets)
    g.train()
    heads = {id(p) for m in (g.aux_head, g.main_head) for p in m.parameters()}
    g_params = [p for p in g.parameters() if p.requires_grad]
    sgd, adam_d, adam_aux = OracleSGD(cfg, heads), OracleAdam(cfg), OracleAdam(cfg)
    history = []
    for step, (src, tgt) in zip(STEPS, batches):
        losses, g_obj, d_obj, daux_obj = oracle_losses(g, d, d_aux, src, tgt, cfg)
        # Each network's gradient is taken from its own objective only: D and D_aux get nothing from
        # the generator stage (frozen there), G nothing from the discriminator stage (detached inputs).
        g_grads = _grads(g_obj, g_params)
        d_grads = _grads(d_obj, list(d.parameters()))
        daux_grads = _grads(daux_obj, list(d_aux.parameters()))
        sgd.step(g_params, g_grads, step)
        if d_grads is not None:
            adam_d.step(list(d.parameters()), d_grads, step)
        if daux_grads is not None:
            adam_aux.step(list(d_aux.parameters()), daux_grads, step)
        grads = {name: list(gr) for name, gr in (("g", g_grads), ("d", d_grads), ("d_aux", daux_grads))
                 if gr is not None}
        history.append(({k: v.item() for k, v in losses.items()}, grads))
    return (g, d, d_aux), history


def run_engine(cfg, batches):
    torch.manual_seed(0)
    g, d, d_aux = build_networks(cfg.model)
    for net in (g, d, d_aux):
        net.train()
    before = tuple(copy.deepcopy(m) for m in (g, d, d_aux))
    opts = train.build_optimizers(cfg, g, d, d_aux, CPU)
    adapter = Adapter(cfg, Nets(g, d, d_aux), *opts, "torch", CPU, distributed.Dist())
    history = []
    for step, (src, tgt) in zip(STEPS, batches):
        losses, stepped = adapter.step(step, src, tgt if cfg.adapt.mode == "adapt" else None)
        assert stepped
        grads = {name: [None if p.grad is None else p.grad.clone() for p in net.parameters() if p.requires_grad]
                 for name, net in (("g", g), ("d", d), ("d_aux", d_aux))}
        history.append((losses, {k: v for k, v in grads.items() if any(x is not None for x in v)}))
    return before, (g, d, d_aux), history


def _close(what: str, got: torch.Tensor, want: torch.Tensor, mask=None) -> None:
    """Agreement to 1e-3 of the largest oracle value: float32 engine vs float64 oracle, where D's
    gradient is a difference of a source and a target term of similar size (measured: 1.04e-4)."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().item()
    err = (got - want).abs()
    err = (err if mask is None else err[mask]).max().item() if err.numel() else 0.0
    assert err <= 1e-3 * scale + 1e-12, f"{what}: differs from the oracle by {err:.3g} (largest {scale:.3g})"


def _assert_same_update(name, before, engine, oracle, grads: list[list[torch.Tensor]]):
    """Parameter change after both steps. SGD's is linear in the gradients: compared everywhere.
    Adam divides by sqrt(v): an element whose gradient is ~0 gets a step of about +-lr from float32
    round-off alone, so D's and D_aux's changes are compared where every step's gradient is at least
    5% of its tensor's largest (the gradients themselves are compared everywhere, per step)."""
    for i, ((key, p0), p1, p2) in enumerate(zip(before.named_parameters(), engine.parameters(),
                                                oracle.parameters())):
        mask = None
        if name != "g":
            mask = torch.stack([step[i].abs() >= 0.05 * step[i].abs().max() for step in grads]).all(0)
        _close(f"{name}.{key} update", p1 - p0.double(), p2 - p0.double(), mask)


CASES = [("adapt", "none", False), ("adapt", "gen", False), ("adapt", "gen+dis", False),
         ("adapt", "gen+dis", True), ("adapt", "gen", True), ("source_only", "gen+dis", False)]


@pytest.mark.parametrize("mode,weighting,memory", CASES)
def test_two_iterations_match_the_oracle(mode, weighting, memory):
    torch.set_num_threads(1)
    cfg = _cfg(weighting, memory, mode)
    batches = _batches()
    before, engine, engine_log = run_engine(cfg, batches)
    oracle, oracle_log = run_oracle(before, cfg, batches)
    for step, ((got, got_grads), (want, want_grads)) in enumerate(zip(engine_log, oracle_log)):
        assert set(got) == set(want), f"step {step}: logged terms {sorted(got)} != {sorted(want)}"
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), f"step {step} loss {k}"
        assert set(got_grads) == set(want_grads), f"step {step}: networks with gradients"
        for name in want_grads:
            for i, (a, b) in enumerate(zip(got_grads[name], want_grads[name])):
                _close(f"step {step} {name} gradient #{i}", a, b)
    for name, b, e, o in zip(("g", "d", "d_aux"), before, engine, oracle):
        if name in oracle_log[-1][1]:
            _assert_same_update(name, b, e, o, [entry[1][name] for entry in oracle_log])
    if mode == "source_only" or weighting != "gen+dis":  # networks that must not move
        untouched = (["d", "d_aux"] if mode == "source_only" else ["d_aux"])
        for name in untouched:
            i = ("g", "d", "d_aux").index(name)
            assert all(torch.equal(a, b) for a, b in zip(before[i].parameters(), engine[i].parameters()))


def test_oracle_sees_each_term():
    """The oracle's check is sharp: with any one lambda changed by 10%, some update moves beyond the
    tolerance (so a dropped or misplaced lambda in the engine cannot hide inside it)."""
    torch.set_num_threads(1)
    batches = _batches()
    base = _cfg("gen+dis", True)
    before, _, _ = run_engine(base, batches)
    (g_ref, _, _), _ = run_oracle(before, base, batches)
    for key, value in LAMBDAS.items():
        cfg = _cfg("gen+dis", True)
        setattr(cfg.adapt, key.split(".")[1], value * 1.1)
        (g_alt, _, _), _ = run_oracle(before, cfg, batches)
        worst = max(((a - b).abs().max() / max((a - p0.double()).abs().max(), 1e-30)).item()
                    for a, b, p0 in zip(g_ref.parameters(), g_alt.parameters(), before[0].parameters()))
        assert worst > 1e-2, f"{key} +10% moves G's update by only {worst:.2g} of its size"


def test_learning_rate_schedule_by_hand():
    cfg = _cfg("gen+dis", False)
    g, d, d_aux = build_networks(cfg.model)
    opts = train.build_optimizers(cfg, g, d, d_aux, CPU)
    adapter = Adapter(cfg, Nets(g, d, d_aux), *opts, "torch", CPU, distributed.Dist())
    for step in (0, 3, 9):
        adapter.set_lr(step)
        base = 0.05 * (1 - step / 10) ** 0.7
        assert [grp["lr"] for grp in adapter.opt_g.param_groups] == pytest.approx([base, 3 * base])
        assert adapter.opt_d.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - step / 10) ** 0.7)
        assert adapter.opt_d_aux.param_groups[0]["lr"] == pytest.approx(0.02 * (1 - step / 10) ** 0.7)
    heads = {id(p) for m in (g.aux_head, g.main_head) for p in m.parameters()}
    assert {id(p) for p in adapter.opt_g.param_groups[1]["params"]} == heads
    assert not heads & {id(p) for p in adapter.opt_g.param_groups[0]["params"]}


def test_non_finite_gradient_with_finite_losses_skips_every_optimizer():
    """The finite check covers gradients too: a NaN that appears only in backward skips the step."""
    cfg = _cfg("gen+dis", False)
    batches = _batches()
    torch.manual_seed(0)
    g, d, d_aux = build_networks(cfg.model)
    opts = train.build_optimizers(cfg, g, d, d_aux, CPU)
    adapter = Adapter(cfg, Nets(g, d, d_aux), *opts, "torch", CPU, distributed.Dist())
    before = [p.detach().clone() for m in (g, d, d_aux) for p in m.parameters()]
    g.main_head.conv2d_list[0].weight.register_hook(lambda grad: grad * math.nan)
    losses, stepped = adapter.step(STEPS[0], *batches[0])
    assert all(math.isfinite(v) for v in losses.values())
    assert not stepped
    after = [p.detach() for m in (g, d, d_aux) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
