"""train.cuda_graphs: the training iteration replayed as one CUDA graph.

Training shapes are static (fixed crops, fixed batch), so once the iteration has run eagerly a few
times, all of it (the three stages, their backward passes, the skip decision on the device flag, the
fused optimizer steps, the BatchNorm restore) is captured once and replayed every step: one launch
instead of thousands, and no host work per kernel. What changes from step to step lives in device
tensors written before each replay: the batches (copied into the capture's static buffers) and the
learning rates (Adapter.set_lr fills them). What the iteration decides in Python from the step number
(Adapter.phase: the preheat's weighting, the memory term's weight) is fixed in a capture, so a new
phase is captured anew: at most three captures in a run.

Steps that decide on the host run eagerly: the first `warmup` (cuDNN and the allocator settle, and G's
first optimizer step creates its momentum: guard.StepGuard.skips_on_device), and the first step of every phase
(its kernels compile, and Triton autotunes, outside a capture: autotuning times kernels with events
and syncs, which a capture refuses). A capture that fails does not take the run down: the run goes on
eagerly, with one warning that names the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable

import torch

from pwda_fast.adapt import Adapter
from pwda_fast.guard import StepResult

Replay = Callable[[], StepResult]


def cuda_graph(iteration: Callable[[], StepResult]) -> Replay:
    """Capture `iteration` (run once, recorded, not executed) -> replay(): runs the recorded kernels
    and returns their results, copied out of the graph's static outputs (the next replay overwrites
    those while the caller may still be about to read these)."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        # thread_local: the loader's pin-memory thread may call cudaHostAlloc / cudaEventQuery while this
        # thread captures; in the default "global" mode those calls invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # on torch's own side stream
            static = iteration()
    except BaseException:
        # torch.cuda.graph's exit ends the capture before it restores the stream, with nothing between:
        # when ending an invalidated capture raises, the thread would stay on the capture stream.
        torch.cuda.set_stream(stream)
        raise

    def replay() -> StepResult:
        graph.replay()
        return copied(static)
    return replay


def copied(result: StepResult) -> StepResult:
    """The result with each of its tensors cloned out of the graph's static outputs."""
    return dataclasses.replace(result, **{f.name: v.clone() for f in dataclasses.fields(result)
                                          if torch.is_tensor(v := getattr(result, f.name))})


class GraphedAdapter:
    """An Adapter whose `launch` replays a captured iteration; everything else is the Adapter's.

    capture: how an iteration becomes a replay (cuda_graph; tests pass `lambda it: it`, which replays
    by running the iteration eagerly, to check everything around the capture on CPU).
    """

    def __init__(self, adapter: Adapter, warmup: int = 3, capture: Callable = cuda_graph, log=warnings.warn):
        self.adapter, self.warmup, self.capture, self.log = adapter, warmup, capture, log
        self.eager = 0
        self.phases_run: set = set()  # phases that have run eagerly at least once
        self.captured: tuple | None = None  # (phase, static batches, replay)
        self.failed: str | None = None  # why capturing was given up: the rest of the run is eager

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def launch(self, step: int, source: dict, target: dict | None) -> StepResult:
        a = self.adapter
        phase = a.phase(step)
        if (self.failed or self.eager < self.warmup or phase not in self.phases_run
                or not a.guard.skips_on_device()):
            self.eager += 1
            self.phases_run.add(phase)
            with _side_stream(a.device):  # as torch asks of the iterations before a capture
                return a.launch(step, source, target)
        if self.captured is None or self.captured[0] != phase:
            self.captured = None  # the previous phase's graph and its memory go first
            try:
                self.captured = phase, *self._capture(step, source, target)
            except Exception as e:  # a capture records, it runs no kernel: the tensors are as they were
                self.failed = f"{type(e).__name__}: {e}".strip()
                self.log(f"train.cuda_graphs: capturing the step failed at step {step}, so the run goes "
                         f"on without graphs (eager, same results). Cause: {self.failed}")
                return self.launch(step, source, target)
        _, (static_source, static_target), replay = self.captured
        _copy_into(static_source, source)
        if target is not None:
            _copy_into(static_target, target)
        lr = a.set_lr(step)
        return dataclasses.replace(replay(), lr=lr)

    def _capture(self, step: int, source: dict, target: dict | None):
        a = self.adapter
        # The captured optimizer steps read their learning rates from the device: fp32 on CUDA, where
        # the fused kernels read fp32 (as they round a number lr), fp64 where they read a double.
        dtype = torch.float32 if a.device.type == "cuda" else torch.float64
        for opt in a.opt:
            for group in opt.param_groups:
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(group["lr"], dtype=dtype, device=a.device)
                if isinstance(opt, torch.optim.Adam):
                    # Adam refuses a capture unless capturable (its step count then stays on the
                    # device); the fused kernel computes the same either way.
                    group["capturable"] = True
        static = tuple(_static(batch, a.device) if batch is not None else None for batch in (source, target))
        lr = a.set_lr(step)
        return static, self.capture(lambda: a.iteration(step, *static, lr))


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """On CUDA: run the block on a side stream that starts after, and is waited for by, the current
    one. Elsewhere: nothing."""
    if device.type != "cuda":
        yield
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _static(batch: dict, device: torch.device) -> dict:
    """The batch's tensors as buffers on the device that each step's batch is copied into."""
    return {k: v.to(device, copy=True) for k, v in batch.items() if torch.is_tensor(v)}


def _copy_into(static: dict, batch: dict) -> None:
    for key, buffer in static.items():
        buffer.copy_(batch[key], non_blocking=True)
