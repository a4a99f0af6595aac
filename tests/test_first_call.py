"""A fused kernel that fails on its first call (a Triton compile error, a CUDA build without a kernel
image for this GPU) costs the run a warning, not the run: training falls back to the torch path."""

import warnings

import pytest
import torch
from helpers import run_step

from pwda_fast import config, engine, ops

BATCH_CROP = (32, 64)
TINY = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
        "model.aux_disc_width": 8, "data.crop": [32, 64], "adapt.aux_at": "image"}


def test_first_call_falls_back_once_and_later_errors_propagate():
    warnings, calls = [], []

    def op(backend):
        calls.append(backend)
        if backend == "ext":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return backend

    guard = ops.FirstCall("ext", "the op", warn=warnings.append)
    assert [guard(op), guard(op)] == ["torch", "torch"] and calls == ["ext", "torch", "torch"]
    assert warnings == ["the op: backend 'ext' failed on its first call (RuntimeError: CUDA error: no "
                        "kernel image is available for execution on the device); going on with backend "
                        "'torch'"]
    proven = ops.FirstCall("ext", "the op", warn=warnings.append)
    assert proven(lambda backend: backend) == "ext"
    with pytest.raises(RuntimeError, match="later"):  # once it has run, a failure is a real error
        proven(lambda backend: (_ for _ in ()).throw(RuntimeError("later")))


def test_a_backward_that_fails_on_its_first_call_falls_back_too_and_bad_inputs_propagate():
    class BrokenBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no kernel image is available for execution on the device")

    x, warnings_seen = torch.ones(3, requires_grad=True), []

    def op(backend):
        return BrokenBackward.apply(x) if backend == "ext" else x * 2

    guard = ops.FirstCall("ext", "the op", warn=warnings_seen.append)
    out = guard(op, grad_of=(x,))
    assert guard.backend == "torch" and len(warnings_seen) == 1 and "no kernel image" in warnings_seen[0]
    out.sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]  # the probe added nothing to the gradient

    def bad_input(backend):
        raise ValueError("disc_logits must be (N, 1, H, W)")

    with pytest.raises(ValueError, match="disc_logits"):  # the caller's fault, not the backend's
        ops.FirstCall("ext", "the op", warn=warnings_seen.append)(bad_input)
    assert len(warnings_seen) == 1


def test_training_goes_on_with_torch_when_the_fused_ops_fail(batches, monkeypatch, one_thread):
    """The weighted loss (ext) and D_aux's upsample (triton) both fail on their first call: one warning
    each, and the steps equal a run that asked for torch."""
    real_loss, real_upsample = ops.weighted_adv_loss, ops.upsample_leaky_relu

    def broken(real):
        def call(*args, backend, **kwargs):
            if backend != "torch":
                raise RuntimeError(f"{backend} kernel failed to compile")
            return real(*args, backend=backend, **kwargs)
        return call

    runs, caught = {}, {}
    for name in ("fallback", "torch"):
        cfg = config.load("toy", {**TINY, "kernels.loss": "torch"})
        eng = engine.build(cfg, torch.device("cpu"))
        if name == "fallback":
            eng.adapter.adversary.loss_kernel = ops.FirstCall("ext", "the loss")
            eng.nets.d_aux.upsample = ops.FirstCall("triton", ops.UPSAMPLE.what)
            monkeypatch.setattr(ops, "weighted_adv_loss", broken(real_loss))
            monkeypatch.setattr(ops, "upsample_leaky_relu", broken(real_upsample))
        with warnings.catch_warnings(record=True) as caught[name]:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            runs[name] = [run_step(eng.adapter, i, *batches[i % 2])[0] for i in range(3)]
        monkeypatch.undo()
    messages = sorted(str(w.message) for w in caught["fallback"])
    assert len(messages) == 2 and not caught["torch"], messages
    assert "D_aux's fused upsample + leaky ReLU: backend 'triton' failed" in messages[0]
    assert "the loss: backend 'ext' failed on its first call (RuntimeError: ext kernel" in messages[1]
    assert runs["fallback"] == runs["torch"]
