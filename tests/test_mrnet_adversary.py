"""MRNet's own adversary (adapt.adversary = "mrnet"): the network, its losses and a few training steps.

The twin below is written from layumi/Seg-Uncertainty model/ms_discriminator.py (MsImageDis with the
defaults its __init__ hard-codes, Conv2dBlock's zero padding of 1, ResBlock) and trainer_ms.py
(gen_update / dis_update): a function over the state_dict that calls D on the fake and on the real
input separately, as calc_dis_loss does (the engine sends them through D as one batch), with its
own pooling, LSGAN terms and gradient penalty, in float64. tests/test_oracle.py ("mrnet-adversary")
checks whole iterations with it.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import as_argv, assert_same_networks, assert_same_optimizers, tiny_overrides, training_lines

from pwda_fast import checkpoint, config, engine, reference, train
from pwda_fast.models import MRNetDiscriminators, MultiScaleDiscriminator

K = 19


def twin_scores(sd: dict, p: torch.Tensor, prefix: str = "") -> list[torch.Tensor]:
    """MsImageDis.forward over a state_dict: per scale (the input 3x3-average-pooled, padding not
    counted, once more for each) five 3x3 zero-padded convs with LeakyReLU 0.2 (strides 2, 1, 2, 1, 2),
    four residual blocks x + conv(lrelu(conv(x))), a 1x1 conv to one channel."""
    out = []
    for k in range(3):
        if k:
            p = F.avg_pool2d(p, 3, stride=2, padding=1, count_include_pad=False)

        def conv(x, name, stride=1, pad=1, k=k):
            return F.conv2d(x, sd[f"{prefix}nets.{k}.{name}.weight"], sd[f"{prefix}nets.{k}.{name}.bias"],
                            stride, pad)

        x = p
        for j, stride in enumerate((2, 1, 2, 1, 2)):
            x = F.leaky_relu(conv(x, f"{j}.0", stride), 0.2)
        for r in range(5, 9):
            x = x + conv(F.leaky_relu(conv(x, f"{r}.body.0.0"), 0.2), f"{r}.body.1")
        out.append(conv(x, "9", pad=0))
    return out


def twin_gen_loss(sd, probs, prefix):
    """calc_gen_loss, lsgan: sum over scales of 2 * mean((D(fake) - 1)^2)."""
    return sum(2 * ((z - 1) ** 2).mean() for z in twin_scores(sd, probs, prefix))


def twin_dis_loss(sd, fake, real, prefix):
    """calc_dis_loss, lsgan: D on fake, then D on real (a leaf with requires_grad), per scale
    mean(fake^2) + mean((real - 1)^2) + 0.01 * compute_grad2(real_k, real).mean()."""
    loss = 0.0
    for f, r in zip(twin_scores(sd, fake, prefix), twin_scores(sd, real, prefix)):
        (grad,) = torch.autograd.grad(r.sum(), real, create_graph=True)
        penalty = grad.pow(2).view(len(real), -1).sum(1).mean()
        loss = loss + (f ** 2).mean() + ((r - 1) ** 2).mean() + 0.01 * penalty
    return loss


def _double_state(net) -> dict:
    return {k: v.detach().double().requires_grad_() for k, v in net.state_dict().items()}


def test_network_matches_the_twin_sizes_parameters_and_init():
    torch.manual_seed(0)
    d = MultiScaleDiscriminator(K)
    # per scale: 19->32, 3 x 32->32, 32->64 (3x3, bias), 8 convs 64->64 in the residual blocks, 64->1
    per_scale = (K * 32 * 9 + 32) + 3 * (32 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + 8 * (64 * 64 * 9 + 64) + 65
    assert sum(p.numel() for p in d.parameters()) == 3 * per_scale == 1_041_699
    weights = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, torch.nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)  # weights_init('gaussian')
    assert all(not m.bias.any() for m in d.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():  # make the biases count in the comparison
        for m in d.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.bias.normal_(0, 0.05)
    d = d.double()
    p = torch.softmax(torch.randn(2, K, 45, 67, dtype=torch.float64), 1)  # odd sizes: ceil, uneven pooling
    got, want = d(p), twin_scores(d.state_dict(), p)
    assert [tuple(z.shape) for z in got] == [(2, 1, 6, 9), (2, 1, 3, 5), (2, 1, 2, 3)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert [tuple(z.shape[2:]) for z in MultiScaleDiscriminator(K)(torch.zeros(1, K, 512, 1024))] == \
        [(64, 128), (32, 64), (16, 32)]


def test_generator_loss_and_its_gradient_into_the_logits_match_the_twin():
    torch.manual_seed(1)
    d = MRNetDiscriminators(K).double()
    sd = _double_state(d)
    for head, prefix in (("aux", "d1."), ("main", "d2.")):
        logits = (3 * torch.randn(2, K, 33, 41, dtype=torch.float64)).requires_grad_()
        maps = d(torch.softmax(logits, 1), torch.softmax(logits, 1))[0 if head == "aux" else 1]
        got = reference.lsgan_gen_loss(maps)
        want = twin_gen_loss(sd, torch.softmax(logits, 1), prefix)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)  # reference computes in float32
        g_got, = torch.autograd.grad(got, logits)
        g_want, = torch.autograd.grad(want, logits)
        assert g_want.abs().max() > 0
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-5 * g_want.abs().max().item())


def _mrnet_cfg(**extra) -> config.Config:
    # MRNet's own D geometry (the twin's), not the toy preset's scaled one.
    return config.load("toy", {"adapt.adversary": "mrnet", "adapt.weighting": "none", "model.depth": 14,
                               "model.width": 8, "model.head_width": 32, "model.bn": "frozen",
                               "model.ms_disc_stride": 8, "model.ms_disc_width": 32,
                               "kernels.loss": "torch", "train.iters": 10, **extra})


def test_discriminator_stage_losses_and_gradients_match_the_twin():
    """The engine's stage 3 (fake and real as one batch through each D) against the twin's separate
    calls: both LSGAN losses with their penalties, and every gradient of D1 and D2."""
    torch.manual_seed(2)
    adapter = engine.build(_mrnet_cfg(), torch.device("cpu")).adapter
    d = adapter.nets.d
    with torch.no_grad():  # a D away from its init, so that no term is negligible
        for p in d.parameters():
            p.add_(0.05 * torch.randn_like(p))
    logits = {k: 3 * torch.randn(2, K, 37, 53) for k in ("aux_s", "main_s", "aux_t", "main_t")}
    losses = {}
    adapter.discriminator_stage({"main": logits["main_s"], "aux": logits["aux_s"], "feat": None},
                                {"main": logits["main_t"], "aux": logits["aux_t"], "feat": None}, losses)
    sd = _double_state(d)
    real = torch.softmax(0.5 * logits["aux_s"].double() + logits["main_s"].double(), 1).requires_grad_()
    want = {"d_aux": twin_dis_loss(sd, torch.softmax(logits["aux_t"].double(), 1), real, "d1."),
            "d": twin_dis_loss(sd, torch.softmax(logits["main_t"].double(), 1), real, "d2.")}
    assert set(losses) == {"d", "d_aux"}
    for k, v in want.items():
        assert losses[k].item() == pytest.approx(v.item(), rel=1e-5)
    grads = torch.autograd.grad(want["d"] + want["d_aux"], list(sd.values()))
    for (name, p), g in zip(d.named_parameters(), grads):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-3, atol=1e-4 * g.abs().max().item() + 1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_generator_stage_leaves_no_gradient_on_the_discriminators():
    torch.manual_seed(3)
    adapter = engine.build(_mrnet_cfg(), torch.device("cpu")).adapter
    src = {"image": torch.randn(2, 3, 48, 96), "label": torch.randint(0, K, (2, 48, 96))}
    tgt = {"image": torch.randn(2, 3, 48, 96)}
    losses = {}
    src_out = adapter.segmenter_stage(src, losses)
    tgt_out = adapter.generator_stage(tgt, losses)
    nets = adapter.nets
    assert all(p.grad is None for net in (nets.d, nets.d_aux) for p in net.parameters())
    assert all(p.requires_grad for p in nets.d.parameters())
    g_grads = [p.grad.clone() for p in nets.g.parameters() if p.grad is not None]
    adapter.discriminator_stage(src_out, tgt_out, losses)
    assert all(p.grad is not None for p in nets.d.parameters())
    assert all(p.grad is None for p in nets.d_aux.parameters())  # D_aux is not MRNet's
    assert all(torch.equal(a, p.grad) for a, p in zip(g_grads, (p for p in nets.g.parameters()
                                                                if p.grad is not None)))
    assert set(losses) == {"seg", "adv", "adv_aux", "mem", "d", "d_aux"}


def test_mrnet_adversary_needs_weighting_none():
    with pytest.raises(config.ConfigError, match="adapt.weighting = 'none'"):
        config.load("toy", {"adapt.adversary": "mrnet"})
    assert config.load("toy", {"adapt.adversary": "mrnet", "adapt.mode": "source_only"})


def test_toy_steps_train_d1_d2_and_resume_bit_for_bit(tmp_path):
    """A few toy steps: finite losses, D1 and D2 move away from their init, the checkpoint holds them
    and their Adam state, evaluation loads them back, and a stopped run resumes bit for bit."""
    common = {"adapt.adversary": "mrnet", "adapt.weighting": "none", "train.iters": 4,
              "train.ckpt_every": 100, "train.eval_images": 1, "model.width": 8, "model.head_width": 16}
    assert train.main(as_argv(tiny_overrides(tmp_path / "full", **common))) == 0
    assert train.main(as_argv(tiny_overrides(tmp_path / "split", **common, **{"train.stop_at": 2}))) == 0
    assert train.main(as_argv(tiny_overrides(tmp_path / "split", **common))) == 0
    a = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["step"] == b["step"] == 4
    assert_same_networks(a, b)
    assert_same_optimizers(a, b)
    lines = training_lines(tmp_path / "full")
    assert all(all(v == v and abs(v) < 1e30 for k, v in ln.items() if k in ("adv", "adv_aux", "d", "d_aux"))
               for ln in lines)
    assert [ln["seg"] for ln in lines] == [ln["seg"] for ln in training_lines(tmp_path / "split")]
    assert {k.split(".")[0] for k in a["d"]} == {"d1", "d2"}
    assert len(a["opt_d"]["state"]) == 2 * len(list(MultiScaleDiscriminator(K).parameters()))
    cfg = config.from_dict(json.loads((tmp_path / "full" / "config.json").read_text()))
    fresh = engine.build(cfg, torch.device("cpu")).nets.d.state_dict()  # the same seed: D's init
    assert all(not torch.equal(fresh[k], a["d"][k]) for k in fresh if k.endswith("weight"))
    nets, loaded_cfg = checkpoint.load_networks(checkpoint.latest(tmp_path / "full"), torch.device("cpu"))
    assert loaded_cfg.adapt.adversary == "mrnet" and isinstance(nets.d, MRNetDiscriminators)
    assert all(torch.equal(v, a["d"][k]) for k, v in nets.d.state_dict().items())
