"""The pure-torch reference against hand-computed cases and an independent float64 formulation."""

import inspect
import math

import pytest
import torch

from pwda_fast import ops, reference


def float64_loss(x, z, a, label, threshold, floor, mu):
    """The equations of docs/METHOD.md §1 written pixel by pixel in Python floats (float64)."""
    n, c, h, w = x.shape
    total = 0.0
    for i in range(n):
        for r in range(h):
            for s in range(w):
                logits = [float(x[i, k, r, s]) for k in range(c)]
                m = max(logits)
                p = 1.0 / sum(math.exp(v - m) for v in logits)
                d = floor if p > threshold else math.exp(-p)
                wt = d + mu
                if a is not None:
                    wt *= 1.0 / (1.0 + math.exp(-float(a[i, 0, r, s])))
                zz = float(z[i, 0, r, s])
                total += wt * (max(zz, 0.0) - zz * label + math.log1p(math.exp(-abs(zz))))
    return total / (n * h * w)


def test_hand_computed_single_pixel():
    # Two classes with logits (0, 0): p* = 0.5 <= T, d = exp(-0.5); z = 0: bce = log 2.
    x = torch.zeros(1, 2, 1, 1)
    z = torch.zeros(1, 1, 1, 1)
    expected = (math.exp(-0.5) + 0.1) * math.log(2)
    assert reference.weighted_adv_loss(x, z, label=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Confident pixel (p* > 0.9) takes the floor; sigmoid(a=0) halves the weight.
    x = torch.tensor([10.0, 0.0]).view(1, 2, 1, 1)
    a = torch.zeros(1, 1, 1, 1)
    expected = (0.01 + 0.1) * 0.5 * math.log(2)
    assert reference.weighted_adv_loss(x, z, a, label=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_threshold_is_strict_and_t1_turns_floor_off():
    # p* exactly 0.5 with T = 0.5: not strictly greater, so exp(-0.5), not the floor.
    x = torch.zeros(1, 2, 1, 1)
    d = reference.generation_confidence(x, threshold=0.5, floor=0.01)
    assert d.item() == pytest.approx(math.exp(-0.5))
    confident = torch.tensor([30.0, 0.0]).view(1, 2, 1, 1)
    assert reference.generation_confidence(confident, threshold=1.0).item() == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("label", [0.0, 1.0])
@pytest.mark.parametrize("threshold", [0.9, 1.0, 0.3])
def test_against_float64_formulation(with_aux, label, threshold):
    g = torch.Generator().manual_seed(hash((with_aux, label, threshold)) % 2**31)
    x = torch.randn(2, 5, 3, 4, generator=g) * 3
    z = torch.randn(2, 1, 3, 4, generator=g) * 4
    a = torch.randn(2, 1, 3, 4, generator=g) * 2 if with_aux else None
    got = reference.weighted_adv_loss(x, z, a, label=label, threshold=threshold)
    want = float64_loss(x, z, a, label, threshold, 0.01, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gradient_flows_only_into_disc_logits_and_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 5, 6, generator=g, requires_grad=True)
    z = torch.randn(2, 1, 5, 6, generator=g, requires_grad=True)
    a = torch.randn(2, 1, 5, 6, generator=g, requires_grad=True)
    loss = reference.weighted_adv_loss(x, z, a, label=1.0)
    loss.backward()
    assert x.grad is None and a.grad is None
    w = reference.pixel_weights(x, a)
    expected = w * (torch.sigmoid(z.detach()[:, 0]) - 1.0) / z[:, 0].numel()
    torch.testing.assert_close(z.grad[:, 0], expected, rtol=1e-5, atol=1e-10)


def test_large_logits_stay_finite():
    x = torch.tensor([1e4, -1e4, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    z = torch.tensor([1e4, -1e4, 0.0, 3.0]).view(1, 1, 2, 2)
    a = torch.full((1, 1, 2, 2), -1e4)
    z.requires_grad_(True)
    for label in (0.0, 1.0):
        loss = reference.weighted_adv_loss(x, z, a, label=label)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_seg_ce_ignores_void_and_is_zero_for_all_void_crop():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255, dtype=torch.long)
    loss = reference.seg_ce(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels[0, 0, 0] = 3
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([3]))
    assert reference.seg_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_memory_kl_is_zero_when_heads_agree_with_fused_target():
    # With aux = 0 and main = m, the fused target is softmax(m): KL(main) = 0, KL(aux) > 0.
    main = torch.randn(1, 4, 2, 2)
    aux = torch.zeros_like(main)
    kl = reference.memory_kl(aux, main)
    kl_aux_only = torch.nn.functional.kl_div(torch.log_softmax(aux, 1), torch.softmax(main, 1),
                                             reduction="none").sum(1).mean()
    assert kl.item() == pytest.approx(kl_aux_only.item(), rel=1e-5)


def test_ops_torch_backend_matches_reference_and_weights_api():
    x, z, a = torch.randn(2, 19, 7, 9), torch.randn(2, 1, 7, 9), torch.randn(2, 1, 7, 9)
    assert "torch" in ops.LOSS.available()
    torch.testing.assert_close(ops.weighted_adv_loss(x, z, a, label=1.0, backend="torch"),
                               reference.weighted_adv_loss(x, z, a, label=1.0))
    w = ops.pixel_weights(x, a)
    assert w.shape == (2, 7, 9) and w.dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    (dict(z=torch.randn(2, 1, 8, 9)), r"disc_logits must be \(N, 1, H, W\) like seg_logits"),
    (dict(z=torch.randn(2, 1, 3, 10)), r"disc_logits must be .* 1 <= w <= W"),
    (dict(z=torch.randn(2, 2, 7, 9)), r"disc_logits must be \(N, 1, H, W\)"),
    (dict(a=torch.randn(1, 1, 7, 9)), r"aux_logits must be \(N, 1, H, W\)"),
    (dict(x=torch.randn(19, 7, 9)), r"seg_logits must be a non-empty \(N, C, H, W\)"),
    (dict(x=torch.randint(0, 3, (2, 19, 7, 9))), r"seg_logits must be float32, bfloat16 or float16"),
    (dict(label=0.5), r"label must be 0.0 \(source\) or 1.0 \(target\)"),
])
def test_malformed_inputs_name_the_tensor(bad, match):
    args = dict(x=torch.randn(2, 19, 7, 9), z=torch.randn(2, 1, 7, 9), a=None, label=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        ops.weighted_adv_loss(args["x"], args["z"], args["a"], label=args["label"], backend="torch")


def test_unknown_backend_raises():
    x, z = torch.randn(1, 3, 2, 2), torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.weighted_adv_loss(x, z, label=0.0, backend="cuda")


def test_defaults_are_the_papers_values():
    """T = 0.9, floor = 0.01, mu = 0.1 (paper §5.2) wherever a caller leaves them out."""
    for fn in (reference.generation_confidence, reference.pixel_weights, reference.weighted_adv_loss,
               ops.pixel_weights, ops.weighted_adv_loss):
        params = inspect.signature(fn).parameters
        got = {k: params[k].default for k in ("threshold", "floor", "mu") if k in params}
        assert got == {k: v for k, v in {"threshold": 0.9, "floor": 0.01, "mu": 0.1}.items()
                       if k in params}, fn.__qualname__
    x = torch.randn(2, 19, 5, 6) * 4
    z = torch.randn(2, 1, 5, 6)
    assert torch.equal(reference.weighted_adv_loss(x, z, label=1.0),
                       reference.weighted_adv_loss(x, z, label=1.0, threshold=0.9, floor=0.01, mu=0.1))
    floor_taken = reference.pixel_weights(x, threshold=0.05, floor=0.3, mu=0.0)
    assert torch.allclose(floor_taken, torch.full_like(floor_taken, 0.3))  # every p* > 0.05
