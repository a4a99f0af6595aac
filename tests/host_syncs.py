"""A recorder of the operations that make the host wait for a CUDA device, usable on CPU.

On CUDA the host waits for the device whenever it needs a value the device computes: a Python number
read from a tensor (.item(), float(), bool(), .tolist(), .cpu()), or an output whose shape depends on
the data (nonzero, boolean-mask indexing, masked_select, unique, ...), whose size the host must read
before it can allocate. Such an op inside the training step blocks the host until the device has
caught up, and inside a CUDA-graph capture it raises. Those same aten ops run on CPU tensors, so
recording them while the step runs on CPU proves the step sync-free before any GPU sees it.

    with HostSyncs() as syncs:
        adapter.launch(step, source, target)
    assert not syncs.found, syncs.report()

Each finding names the op, why it waits, and the innermost line of pwda_fast (or kernels/) that led
to it. `syncs.allowed(why)` lets a region through by design (the one-step-late read of the losses).
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

READS = "reads a Python number from a device tensor"
SHAPE = "has an output shape that depends on the data (the host reads a count from the device)"

# aten overload packet name -> why it waits for the device on CUDA.
ALWAYS = {
    "_local_scalar_dense": READS,  # .item(), float(t), bool(t), int(t), `if t:`
    "is_nonzero": READS,
    "equal": READS,  # torch.equal returns a Python bool
    "allclose": READS,
    "nonzero": SHAPE,
    "argwhere": SHAPE,
    "masked_select": SHAPE,
    "masked_scatter": SHAPE,
    "masked_scatter_": SHAPE,
    "_unique": SHAPE,
    "_unique2": SHAPE,
    "unique_dim": SHAPE,
    "unique_consecutive": SHAPE,
    "unique_dim_consecutive": SHAPE,
    "bincount": SHAPE,  # its length is max(input) + 1
    "histc": READS,  # min == max == 0 makes it read the range from the device
}
# Tensor methods seen at the Python level (they leave no aten op on a CPU tensor).
METHODS = {"tolist": READS, "numpy": READS, "cpu": "copies a device tensor to the host and waits for it"}


@dataclass
class Sync:
    op: str
    why: str
    where: str  # "pwda_fast/reference.py:104 in seg_ce"

    def __str__(self) -> str:
        return f"{self.op} {self.why}, called from {self.where}"


def _our_frame() -> str:
    """The innermost frame of the project's own code on the stack (the line to fix)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        for root in ("/pwda_fast/", "/kernels/"):
            if root in path and not path.endswith("tests/host_syncs.py"):
                return f"{root.strip('/')}/{path.split(root, 1)[1]}:{frame.lineno} in {frame.name}"
    return "(no pwda_fast frame on the stack)"


def _mask_indexed(args) -> bool:
    """aten.index / index_put with a bool or uint8 index: a nonzero under the hood."""
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, recorder: HostSyncs):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        why = ALWAYS.get(name)
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and _mask_indexed(args):
            why = "indexes with a boolean mask (a nonzero: " + SHAPE + ")"
        if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            why = SHAPE
        if why:
            self.recorder.note(f"aten.{name}", why)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, recorder: HostSyncs):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in METHODS and getattr(func, "__self__", None) is None:
            self.recorder.note(f"Tensor.{name}", METHODS[name])
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """Context manager: records every host-syncing op run inside it (see the module docstring)."""

    def __init__(self):
        self.found: list[Sync] = []
        self._allowed = 0
        self._modes = (_Function(self), _Dispatch(self))

    def note(self, op: str, why: str) -> None:
        if not self._allowed:
            self.found.append(Sync(op, why, _our_frame()))

    @contextlib.contextmanager
    def allowed(self, why: str):
        """A region that may sync by design; `why` documents it at the call site."""
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        lines = sorted({str(s) for s in self.found})
        return f"{len(self.found)} host sync(s) in the step:\n  " + "\n  ".join(lines)
