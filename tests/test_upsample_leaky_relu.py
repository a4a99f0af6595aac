"""upsample_leaky_relu (D_aux's first activation at image size): the Triton kernels against the reference
(leaky_relu(interpolate(x, align_corners=True))), values and gradient, fp32 / bf16, NCHW and
channels_last, odd shapes, identity sizes, determinism; and D_aux built on it equals D_aux on torch.

Triton on CPU runs only under TRITON_INTERPRET=1, set before triton is imported: without it this file
reruns its Triton tests in a subprocess (as test_weighted_adv_loss_triton.py does for the loss).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pwda_fast import ops, reference
from pwda_fast.models import FeatureDiscriminator

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = ops.UPSAMPLE.problem("triton", DEVICE) is None
# Also marked gpu: gpu_check.sh runs `pytest -m gpu`, where these run on CUDA; on CPU the interpreter
# run below covers them.
_skip = pytest.mark.skipif(not TRITON_HERE, reason="Triton needs CUDA or TRITON_INTERPRET=1 "
                           "(test_triton_interpreter reruns these)")


def needs_triton(test):
    return pytest.mark.gpu(_skip(test))

# (N, C, h, w) -> (H, W): the paper's ~8x ratio at toy size, odd sizes, one axis unchanged, a 1-pixel
# input axis, and an output equal to the input (identity).
CASES = [((2, 8, 3, 5), (17, 33)), ((1, 5, 4, 3), (9, 3)), ((1, 3, 1, 2), (5, 7)), ((2, 4, 6, 6), (6, 6))]


def make(shape, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2).to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def reference_fp32(x, size, slope, grad):
    """Value and input gradient of the reference in fp32 on x's values (the bf16 tolerance's yardstick)."""
    x32 = x.detach().float().requires_grad_()
    out = reference.upsample_leaky_relu(x32, size, slope)
    out.backward(grad.float())
    return out.detach(), x32.grad


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,size", CASES, ids=[f"{s}->{z}" for s, z in CASES])
def test_triton_matches_reference_fp32(shape, size, channels_last):
    x = make(shape, torch.float32, channels_last).requires_grad_()
    out = ops.upsample_leaky_relu(x, size, slope=0.2, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(grad)
    want, want_grad = reference_fp32(x, size, 0.2, grad)
    # aten's own formula and order in fp32: the forward agrees to the last bits; the adjoint sums in
    # another (fixed) order.
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == (channels_last and shape[1] > 1)
    assert x.grad.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_triton_bf16_within_twice_torch_error(channels_last):
    """bf16: the kernel's error against fp32 at most 2x that of torch run in bf16, value and gradient."""
    shape, size = (2, 16, 5, 7), (33, 49)
    x = make(shape, torch.bfloat16, channels_last, seed=3).requires_grad_()
    out = ops.upsample_leaky_relu(x, size, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16)
    out.backward(grad)
    want, want_grad = reference_fp32(x, size, 0.2, grad)
    xt = x.detach().clone().requires_grad_()
    torch_out = reference.upsample_leaky_relu(xt, size, 0.2)
    torch_out.backward(grad)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    for ours, theirs, exact in ((out, torch_out, want), (x.grad, xt.grad, want_grad)):
        err = (ours.float() - exact).abs().max()
        assert err <= 2 * max((theirs.float() - exact).abs().max(), 1e-3 * exact.abs().max()), err


@needs_triton
def test_triton_backward_deterministic_and_leaves_inputs():
    x = make((2, 8, 4, 6), torch.float32, True, seed=5).requires_grad_()
    x_before = x.detach().clone()
    grads = []
    for _ in range(2):
        x.grad = None
        out = ops.upsample_leaky_relu(x, (29, 41), backend="triton")
        g = torch.ones_like(out)
        out.backward(g)
        grads.append(x.grad.clone())
        assert torch.equal(g, torch.ones_like(out))
    assert torch.equal(grads[0], grads[1]) and torch.equal(x.detach(), x_before)


@needs_triton
def test_feature_discriminator_on_triton_equals_torch():
    """D_aux at image size with the fused op: same logits and parameter gradients as on torch."""
    torch.manual_seed(0)
    nets = {b: FeatureDiscriminator(in_channels=12, width=16).to(DEVICE) for b in ("torch", "triton")}
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    feat = torch.randn(2, 12, 3, 5, device=DEVICE)
    results = {}
    for backend, net in nets.items():
        net.upsample = ops.UPSAMPLE.first_call(backend, DEVICE)
        out = net(feat, (17, 33))
        assert net.upsample.backend == backend  # no fallback to torch on the first call
        out.square().mean().backward()
        results[backend] = (out.detach(), {k: p.grad for k, p in net.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for k, want in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][k], want, rtol=1e-4, atol=1e-6, msg=k)


@needs_triton
def test_triton_op_registration():
    x = make((1, 4, 2, 3), torch.float32, False).requires_grad_()
    torch.library.opcheck(ops.upsample._upsample_leaky_relu_triton, (x, 5, 7, 0.2))


def test_boundary_checks_name_the_rule():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="at least x's"):
        ops.upsample_leaky_relu(x, (3, 8))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ops.upsample_leaky_relu(x.double(), (8, 8))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.UPSAMPLE.resolve("ext")
    if ops.UPSAMPLE.problem("triton", "cpu") is not None:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.upsample_leaky_relu(x, (8, 8), backend="triton")
    assert ops.UPSAMPLE.resolve("auto", "cpu") == "torch"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(),
                    reason="Triton runs in this process already")
def test_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", "triton and not interpreter"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-4000:]
