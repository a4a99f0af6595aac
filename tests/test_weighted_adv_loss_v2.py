"""torch.ops.pwda_fast.weighted_adv_loss_v2, the second CUDA kernel of the fused loss
(csrc/cuda/weighted_adv_loss_v2.cu), against reference.weighted_adv_loss (the spec) and against today's
ext op torch.ops.pwda_fast.weighted_adv_loss. The op has CUDA kernels only, so all but the first test
need a GPU.

The cases reach every launch path the kernel picks from C, H*W, the strides and the data pointer:
16-byte NCHW loads (C = 19, H*W a multiple of 8 for bf16/fp16, of 4 for fp32), 16-byte channels_last
loads, the scalar C = 19 path (odd H*W, misaligned or sliced views) and the run-time-C path (C = 7);
full-size maps and low-resolution ones, among them rows wider than a block (the low-res gradient's
bins then have several pieces per row) and blocks that hold many images (its row-fold counters).
"""

import os
import zlib

import pytest
import torch

from pwda_fast import reference

# `make test` sets PWDA_FAST_EXPECT_EXT=1: on a CUDA machine a missing kernel then fails the run
# instead of skipping it.
EXPECT_EXT = os.environ.get("PWDA_FAST_EXPECT_EXT") == "1"


def _ext_problem() -> str | None:
    try:
        import pwda_fast._C  # noqa: F401  (loading the .so registers torch.ops.pwda_fast.*)
    except ImportError as e:
        return f"pwda_fast._C does not import ({e}): build it with `make setup`"
    return None


def _cuda_problem() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    problem = _ext_problem()
    if problem is None and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "pwda_fast::weighted_adv_loss_v2_fwd", "CUDA"):
        problem = "pwda_fast._C was built without its CUDA kernels (no CUDA toolkit, or PWDA_FAST_NO_CUDA=1)"
    return problem


EXT_PROBLEM = _ext_problem()
CUDA_PROBLEM = _cuda_problem()
gpu = pytest.mark.skipif(CUDA_PROBLEM is not None and not (EXPECT_EXT and torch.cuda.is_available()),
                         reason=str(CUDA_PROBLEM))

KW = dict(threshold=0.9, floor=0.01, mu=0.1)
SAME = "same"  # a map at seg's (H, W); None for aux: no aux map
LOW_PRECISION = (torch.bfloat16, torch.float16)
# One rounding of the same fp32 value to the output dtype: at most one ulp apart, 2^-7 (bf16) or
# 2^-10 (fp16) relative.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make(shape, disc_hw=SAME, aux_hw=SAME, dtype=torch.float32, scale=3.0, seed=0,
         layout=torch.contiguous_format):
    """Fresh random CUDA seg (N, C, H, W), disc (N, 1, *disc_hw) and aux (N, 1, *aux_hw) logits; a map SAME
    is at seg's (H, W), a smaller one is low-resolution; aux None when aux_hw is None. `layout` applies
    to all three (channels_last of a 1-channel map is its NCHW layout with those strides)."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = shape

    def draw(size):
        return (torch.randn(size, generator=g) * scale).to("cuda", dtype).contiguous(memory_format=layout)

    seg = draw(shape)
    disc = draw((n, 1, *((h, w) if disc_hw == SAME else disc_hw)))
    aux = None if aux_hw is None else draw((n, 1, *((h, w) if aux_hw == SAME else aux_hw)))
    return seg, disc, aux


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view with t's strides whose data pointer is one element past a 16-byte boundary:
    the kernel must leave its 16-byte loads for the scalar path."""
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    storage = torch.empty(span + 1, dtype=t.dtype, device=t.device)
    view = storage.as_strided(t.shape, t.stride(), storage_offset=1)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def run(op, seg, disc, aux, label, upstream=1.0, **kw):
    """Loss and d(upstream * loss) / d disc_logits of a C++ op (v2 or today's ext), taken on disc itself
    (detach keeps its strides and data pointer: a misaligned view stays misaligned)."""
    kw = {**KW, **kw}
    z = disc.detach().requires_grad_()
    loss = op(seg, z, aux, label, kw["threshold"], kw["floor"], kw["mu"])
    (grad,) = torch.autograd.grad(upstream * loss, z)
    return loss.detach(), grad


def v2(seg, disc, aux, label, upstream=1.0, **kw):
    return run(torch.ops.pwda_fast.weighted_adv_loss_v2, seg, disc, aux, label, upstream, **kw)


def ext(seg, disc, aux, label, upstream=1.0, **kw):
    return run(torch.ops.pwda_fast.weighted_adv_loss, seg, disc, aux, label, upstream, **kw)


def ref(seg, disc, aux, label, upstream=1.0, **kw):
    z = disc.detach().clone().requires_grad_()
    loss = reference.weighted_adv_loss(seg, z, aux, label=label, **{**KW, **kw})
    (grad,) = torch.autograd.grad(upstream * loss, z)
    return loss.detach(), grad


def exact(seg, disc, aux, label, threshold=0.9, floor=0.01, mu=0.1):
    """docs/METHOD.md §1 in float64 on the same (possibly rounded) inputs, maps upsampled in float64:
    the loss and dL/dz w.r.t. disc as passed. The per-pixel gradient is the closed form, without the
    cancellation of sigmoid(z) - 1 for z >> 0."""
    size = seg.shape[2:]
    z64 = disc.double().requires_grad_()
    z_up = reference.upsample_to(z64, size)
    a64 = None if aux is None else reference.upsample_to(aux.double(), size)
    p_max = torch.softmax(seg.double(), dim=1).amax(dim=1)
    w = torch.where(p_max > threshold, torch.full_like(p_max, floor), torch.exp(-p_max)) + mu
    if a64 is not None:
        w = w * torch.sigmoid(a64[:, 0])
    z = z_up.detach()[:, 0]
    bce = z.clamp_min(0) - z * label + torch.log1p(torch.exp(-z.abs()))
    sig_minus_label = -torch.sigmoid(-z) if label == 1.0 else torch.sigmoid(z)
    grad_up = (w * sig_minus_label / z.numel()).unsqueeze(1)
    (grad,) = torch.autograd.grad(z_up, z64, grad_up)
    return (w * bce).mean(), grad


def assert_fp32_close(got, want, what):
    loss, grad = got
    want_loss, want_grad = want
    assert grad.shape == want_grad.shape and grad.dtype == want_grad.dtype, what
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), what
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-7, msg=lambda m: f"{what}: loss: {m}")
    torch.testing.assert_close(grad, want_grad, rtol=2e-5, atol=2e-5 * want_grad.abs().max().item(),
                               msg=lambda m: f"{what}: grad: {m}")


def assert_within_2x_of_torch(got, seg, disc, aux, label, what, upstream=1.0):
    """Low precision: the kernel's error against float64 (on the same rounded inputs) is at most twice that
    of the reference run by torch in the same precision; the slack covers fp32 rounding."""
    loss, grad = got
    ref_loss, ref_grad = ref(seg, disc, aux, label, upstream)
    exact_loss, exact_grad = exact(seg, disc, aux, label)
    exact_loss, exact_grad = upstream * exact_loss, upstream * exact_grad
    assert grad.dtype == disc.dtype and torch.isfinite(grad.float()).all(), what
    assert (loss.double() - exact_loss).abs() <= 2 * (ref_loss.double() - exact_loss).abs() + 1e-6, what
    err = (grad.double() - exact_grad).abs().max()
    ref_err = (ref_grad.double() - exact_grad).abs().max()
    assert err <= 2 * ref_err + 1e-5 * exact_grad.abs().max(), (what, err.item(), ref_err.item())


# (seg shape, disc (h, w), aux (h, w) or None, label). Which path each takes (bf16; fp32 alike unless said):
FULL_CASES = [
    ((1, 19, 97, 131), SAME, SAME, 1.0),  # H*W odd: scalar C = 19
    ((2, 19, 64, 128), SAME, SAME, 0.0),  # 16-byte loads of seg and of both maps
    ((2, 19, 64, 128), SAME, None, 1.0),
    ((2, 19, 3, 4), SAME, SAME, 0.0),  # fp32: 16-byte loads (H*W = 12); bf16: scalar
    ((2, 7, 33, 40), SAME, SAME, 1.0),  # run-time C
    ((1, 19, 1, 1), SAME, SAME, 0.0),
    ((3, 2, 1, 1), SAME, None, 1.0),
]
LOWRES_CASES = [
    ((1, 19, 97, 131), (4, 5), (13, 17), 1.0),
    ((2, 19, 64, 128), (16, 32), SAME, 0.0),  # the toy preset: D at stride 4, D_aux at image size
    ((2, 19, 64, 128), (64, 32), (16, 128), 1.0),  # low-res along one axis only
    ((2, 7, 33, 40), (33, 7), (5, 40), 0.0),
    ((1, 19, 8, 4096), (2, 64), None, 1.0),  # a row spans 2 blocks (bf16 NCHW) or 4 (fp32)
    ((64, 7, 3, 5), (2, 2), (1, 1), 0.0),  # ~70 images per block
    ((2, 19, 64, 128), (1, 1), (1, 1), 1.0),
    ((2, 3, 5, 7), (2, 3), None, 0.0),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="cl")]


def case_id(case):
    shape, disc_hw, aux_hw, label = case
    return f"{'x'.join(map(str, shape))}-d{disc_hw}-a{aux_hw}-y{int(label)}".replace(" ", "")


def test_ops_registered_for_cuda_only():
    """Runs anywhere the extension imports: the three ops and their schemas exist, with no CPU kernel."""
    if EXT_PROBLEM is not None:
        if EXPECT_EXT:
            pytest.fail(EXT_PROBLEM)
        pytest.skip(EXT_PROBLEM)
    ops = torch.ops.pwda_fast
    args = "(Tensor seg_logits, Tensor disc_logits, Tensor? aux_logits, float label, float threshold, " \
           "float floor, float mu)"
    assert str(ops.weighted_adv_loss_v2.default._schema) == f"pwda_fast::weighted_adv_loss_v2{args} -> Tensor"
    assert str(ops.weighted_adv_loss_v2_fwd.default._schema) == (
        f"pwda_fast::weighted_adv_loss_v2_fwd{args} -> (Tensor loss, Tensor grad_disc)")
    assert str(ops.weighted_adv_loss_v2_bwd.default._schema) == (
        "pwda_fast::weighted_adv_loss_v2_bwd(Tensor grad_disc, Tensor grad_loss, ScalarType dtype) -> Tensor")
    seg, disc = torch.randn(1, 19, 4, 4), torch.randn(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="CPU"):
        ops.weighted_adv_loss_v2(seg, disc, None, 1.0, 0.9, 0.01, 0.1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FULL_CASES + LOWRES_CASES, ids=case_id)
def test_matches_reference_and_todays_kernel(case, dtype, layout):
    shape, disc_hw, aux_hw, label = case
    seed = zlib.crc32(case_id(case).encode())  # per case, the same on every run
    seg, disc, aux = make(shape, disc_hw, aux_hw, dtype=dtype, layout=layout, seed=seed)
    what = f"{case_id(case)} {dtype} {layout}"
    got = v2(seg, disc, aux, label)
    today = ext(seg, disc, aux, label)
    if dtype == torch.float32:
        assert_fp32_close(got, ref(seg, disc, aux, label), what + " vs reference")
        assert_fp32_close(got, today, what + " vs today's ext kernel")
    else:
        assert_within_2x_of_torch(got, seg, disc, aux, label, what)
        torch.testing.assert_close(got[0], today[0], rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: loss: {m}")
        torch.testing.assert_close(got[1].float(), today[1].float(), rtol=ULP[dtype],
                                   atol=1e-5 * today[1].float().abs().max().item(),
                                   msg=lambda m: f"{what}: grad vs today's ext kernel: {m}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("maps", [(SAME, SAME), ((3, 4), (6, 7)), ((4, 8), None)],
                         ids=["full", "lowres", "noaux"])
def test_large_logits_and_floor_off(layout, maps):
    """|logits| ~ 1e4 in fp32 stay finite and match; the floor off (T = 1) and floor = mu = 0 too.
    (2, 19, 64, 128): the 16-byte paths; (1, 19, 17, 23): the scalar one."""
    for shape in [(2, 19, 64, 128), (1, 19, 17, 23)]:
        seg, disc, aux = make(shape, *maps, scale=1e4, layout=layout, seed=3)
        for label in (0.0, 1.0):
            assert_fp32_close(v2(seg, disc, aux, label), ref(seg, disc, aux, label), f"{shape} 1e4 y={label}")
        seg, disc, aux = make(shape, *maps, scale=0.5, layout=layout, seed=4)
        assert_fp32_close(v2(seg, disc, aux, 0.0, threshold=1.0), ref(seg, disc, aux, 0.0, threshold=1.0),
                          f"{shape} T=1")
        kw = dict(threshold=1.0, floor=0.0, mu=0.0)
        assert_fp32_close(v2(seg, disc, aux, 1.0, **kw), ref(seg, disc, aux, 1.0, **kw), f"{shape} mu=0")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("maps", [(SAME, SAME), ((16, 32), (64, 128)), ((5, 6), (9, 11))],
                         ids=["full", "lowres", "lowres-both"])
def test_misaligned_and_sliced_views(dtype, layout, maps):
    """Views the 16-byte paths must refuse: a data pointer one element off a 16-byte boundary (seg, disc,
    aux each in turn), and planes that are not one contiguous run (a W slice). Same values as the aligned,
    contiguous inputs, which take the 16-byte path (2, 19, 64, 128)."""
    seg, disc, aux = make((2, 19, 64, 128), *maps, dtype=dtype, layout=layout, seed=5)
    aligned = v2(seg, disc, aux, 1.0)
    variants = {"seg": (misaligned(seg), disc, aux), "disc": (seg, misaligned(disc), aux),
                "aux": (seg, disc, misaligned(aux)),
                "all": (misaligned(seg), misaligned(disc), misaligned(aux))}
    wide_seg = make((2, 19, 64, 136), dtype=dtype, layout=layout, seed=5)[0]
    wide_seg[..., :128] = seg
    variants["w-slice"] = (wide_seg[..., :128], disc, aux)
    for name, (s, d, a) in variants.items():
        got = v2(s, d, a, 1.0)
        what = f"{name} {dtype} {layout} {maps}"
        # Another path sums in another order: equal to rounding, not bitwise.
        torch.testing.assert_close(got[0], aligned[0], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, what=what: f"{what}: loss: {m}")
        tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=ULP[dtype], atol=1e-5)
        torch.testing.assert_close(got[1].float(), aligned[1].float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * aligned[1].float().abs().max().item(),
                                   msg=lambda m, what=what: f"{what}: grad: {m}")
        if dtype == torch.float32:
            assert_fp32_close(got, ref(s, d, a, 1.0), what + " vs reference")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    ((4, 19, 128, 256), (16, 32), SAME, torch.bfloat16, torch.contiguous_format),
    ((2, 19, 128, 256), (16, 32), SAME, torch.float32, torch.channels_last),
    ((4, 19, 128, 256), SAME, SAME, torch.bfloat16, torch.contiguous_format),
    ((1, 19, 97, 131), (4, 5), (13, 17), torch.float32, torch.contiguous_format),
    ((64, 7, 3, 5), (2, 2), None, torch.float16, torch.channels_last),
], ids=["bf16-lowres", "fp32-cl-lowres", "bf16-full", "scalar", "runtime-c"])
def test_bitwise_reproducible(case):
    """Two calls on the same inputs: the same bits for the loss (partials summed in block order by the
    last block) and for the low-res gradient (whichever block folds a row, it sums in one order)."""
    shape, disc_hw, aux_hw, dtype, layout = case
    seg, disc, aux = make(shape, disc_hw, aux_hw, dtype=dtype, layout=layout, seed=6)
    first = v2(seg, disc, aux, 1.0)
    second = v2(seg, disc, aux, 1.0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    fwd = torch.ops.pwda_fast.weighted_adv_loss_v2_fwd
    a, b = fwd(seg, disc, aux, 0.0, 0.9, 0.01, 0.1), fwd(seg, disc, aux, 0.0, 0.9, 0.01, 0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].dtype == torch.float32 and a[1].shape == disc.shape and a[1].is_contiguous()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_op_rounds_once(dtype):
    """weighted_adv_loss_v2_bwd = fp32 dL/dz times the device scalar, rounded once to the dtype: the same
    bits as torch's fp32 product cast once. 2*37*41 = 3034 elements (not a multiple of the 8 a thread
    takes: the tail) and a misaligned view (the element-wise branch)."""
    g = torch.randn(2, 1, 37, 41, device="cuda")
    scale = torch.tensor(0.01, device="cuda")
    bwd = torch.ops.pwda_fast.weighted_adv_loss_v2_bwd
    for grad_disc in (g, misaligned(g)):
        out = bwd(grad_disc, scale, dtype)
        assert out.dtype == dtype and out.shape == g.shape
        assert torch.equal(out, (grad_disc * scale).to(dtype))
    assert torch.equal(bwd(g, scale.double(), dtype), (g * scale).to(dtype))  # any upstream float dtype


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("lowres", [False, True])
def test_low_precision_gradient_for_any_upstream_gradient(lowres):
    """The loop backpropagates lambda_adv * L: the bf16 dL/dz stays within 2x of the reference's error for
    an upstream gradient of 0.01, and comes back in bf16."""
    seg, disc, aux = make((2, 19, 32, 40), (4, 5) if lowres else SAME, SAME, dtype=torch.bfloat16, seed=7)
    got = v2(seg, disc, aux, 1.0, upstream=0.01)
    assert_within_2x_of_torch(got, seg, disc, aux, 1.0, "upstream 0.01", upstream=0.01)


@gpu
@pytest.mark.gpu
def test_grad_modes_and_inputs_unchanged():
    """Under no_grad and inference_mode (the plain CUDA kernel below autograd) the loss has the same bits;
    the gradient reaches disc alone; the inputs are not written."""
    seg, disc, aux = make((2, 19, 32, 40), (8, 10), (16, 20), dtype=torch.bfloat16, seed=8)
    before = [t.clone() for t in (seg, disc, aux)]
    seg.requires_grad_()
    aux.requires_grad_()
    z = disc.detach().requires_grad_()
    loss = torch.ops.pwda_fast.weighted_adv_loss_v2(seg, z, aux, 1.0, 0.9, 0.01, 0.1)
    loss.backward()
    assert seg.grad is None and aux.grad is None and z.grad.dtype == torch.bfloat16
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            other = torch.ops.pwda_fast.weighted_adv_loss_v2(seg, disc, aux, 1.0, 0.9, 0.01, 0.1)
        assert not other.requires_grad and torch.equal(other, loss.detach())
    for t, b in zip((seg, disc, aux), before, strict=True):
        assert torch.equal(t.detach(), b)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("maps", [(SAME, SAME), ((16, 32), SAME)], ids=["full", "lowres"])
def test_cuda_graph_capture_and_replay(maps):
    """Forward and backward captured in one CUDA graph (no host sync, buffers from the graph's pool, the
    counters zeroed on the stream each replay) give the eager bits on new inputs."""
    seg, disc, aux = make((2, 19, 64, 128), *maps, dtype=torch.bfloat16, seed=9)
    static = [t.clone() for t in (seg, disc, aux)]
    upstream = torch.tensor(0.01, device="cuda")

    def step(s, d, a):
        z = d.detach().requires_grad_()
        loss = torch.ops.pwda_fast.weighted_adv_loss_v2(s, z, a, 1.0, 0.9, 0.01, 0.1)
        (grad,) = torch.autograd.grad(loss, z, upstream)
        return loss.detach(), grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graph asks
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    for seed in (10, 11):
        fresh = make((2, 19, 64, 128), *maps, dtype=torch.bfloat16, seed=seed)
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        eager = step(*fresh)
        assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bad, message", [
    (lambda s, d, a: (s[:, :, :, :-1], d, a), "disc_logits must be"),
    (lambda s, d, a: (s, d.repeat(1, 2, 1, 1), a), "disc_logits must be"),
    (lambda s, d, a: (s, d, a[:1]), "aux_logits must be"),
    (lambda s, d, a: (s.double(), d, a), "seg_logits must be"),
    (lambda s, d, a: (s, d.half(), a), "disc_logits must have"),
    (lambda s, d, a: (s, d.cpu(), a), "disc_logits must be on"),
])
def test_malformed_inputs_name_the_tensor(bad, message):
    seg, disc, aux = bad(*make((2, 19, 8, 8)))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pwda_fast.weighted_adv_loss_v2(seg, disc, aux, 1.0, 0.9, 0.01, 0.1)
