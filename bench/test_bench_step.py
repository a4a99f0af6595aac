"""pytest-benchmark suite: one whole PWDA train step, the engine vs the eager AdaptSegNet fp32 loop.

    python -m pytest bench/test_bench_step.py --benchmark-json=bench/results/step-cpu.json  # make bench

Providers (bench_step.py, same networks, initial weights and random batches): the eager fp32 NCHW
loop written the AdaptSegNet way, and pwda_fast's engine as training builds it, channels_last, in
fp32 and with bf16 autocast (skipped on a CPU that would only emulate bf16); with
--bench-step-compile also the engine with torch.compile(G). Networks: --bench-preset, the toy
preset on CPU (batch 4+4, 96x192 crops), the paper's (DeepLab-v2 R101, 512x1024) on CUDA. All
providers are timed in the same rounds (conftest.py), each iteration one sample.
"""

import bench_step
import pytest
import torch

from pwda_fast import distributed, ops

PROVIDERS = {  # test id -> bench_step's provider label
    "eager": bench_step.EAGER,
    "engine-fp32": "engine fp32 channels_last",
    "engine-bf16": "engine bf16 channels_last",
    "engine-bf16-compile": "engine bf16 channels_last + compile",
}
ROUNDS = 5  # --bench-rounds when not given: 5 rounds x 4 iterations, BENCHMARKS.md's idle-machine run


def provider_problem(name: str, device: str, compile_opted_in: bool) -> str | None:
    """Why provider `name` (a PROVIDERS label) is not timed here, or None."""
    if "compile" in name and not compile_opted_in:
        return "opt-in with --bench-step-compile: inductor's warm-up of the generator takes minutes"
    if "bf16" in name and device == "cpu" and not distributed.cpu_has_bf16():
        return ("this CPU has no native bf16 (AVX-512 BF16 or AMX): autocast would emulate it, a "
                "configuration training warns against")
    return None


@pytest.mark.parametrize("provider", list(PROVIDERS.values()), ids=list(PROVIDERS))
def test_train_step(record, round_robin, request, provider):
    config = request.config
    device = config.getoption("bench_device")
    compile_g = config.getoption("bench_step_compile")
    problem = provider_problem(provider, device, compile_g)
    if problem is not None:
        pytest.skip(problem)
    preset = config.getoption("bench_preset") or ("paper" if device == "cuda" else "toy")
    rounds, warmup = config.getoption("bench_rounds") or ROUNDS, config.getoption("bench_warmup")
    base, ctors = bench_step.providers(preset, torch.device(device), compile_g=compile_g)

    def measure(selected):
        provs = {name: ctors[name]() for (name,) in selected
                 if provider_problem(name, device, compile_g) is None}
        batches = bench_step.make_batches(base, config.getoption("bench_iters"), torch.device(device))
        times = bench_step.interleaved_steps(provs, batches, torch.device(device), rounds, warmup)
        return {(name,): ts for name, ts in times.items()}

    samples = round_robin.samples(request, ("provider",), measure)
    b, (h, w) = base.data.batch_size, base.data.crop
    record(samples, f"step {preset} batch {b}+{b} {h}x{w}", suite="step", device=device, provider=provider,
           preset=preset, batch=b, crop=[h, w], depth=base.model.depth, width=base.model.width,
           images_per_step=2 * b, loss_backend=ops.LOSS.resolve("auto", device),
           iterations_per_round=config.getoption("bench_iters"), warmup=warmup)
