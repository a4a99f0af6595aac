"""pytest-benchmark suite: one whole PWDA train step, the engine vs the eager AdaptSegNet fp32 loop.

    python -m pytest bench/test_bench_step.py --bench-rows=bench/results/cpu.jsonl   # (make bench)

Providers (bench_step.py, same networks, initial weights and random batches): the eager fp32 NCHW
loop written the AdaptSegNet way, and pwda_fast's engine as training builds it, channels_last, in
fp32 and with bf16 autocast (skipped on a CPU that would only emulate bf16), on CUDA also bf16 with
CUDA graphs; with --bench-step-compile also the engine with torch.compile(G). Networks:
--bench-preset, the toy preset on CPU (batch 4+4, 96x192 crops), the paper's (DeepLab-v2 R101,
512x1024) on CUDA. All providers are timed in the same rounds (conftest.py), each sample
--bench-iters iterations back to back; a provider that fails to build or raises is recorded with its
error while the others are timed. Where the graphs provider runs, its first 6 steps are compared with
its eager twin's before the timing (a "graphs_agreement" fact row; they also warm it up: it captures
at step 3).
"""

import bench_step
import common
import pytest
import torch

from pwda_fast import distributed, ops

SUITE = "step"
PROVIDERS = {  # test id -> bench_step's provider label
    "eager": bench_step.EAGER,
    "engine-fp32": "engine fp32 channels_last",
    "engine-bf16": "engine bf16 channels_last",
    "engine-bf16-graphs": "engine bf16 channels_last + CUDA graphs",
    "engine-bf16-compile": "engine bf16 channels_last + compile",
}
ROUNDS = 5  # --bench-rounds when not given: 5 rounds x 4 iterations, BENCHMARKS.md's idle-machine run


def provider_problem(name: str, device: str, compile_opted_in: bool) -> str | None:
    """Why provider `name` (a PROVIDERS label) is not timed here, or None."""
    if "compile" in name and not compile_opted_in:
        return "opt-in with --bench-step-compile: inductor's warm-up of the generator takes minutes"
    if "CUDA graphs" in name and device != "cuda":
        return "CUDA graphs need a CUDA device"
    if "bf16" in name and device == "cpu" and not distributed.cpu_has_bf16():
        return ("this CPU has no native bf16 (AVX-512 BF16 or AMX): autocast would emulate it, a "
                "configuration training warns against")
    return None


@pytest.mark.parametrize("provider", list(PROVIDERS.values()), ids=list(PROVIDERS))
def test_train_step(record, round_robin, request, write_row, provider):
    config = request.config
    device = config.getoption("bench_device")
    compile_g = config.getoption("bench_step_compile")
    problem = provider_problem(provider, device, compile_g)
    if problem is not None:
        pytest.skip(problem)
    preset = config.getoption("bench_preset") or ("paper" if device == "cuda" else "toy")
    rounds, warmup = config.getoption("bench_rounds") or ROUNDS, config.getoption("bench_warmup")
    iters = config.getoption("bench_iters")
    base, ctors = bench_step.providers(preset, torch.device(device), compile_g=compile_g)

    def measure(selected):
        provs, errors = {}, {}
        for (name,) in selected:  # each provider built alone: one that fails to build is its own row
            if provider_problem(name, device, compile_g) is not None:
                continue
            try:
                provs[name] = ctors[name]()
            except Exception as e:
                errors[name] = common.error_text(e)
            if name == config.getoption("bench_fail") and name in provs:
                provs[name].step = common.injected_failure
        batches = bench_step.make_batches(base, iters, torch.device(device))
        agreement = bench_step.graphs_agreement(provs, batches)
        if agreement:
            write_row({"kind": "fact", "name": "graphs_agreement", **agreement})
        times = bench_step.interleaved_steps(provs, batches, torch.device(device), rounds, warmup, errors)
        out = {(name,): {"samples_s": ts} for name, ts in times.items()}
        out.update({(name,): error for name, error in errors.items()})  # a failure wins over its samples
        return out

    result = round_robin.result(request, ("provider",), measure)
    b, (h, w) = base.data.batch_size, base.data.crop
    record(result["samples_s"], f"step {preset} batch {b}+{b} {h}x{w}", provider, images_per_step=2 * b,
           note=f"Preset {preset} (depth {base.model.depth}, width {base.model.width}), batch {b}+{b} "
                f"(source + target) at {h}x{w}, weighted-loss backend {ops.LOSS.resolve('auto', device)}. "
                f"{rounds} samples per provider, each {iters} iterations back to back up to one device "
                f"sync (as training queues them), the providers interleaved round by round, after {warmup} "
                f"untimed iterations; images/s = {2 * b} / median per iteration.")
