"""ops.weighted_adv_loss on every backend available here vs the pure-torch reference (the spec).

Triton runs on CPU only under TRITON_INTERPRET=1, which must be set before triton is imported:
test_weighted_adv_loss_triton.py re-runs this file in a subprocess with it set.
"""

import contextlib
import functools
import os

import pytest
import torch

from pwda_fast import ops, reference

# `make test` sets PWDA_FAST_EXPECT_EXT=1: a pwda_fast._C that fails to import must then fail the run,
# not turn every ext test into a skip. Without the variable, ext tests skip with the import problem.
EXPECT_EXT = os.environ.get("PWDA_FAST_EXPECT_EXT") == "1"
EXT_PROBLEM = ops.LOSS.problem("ext", "cpu")
EXT_CPU = EXT_PROBLEM is None or EXPECT_EXT
# Triton on CPU only runs under TRITON_INTERPRET=1: test_weighted_adv_loss_triton.py reruns this file so.
CPU_FAST = ([pytest.param("ext", marks=pytest.mark.skipif(not EXT_CPU, reason=str(EXT_PROBLEM)))]
            + (["triton"] if ops.LOSS.problem("triton", "cpu") is None else []))
# ext_v2 (the second CUDA kernel) runs the same CUDA suite as ext: its verdict before it may be the default.
CUDA_FAST = [b for b in ("ext", "ext_v2", "triton")
             if ops.LOSS.problem(b, "cuda") is None or (b in ("ext", "ext_v2") and EXPECT_EXT)]
KW = dict(threshold=0.9, floor=0.01, mu=0.1)


@pytest.mark.skipif(not EXPECT_EXT, reason="PWDA_FAST_EXPECT_EXT=1 not set (make test sets it)")
def test_ext_is_built_when_expected():
    assert "ext" in ops.LOSS.available(), EXT_PROBLEM


def test_backend_problem_is_public_and_names_the_fix():
    assert ops.LOSS.problem("torch", "cpu") is None
    for backend in ("ext", "ext_v2", "triton"):
        problem = ops.LOSS.problem(backend, "cpu")
        assert problem is None or f"backend '{backend}'" in problem
    assert "TRITON_INTERPRET=1" in (ops.LOSS.problem("triton", "mps") or "TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.LOSS.problem("cudnn", "cpu")


SAME = "same"  # a disc or aux map at seg's size; None for aux: no aux map


def make(shape, disc_hw=SAME, aux_hw=SAME, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    """Random seg (N, C, H, W), disc (N, 1, *disc_hw) and aux (N, 1, *aux_hw) logits: a map SAME is at
    seg's (H, W), a smaller one is low-resolution; aux None when aux_hw is None."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = shape

    def draw(size):
        return (torch.randn(size, generator=g) * scale).to(device, dtype)

    seg = draw(shape)
    disc = draw((n, 1, *((h, w) if disc_hw == SAME else disc_hw)))
    a = None if aux_hw is None else draw((n, 1, *((h, w) if aux_hw == SAME else aux_hw)))
    return seg, disc, a


def loss_and_grad(backend, seg, disc, aux, label, **kw):
    """Loss and d loss / d disc_logits (as fp32) of ops.weighted_adv_loss on `backend`."""
    z = disc.detach().clone().requires_grad_()
    loss = ops.weighted_adv_loss(seg, z, aux, label=label, backend=backend, **{**KW, **kw})
    loss.backward()
    return loss.detach(), z.grad.float()


def upsample(x, size):
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def explicit_upsample_reference(seg, disc, aux, label, **kw):
    """reference.weighted_adv_loss on maps upsampled outside it -> loss, grad w.r.t. low-res z. (At seg's
    size the upsampling is an exact copy: the reference itself.)"""
    z = disc.detach().clone().requires_grad_()
    size = seg.shape[2:]
    a = None if aux is None else upsample(aux, size).detach()
    loss = reference.weighted_adv_loss(seg, upsample(z, size), a, label=label, **{**KW, **kw})
    loss.backward()
    return loss.detach(), z.grad.float()


def fp64_reference(seg, disc, aux, label, threshold=0.9, floor=0.01, mu=0.1):
    """docs/METHOD.md §1 in float64 on the same (possibly low-precision) inputs: loss and dL/dz."""
    p_max = torch.softmax(seg.double(), dim=1).amax(dim=1)
    w = torch.where(p_max > threshold, torch.full_like(p_max, floor), torch.exp(-p_max)) + mu
    if aux is not None:
        w = w * torch.sigmoid(aux.double()[:, 0])
    z = disc.double()[:, 0]
    bce = z.clamp_min(0) - z * label + torch.log1p(torch.exp(-z.abs()))
    sig_minus_label = -torch.sigmoid(-z) if label == 1.0 else torch.sigmoid(z)  # no cancellation, z >> 0
    grad = (w * sig_minus_label / z.numel()).unsqueeze(1)
    return (w * bce).mean(), grad


def fp64_lowres_reference(seg, disc, aux, label, threshold=0.9, floor=0.01, mu=0.1):
    """docs/METHOD.md §1 in float64, upsampling in float64 too: loss and dL/dz w.r.t. the low-res map.
    The per-pixel gradient is fp64_reference's closed form: autograd of the BCE would add +1 and -1 for
    z > 0, y = 1 and lose exp(-z) below float64's epsilon (z > 37)."""
    size = seg.shape[2:]
    z64 = disc.double().requires_grad_()
    z_up = upsample(z64, size)
    a64 = None if aux is None else upsample(aux.double(), size)
    loss, grad_up = fp64_reference(seg, z_up.detach(), a64, label, threshold, floor, mu)
    (grad,) = torch.autograd.grad(z_up, z64, grad_up)
    return loss, grad


def fp64_exact(lowres):
    return fp64_lowres_reference if lowres else fp64_reference


def assert_matches_reference(backend, seg, disc, aux, label, against=None, **kw):
    """fp32: `backend`'s loss and dL/dz match `against`'s (default: the torch backend's), and are finite."""
    loss, grad = loss_and_grad(backend, seg, disc, aux, label, **kw)
    ref_loss, ref_grad = (against or functools.partial(loss_and_grad, "torch"))(seg, disc, aux, label, **kw)
    assert grad.shape == disc.shape
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=2e-5, atol=2e-5 * ref_grad.abs().max().item())


def assert_within_2x_of_reference(backend, seg, disc, aux, exact_loss, exact_grad, label=1.0):
    """Low precision: the backend's error vs fp64 is at most 2x that of the torch reference."""
    loss, grad = loss_and_grad(backend, seg, disc, aux, label)
    ref_loss, ref_grad = loss_and_grad("torch", seg, disc, aux, label)
    # Both run on the same rounded inputs, so the fp64 result of those inputs is the yardstick;
    # the slack covers fp32 rounding, which is all that is left once the inputs are shared.
    assert (loss.double() - exact_loss).abs() <= 2 * (ref_loss.double() - exact_loss).abs() + 1e-6
    g_err = (grad.double() - exact_grad).abs().max()
    ref_g_err = (ref_grad.double() - exact_grad).abs().max()
    assert g_err <= 2 * ref_g_err + 1e-5 * exact_grad.abs().max()


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# Each case: (seg shape, disc (h, w), aux (h, w) or None). Low-resolution D / D_aux maps are upsampled
# bilinearly (align_corners=True) inside the kernels; the tests below run each on both kinds of map.
FULL_CASES = [(shape, SAME, aux) for shape in [(1, 19, 97, 131), (2, 3, 5, 7), (1, 19, 1, 1), (3, 2, 1, 1)]
              for aux in (SAME, None)]
LOWRES_CASES = [
    ((1, 19, 97, 131), (4, 5), (13, 17)),
    ((1, 19, 97, 131), (97, 131), (13, 17)),
    ((1, 19, 97, 131), (4, 5), (97, 131)),
    ((2, 19, 64, 128), (16, 32), (64, 128)),  # the toy preset: D at stride 4, D_aux at image size
    ((2, 19, 33, 40), (33, 7), (5, 40)),
    ((2, 3, 5, 7), (1, 1), (1, 1)),
    ((2, 3, 5, 7), (2, 3), None),
    ((1, 19, 1, 1), (1, 1), (1, 1)),
    ((3, 2, 1, 9), (1, 2), (1, 9)),
]
MAPS = ["full", "lowres"]  # ids of a (disc (h, w), aux (h, w)) parameter: full-size, then low-res maps


@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
@pytest.mark.parametrize("case", FULL_CASES + LOWRES_CASES, ids=str)
@pytest.mark.parametrize("label", [0.0, 1.0])
def test_fp32_matches_reference(backend, case, label):
    seg, disc, a = make(*case)
    assert_matches_reference(backend, seg, disc, a, label, against=explicit_upsample_reference)


@pytest.mark.parametrize("backend", CPU_FAST)
def test_channels_last_and_strided_views(backend):
    seg, disc, a = make((2, 19, 33, 40))
    assert_matches_reference(backend, seg.to(memory_format=torch.channels_last),
                             disc.to(memory_format=torch.channels_last), a, 1.0)
    wide, disc2, a2 = make((2, 19, 33, 80))
    assert_matches_reference(backend, wide[..., ::2], disc2[..., ::2], a2[..., 1::2], 0.0)


@pytest.mark.parametrize("backend", CPU_FAST)
def test_lowres_channels_last_and_strided_views(backend):
    seg, disc, a = make((2, 19, 33, 40), (5, 6), (9, 11))
    assert_matches_reference(backend, seg.to(memory_format=torch.channels_last),
                             disc.to(memory_format=torch.channels_last),
                             a.to(memory_format=torch.channels_last), 1.0)
    _, disc2, a2 = make((2, 19, 33, 40), (5, 12), (9, 22), seed=1)
    assert_matches_reference(backend, seg, disc2[..., ::2], a2[..., 1::2], 0.0)
    assert_matches_reference(backend, seg, disc2.transpose(2, 3)[:, :, :5, :9].transpose(2, 3),
                             a2[:, :, :, :11], 1.0)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("maps", [(SAME, SAME), ((3, 4), (6, 7))], ids=MAPS)
def test_large_logits_and_floor_off(backend, maps):
    seg, disc, a = make((1, 19, 17, 23), *maps, scale=1e4)
    assert_matches_reference(backend, seg, disc, a, 1.0)
    assert_matches_reference(backend, seg, disc, a, 0.0)
    seg, disc, a = make((1, 19, 17, 23), *maps, scale=0.5)
    assert_matches_reference(backend, seg, disc, a, 0.0, threshold=1.0)
    assert_matches_reference(backend, seg, disc, a, 1.0, threshold=1.0, floor=0.0, mu=0.0)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lowres", [False, True])
def test_low_precision_within_2x_of_reference(backend, dtype, lowres):
    case = ((1, 19, 97, 131), (4, 5), (13, 17)) if lowres else ((2, 19, 31, 37),)
    seg, disc, a = make(*case, dtype=dtype)
    assert_within_2x_of_reference(backend, seg, disc, a, *fp64_exact(lowres)(seg, disc, a, 1.0))


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("maps", [(SAME, SAME), ((4, 4), (8, 9))], ids=MAPS)
def test_inputs_unchanged_and_deterministic(backend, maps):
    seg, disc, a = make((2, 19, 29, 31), *maps)
    before = [t.clone() for t in (seg, disc, a)]
    first = loss_and_grad(backend, seg, disc, a, 1.0)
    second = loss_and_grad(backend, seg, disc, a, 1.0)
    for t, b in zip((seg, disc, a), before, strict=True):
        assert torch.equal(t, b)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("case", [((1, 19, 9, 11),), ((2, 19, 29, 31), (4, 4), (8, 9))], ids=MAPS)
def test_mixed_dtypes_and_no_grad_to_weights(backend, case):
    seg, disc, a = make(*case)
    seg_bf16 = seg.bfloat16().requires_grad_()
    loss = ops.weighted_adv_loss(seg_bf16, disc.requires_grad_(), a, label=1.0, backend=backend)
    ref, _ = explicit_upsample_reference(seg_bf16.detach(), disc.detach(), a, 1.0)
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-7)
    loss.backward()
    assert seg_bf16.grad is None and disc.grad is not None


@pytest.mark.parametrize("bad, message", [
    (lambda s, d, a: (s[:, :, :, :-1], d, a), "disc_logits must be"),
    (lambda s, d, a: (s, d.repeat(1, 2, 1, 1), a), "disc_logits must be"),
    (lambda s, d, a: (s, d, a[:1]), "aux_logits must be"),
    (lambda s, d, a: (s.long(), d, a), "seg_logits must be"),
    (lambda s, d, a: (s[0], d, a), "seg_logits must be"),
    (lambda s, d, a: (s, d.double(), a), "disc_logits must be"),
    # low-resolution maps: larger than seg in one dimension, empty, two channels, another batch size
    (lambda s, d, a: (s, torch.zeros(2, 1, 9, 4), a), "disc_logits must be"),
    (lambda s, d, a: (s, torch.zeros(2, 1, 4, 9), a), "disc_logits must be"),
    (lambda s, d, a: (s, torch.zeros(2, 1, 0, 4), a), "disc_logits must be"),
    (lambda s, d, a: (s, d[:, :, :3, :3].repeat(1, 2, 1, 1), a), "disc_logits must be"),
    (lambda s, d, a: (s, d[:1, :, :3, :3], a), "disc_logits must be"),
    (lambda s, d, a: (s, d[:, :, :3, :3], torch.zeros(2, 1, 8, 9)), "aux_logits must be"),
    (lambda s, d, a: (s, d[:, :, :3, :3], a[:1, :, :2, :2]), "aux_logits must be"),
])
@pytest.mark.parametrize("backend", ["torch"] + CPU_FAST)
def test_malformed_inputs_name_the_tensor(backend, bad, message):
    seg, disc, a = bad(*make((2, 19, 8, 8)))
    with pytest.raises(ValueError, match=message):
        ops.weighted_adv_loss(seg, disc, a, label=1.0, backend=backend)


def test_bad_label_and_unknown_backend():
    seg, disc, a = make((1, 3, 4, 4))
    with pytest.raises(ValueError, match="label"):
        ops.weighted_adv_loss(seg, disc, a, label=0.5)
    with pytest.raises(ValueError, match="backend"):
        ops.weighted_adv_loss(seg, disc, a, label=1.0, backend="cudnn")


def test_resolve_backend():
    assert ops.LOSS.resolve("torch", "cpu") == "torch"
    assert ops.LOSS.resolve("auto", "cpu") == ("ext" if EXT_PROBLEM is None else "torch")
    for backend in ("ext", "triton"):
        if ops.LOSS.problem(backend, "cpu") is not None:
            with pytest.raises(RuntimeError, match=f"backend '{backend}'"):
                ops.LOSS.resolve(backend, "cpu")


def fused_op(backend):
    """The registered op behind ops.weighted_adv_loss for `backend`: C++ autograd (ext) or Python (triton)."""
    return torch.ops.pwda_fast.weighted_adv_loss if backend == "ext" else ops.loss._weighted_adv_loss_triton


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("maps", [(SAME, SAME), ((2, 3), (3, 2))], ids=MAPS)
def test_opcheck(backend, maps):
    seg, disc, a = make((2, 5, 6, 7), *maps)
    for aux in (a, None):
        args = (seg, disc.requires_grad_(), aux, 1.0, 0.9, 0.01, 0.1)
        torch.library.opcheck(fused_op(backend), args)
    if backend == "ext":
        torch.library.opcheck(torch.ops.pwda_fast.weighted_adv_loss_fwd,
                              (seg, disc.detach(), a, 0.0, 0.9, 0.01, 0.1))


@pytest.mark.skipif(not EXT_CPU, reason=str(EXT_PROBLEM))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ext_autograd_op_in_every_grad_mode(dtype):
    """The C++ autograd op (CPU kernel below autograd) gives the reference's loss with grad on, under
    no_grad and under inference_mode; the gradient reaches disc alone, in disc's dtype, scaled by the
    upstream gradient."""
    seg, disc, a = make((2, 19, 9, 13), dtype=dtype, seed=7)
    want = reference.weighted_adv_loss(seg.float(), disc.float(), a.float(), label=0.0)
    seg.requires_grad_()
    a.requires_grad_()
    disc.requires_grad_()
    loss = ops.weighted_adv_loss(seg, disc, a, label=0.0, backend="ext")
    (3.0 * loss).backward()
    assert loss.requires_grad and seg.grad is None and a.grad is None and disc.grad.dtype == dtype
    z = disc.detach().float().requires_grad_()
    (3.0 * reference.weighted_adv_loss(seg.detach().float(), z, a.detach().float(), label=0.0)).backward()
    # bf16: dL/dz rounded once to bf16, a relative error of at most 2^-8.
    tol = {} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-9}
    torch.testing.assert_close(disc.grad.float(), z.grad, **tol)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            other = ops.weighted_adv_loss(seg, disc, a, label=0.0, backend="ext")
        assert not other.requires_grad and torch.equal(other, loss.detach())
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not EXT_CPU, reason=str(EXT_PROBLEM))
@pytest.mark.parametrize("maps", [(SAME, SAME), ((2, 3), (5, 6))], ids=MAPS)
def test_torch_compile_fullgraph_matches_eager(maps):
    seg, disc, a = make((2, 19, 16, 24), *maps)

    def step(seg, disc, aux):
        return 2.0 * ops.weighted_adv_loss(seg, disc, aux, label=1.0, backend="ext")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, z2 = disc.clone().requires_grad_(), disc.clone().requires_grad_()
    eager_loss, compiled_loss = step(seg, z1, a), compiled(seg, z2, a)
    eager_loss.backward()
    compiled_loss.backward()
    # Low-res maps too: the adjoint of the upsampling is inside the op, so tracing changes no rounding.
    assert torch.equal(eager_loss, compiled_loss) and torch.equal(z1.grad, z2.grad)


CUDA_CASES = {  # lowres -> [(seg shape, disc (h, w), aux (h, w) or None, label, logit scale)]
    False: [((1, 19, 97, 131), SAME, SAME, 1.0, 3.0), ((2, 3, 5, 7), SAME, None, 0.0, 3.0),
            ((4, 19, 64, 128), SAME, SAME, 0.0, 1e4), ((1, 19, 1, 1), SAME, SAME, 1.0, 3.0)],
    True: [(*case, label, 3.0) for case, label in zip(LOWRES_CASES + [((4, 19, 64, 128), (2, 4), (9, 17))],
                                                      [1.0, 0.0] * 5, strict=False)],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("lowres", [False, True])
def test_cuda_matches_reference(backend, dtype, layout, lowres):
    for shape, disc_hw, aux_hw, label, scale in CUDA_CASES[lowres]:
        seg, disc, a = make(shape, disc_hw, aux_hw, dtype=dtype, scale=scale, device="cuda")
        seg = seg.contiguous(memory_format=layout)
        if dtype == torch.float32:
            assert_matches_reference(backend, seg, disc, a, label,
                                     against=explicit_upsample_reference if lowres else None)
        else:
            exact_loss, exact_grad = fp64_exact(lowres)(seg, disc, a, label)
            assert_within_2x_of_reference(backend, seg, disc, a, exact_loss, exact_grad, label)
        # The low-res adjoint is a fixed-order gather (no atomicAdd): the gradient is bitwise reproducible,
        # also under torch.use_deterministic_algorithms, which rejects aten's upsample backward on CUDA.
        first = loss_and_grad(backend, seg, disc, a, label)
        with deterministic_algorithms():
            second = loss_and_grad(backend, seg, disc, a, label)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("case", [((2, 19, 29, 31), (4, 4), (8, 9)), ((1, 3, 97, 131), (13, 131), None),
                                  ((1, 3, 40, 9000), (2, 700), None)], ids=str)
def test_lowres_gradient_is_deterministic(backend, case):
    """Two runs, one or two threads, with deterministic algorithms on: the same bits, and the reference's
    gradient. (9000 columns: a row longer than the CPU kernel's 4096-pixel task.)"""
    seg, disc, a = make(*case)
    first = loss_and_grad(backend, seg, disc, a, 1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        with deterministic_algorithms():
            second = loss_and_grad(backend, seg, disc, a, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    ref_loss, ref_grad = explicit_upsample_reference(seg, disc, a, 1.0)
    torch.testing.assert_close(first[1], ref_grad, rtol=2e-5, atol=2e-5 * ref_grad.abs().max().item())


def test_pixel_weights_lowres_aux():
    seg, _, a = make((2, 19, 11, 13), (1, 1), (3, 4))
    torch.testing.assert_close(ops.pixel_weights(seg, a),
                               reference.pixel_weights(seg, upsample(a, seg.shape[2:])))


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("lowres", [False, True])
def test_large_logits_gradient_keeps_relative_precision(backend, lowres):
    """dL/dz = w * (sigmoid(z) - y) / P: for y = 1 and z >> 0 it is -w * exp(-z) / P, which sigmoid(z) - 1
    in fp32 rounds to 0 for z > 17. Each element must match float64 to 1e-5 relative, not just the max.
    (Up to z = 60: beyond ~80, w * exp(-z) / P falls below fp32's smallest normal number.)"""
    seg, _, a = make((2, 19, 9, 11))
    z = torch.linspace(2.0, 60.0, 2 * 9 * 11).reshape(2, 1, 9, 11)
    if lowres:
        z, a = z[:, :, :3, :4].contiguous(), a[:, :, :5, :6].contiguous()
    exact = fp64_exact(lowres)
    for label, sign in ((1.0, 1.0), (0.0, -1.0)):  # y = 0 mirrored: z << 0
        loss, grad = loss_and_grad(backend, seg, sign * z, a, label)
        exact_loss, exact_grad = exact(seg, sign * z, a, label)
        assert (grad.double() - exact_grad).abs().le(1e-5 * exact_grad.abs()).all(), (grad, exact_grad)
        assert (loss.double() - exact_loss).abs() <= 1e-5 * exact_loss.abs()


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("lowres", [False, True])
def test_bf16_gradient_rounded_once_for_any_upstream_gradient(backend, lowres):
    """The loop backpropagates lambda_adv * L: the bf16 dL/dz must stay within 2x of the reference's error
    for an upstream gradient of 0.01 too (rounding once, after the product), and come back in bf16."""
    shape, disc_hw = (2, 19, 31, 37), ((4, 5) if lowres else (31, 37))
    seg, disc, a = make(shape, disc_hw, (31, 37), dtype=torch.bfloat16)
    _, exact_grad = fp64_exact(lowres)(seg, disc, a, 1.0)
    grads = {}
    for b in (backend, "torch"):
        z = disc.detach().clone().requires_grad_()
        (0.01 * ops.weighted_adv_loss(seg, z, a, label=1.0, backend=b, **KW)).backward()
        assert z.grad.dtype == torch.bfloat16
        grads[b] = z.grad.double()
    err = (grads[backend] - 0.01 * exact_grad).abs().max()
    ref_err = (grads["torch"] - 0.01 * exact_grad).abs().max()
    assert err <= 2 * ref_err + 1e-5 * 0.01 * exact_grad.abs().max()


@pytest.mark.skipif(ops.LOSS.problem("triton", "cpu") is not None,
                    reason="needs TRITON_INTERPRET=1 on CPU (test_weighted_adv_loss_triton.py runs it)")
def test_triton_index_widths_agree(monkeypatch):
    """The Triton kernel indexes in int32 when every offset fits (all tests above), else in int64: the
    64-bit path, forced here, gives the same bits."""
    from pwda_fast.kernels import weighted_adv_loss as kernels

    seg, disc, a = make((2, 19, 33, 40), (5, 6), (33, 40))
    seg = seg.to(memory_format=torch.channels_last)
    narrow = loss_and_grad("triton", seg, disc, a, 1.0)
    monkeypatch.setattr(kernels, "_INT32_LIMIT", 0)
    wide = loss_and_grad("triton", seg, disc, a, 1.0)
    assert torch.equal(narrow[0], wide[0]) and torch.equal(narrow[1], wide[1])
