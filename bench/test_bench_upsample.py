"""pytest-benchmark suite: upsample_leaky_relu (D_aux's first activation at image size), eager vs
torch.compile vs Triton, forward and forward+backward (the gradient w.r.t. the input).

    python -m pytest bench/test_bench_upsample.py --bench-device=cuda --bench-rows=rows.jsonl

The paper step's call on CUDA: D_aux's first conv output (2, 256, 65, 129) bf16, channels_last,
upsampled to 512x1024 (the generator stage passes the 2 target images, the discriminator stage 4); on
CPU a tiny stand-in, where Triton (its interpreter is a correctness tool) is not timed. Providers
interleaved (conftest.py); on CUDA each also gets its device time and device operations per call.
Minimal bytes: read x, write the output; for fwd+bwd also read the upstream gradient and the output,
write x's gradient.
"""

import common
import pytest
import torch

from pwda_fast import ops, reference

SUITE = "upsample"
CASES = {"cuda": ((2, 256, 65, 129), (512, 1024), torch.bfloat16),
         "cpu": ((1, 8, 9, 17), (65, 129), torch.float32)}
ROUNDS, CALLS = 10, 5  # --bench-rounds, --bench-calls when not given
PROVIDERS = ("eager", "compile", "triton")


def make_provider(name: str):
    if name == "eager":
        return lambda x, size: reference.upsample_leaky_relu(x, size, 0.2)
    if name == "compile":
        compiled = torch.compile(reference.upsample_leaky_relu, dynamic=False)
        return lambda x, size: compiled(x, size, 0.2)
    return lambda x, size: ops.upsample_leaky_relu(x, size, backend="triton")


def minimal_bytes(shape, size, dtype, mode: str) -> int:
    n, c, h, w = shape
    small, big = n * c * h * w, n * c * size[0] * size[1]
    elements = small + big + (2 * big + small if mode == "fwd+bwd" else 0)
    return elements * torch.empty((), dtype=dtype).element_size()


def problem(name: str, device: str) -> str | None:
    if name != "triton":
        return None
    if device != "cuda":
        return "Triton on CPU runs in its interpreter: a correctness tool, not a benchmark"
    return ops.UPSAMPLE.problem("triton", device)


@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_upsample_leaky_relu(record, round_robin, request, copy_gb_per_s, provider, mode):
    config = request.config
    device = config.getoption("bench_device")
    if problem(provider, device):
        pytest.skip(problem(provider, device))
    shape, size, dtype = CASES[device]
    rounds, calls = config.getoption("bench_rounds") or ROUNDS, config.getoption("bench_calls") or CALLS
    warmup = config.getoption("bench_warmup")

    def measure(selected):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        provider_fn = {name: make_provider(name) for name, _ in selected if problem(name, device) is None}

        def call(name, mode):
            fn = common.injected_failure if name == config.getoption("bench_fail") else provider_fn[name]
            if mode == "fwd":
                return lambda: fn(x, size)

            def run():
                x.grad = None
                out = fn(x, size)
                out.backward(torch.ones_like(out))
            return run

        calls_of = {key: call(*key) for key in selected if key[0] in provider_fn}
        return common.measure(calls_of, device, rounds, warmup, calls)

    result = dict(round_robin.result(request, ("provider", "mode"), measure))
    group = f"{shape} -> {size} {str(dtype).removeprefix('torch.')} channels_last {mode}"
    record(result.pop("samples_s"), group, provider, **result, bytes=minimal_bytes(shape, size, dtype, mode),
           copy_gb_per_s=copy_gb_per_s,
           note=f"upsample_leaky_relu: every provider and mode timed in the same {rounds} rounds after "
                f"{warmup} untimed call(s); {calls} back-to-back calls per sample.")
