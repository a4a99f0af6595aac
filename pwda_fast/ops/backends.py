"""One backend table per op, one resolver for all, and the guard training calls a fused op through.

Each op module declares its `OpBackends`: the config key that chooses its kernel, and per backend
the reason it cannot run on a device type (None: it can). "torch" (pwda_fast/reference.py) runs
everywhere; "auto" takes the first backend of the op's preference for the device that can run, else
"torch"; an explicit backend that cannot run raises with its reason.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

Problem = Callable[[str], "str | None"]
"""device type ("cpu", "cuda") -> why the backend cannot run on it, or None."""


@dataclass(frozen=True)
class OpBackends:
    op: str
    """The op's name in pwda_fast.ops."""
    key: str
    """The KernelsConfig field that chooses its backend (kernels.<key>)."""
    what: str
    """The op in words, for FirstCall's warning."""
    problems: dict[str, Problem]
    """The fused backends: name -> why it cannot run on a device type."""
    auto: dict[str, tuple[str, ...]]
    """device type -> the fused backends "auto" tries, in order, before "torch"."""

    @property
    def names(self) -> tuple[str, ...]:
        return ("torch", *self.problems)

    def problem(self, backend: str, device_type: str) -> str | None:
        """Why `backend` cannot run on `device_type` tensors (None when it can); the message says
        what to do."""
        if backend not in self.names:
            raise ValueError(f"{self.op}: backend must be one of {self.names}; got {backend!r}")
        return None if backend == "torch" else self.problems[backend](device_type)

    def available(self) -> list[str]:
        """Backends that can run here on some device (CPU or, when present, CUDA); "torch" always."""
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        return [b for b in self.names if any(self.problem(b, d) is None for d in devices)]

    def resolve(self, backend: str, device: torch.device | str = "cpu") -> str:
        """"auto" -> a concrete backend for `device`; an explicit one that cannot run raises."""
        if backend != "auto" and backend not in self.names:
            raise ValueError(f"{self.op}: backend must be one of {('auto', *self.names)}; got {backend!r}")
        return _resolve(self.op, backend, torch.device(device).type)

    def first_call(self, backend: str, device: torch.device | str = "cpu") -> FirstCall:
        """The backend resolved for `device`, wrapped as training calls it (FirstCall)."""
        return FirstCall(self.resolve(backend, device), self.what)


OPS: dict[str, OpBackends] = {}
"""Every op with backends, by name: filled by the op modules as they are imported."""


def register(table: OpBackends) -> OpBackends:
    OPS[table.op] = table
    return table


# Evaluated once per (op, backend, device type) at trace time under torch.compile: the imports and
# environment look-ups inside would otherwise break the graph.
@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, device_type: str) -> str:
    table = OPS[op]
    if backend == "auto":
        return next((b for b in table.auto.get(device_type, ()) if table.problem(b, device_type) is None),
                    "torch")
    problem = table.problem(backend, device_type)
    if problem is not None:
        raise RuntimeError(problem)
    return backend


def ext_digest() -> str:
    """The first 12 hex digits of the sha256 of the compiled extension pwda_fast._C's file ("" where it
    does not load): two builds of the same source can differ in a result's last bits."""
    try:
        import pwda_fast._C as ext
    except ImportError:
        return ""
    return _file_digest(ext.__file__)


@functools.cache
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# -- the checks the op tables share ---------------------------------------------------------------------

def ext_problem(backend: str, symbol: str, devices: tuple[str, ...] = ("cpu", "cuda")) -> Problem:
    """A C++/CUDA backend: torch.ops.pwda_fast.<symbol> from the compiled pwda_fast._C, on `devices`,
    with a CUDA kernel in the build where the device is CUDA."""
    def problem(device_type: str) -> str | None:
        if device_type not in devices:
            return f"backend {backend!r} runs on {' and '.join(devices)} tensors; got {device_type}"
        try:
            import pwda_fast._C  # noqa: F401  (loading the .so registers torch.ops.pwda_fast.*)
        except ImportError as e:
            return (f"backend {backend!r} needs the compiled extension pwda_fast._C: reinstall with "
                    "`pip install --no-build-isolation -e .` without PWDA_FAST_SKIP_EXT=1 "
                    f"(import error: {e})")
        if device_type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"pwda_fast::{symbol}", "CUDA"):
            return (f"backend {backend!r} has no CUDA kernel in this build of pwda_fast._C: reinstall "
                    "with nvcc on PATH (or CUDA_HOME set) and a CUDA build of torch")
        return None
    return problem


def triton_problem(module: str) -> Problem:
    """The Triton backend of the kernels in pwda_fast.kernels.<module>: CUDA tensors, or CPU tensors
    under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)."""
    def problem(device_type: str) -> str | None:
        # The kernel module itself, not just triton: a tree where pwda_fast.kernels cannot be found, or
        # a triton whose API the kernels do not match, must fall back under "auto", not crash later.
        try:
            importlib.import_module(f"pwda_fast.kernels.{module}")
        except Exception as e:  # any import-time failure, not only ImportError, means "cannot run here"
            return (f"backend 'triton' cannot import its kernels pwda_fast.kernels.{module} "
                    f"({type(e).__name__}: {e}); install triton (pip install triton) and the package")
        if device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
            return None
        return (f"backend 'triton' runs on cuda tensors, or on cpu tensors with TRITON_INTERPRET=1 set "
                f"before triton is imported; got {device_type} tensors")
    return problem


class FirstCall:
    """A resolved backend as training uses it: `guard(lambda backend: op(..., backend=backend), grad_of)`.

    The first call with a fused backend is tried, forward and (once, for the tensors of `grad_of` that
    need a gradient) backward; if either raises (a Triton compile error, a CUDA "no kernel image is
    available" for this GPU, a missing kernel), the op is called again with "torch", one warning names
    the op and the error, and every later call uses "torch": a kernel that has never run on this
    machine costs a warning, not the run. Bad inputs (ValueError) and out-of-memory are not the
    backend's fault and propagate; so does any failure after the first call. `backend` says which
    backend the calls use now (after a fallback, "torch").
    """

    def __init__(self, backend: str, what: str, warn=warnings.warn):
        self.backend, self.what, self.warn = backend, what, warn
        self.proven = backend == "torch"

    def __call__(self, call, grad_of=()):
        if self.proven:
            return call(self.backend)
        try:
            out = call(self.backend)
            wrt = [t for t in grad_of if t.requires_grad]
            if wrt and out.requires_grad:  # the backward kernels too, before the real backward needs them
                torch.autograd.grad(out.float().sum(), wrt, retain_graph=True)
        except (ValueError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:  # compilers and drivers raise many types
            self.warn(f"{self.what}: backend {self.backend!r} failed on its first call "
                      f"({type(e).__name__}: {str(e).strip()[:500]}); going on with backend 'torch'")
            self.backend, self.proven = "torch", True
            return call("torch")
        self.proven = True
        return out
