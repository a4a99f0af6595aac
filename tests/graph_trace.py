"""A CPU stand-in for a CUDA-graph capture that replays a trace, not the Python.

`trace_graph(iteration)` runs the iteration once under a dispatch mode that records every aten op it
runs (the forward, the backward passes, the optimizer steps, the restore), with its arguments and
outputs. Each replay re-runs those ops in order on the tensors that live outside the capture (the
parameters, the optimizer state, the static batch buffers, the learning-rate tensors), feeding each
op the replay's own results where the capture used an intermediate. No Python of the iteration runs
again: a decision taken in Python (a monkeypatched loss, a step counter, a flag read from a tensor)
is frozen at capture time exactly as in a CUDA graph, so a test that passes with this stand-in means
the same on CUDA. Ops that wait for the device (host_syncs.py's rules) raise here, as they raise in a
capture. What CPU tensors cannot show: a pageable host-to-device copy inside the step, and a CPU
scalar tensor whose value changes between replays (re-read here, frozen in a CUDA graph).

As on CUDA, capturing does not advance the run: the first replay returns what the capture computed.
"""

from __future__ import annotations

import dataclasses

import torch
from host_syncs import HostSyncs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from pwda_fast.graphs import copied


class _Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))  # keeps every captured tensor alive: ids stay unique
        return out


def trace_graph(iteration):
    """The `capture` argument of graphs.GraphedAdapter: -> replay() like graphs.cuda_graph's."""
    trace, syncs = _Trace(), HostSyncs()
    with syncs, trace:
        static = iteration()
    if syncs.found:  # a capture refuses these (CUDA: "operation not permitted when stream is capturing")
        raise RuntimeError(f"operation not permitted when stream is capturing: {syncs.found[0]}")
    first = [True]

    def replay():
        if first[0]:  # the capture's own run stands for the first replay
            first[0] = False
            return copied(static)
        env: dict[int, torch.Tensor] = {}

        def mapped(x):
            return env.get(id(x), x) if isinstance(x, torch.Tensor) else x
        for func, args, kwargs, out in trace.ops:
            result = func(*tree_map(mapped, args), **tree_map(mapped, kwargs))
            for captured, now in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(captured, torch.Tensor):
                    env[id(captured)] = now
        return copied(dataclasses.replace(static, **{f.name: mapped(getattr(static, f.name))
                                                     for f in dataclasses.fields(static)}))
    return replay
