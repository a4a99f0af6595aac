"""Checkpoints that survive crashes: temp file + fsync + atomic rename, a "latest" pointer, keep-last-K.

Files in run_dir: ckpt_<step:08d>.pt, latest (a text file naming one of them), and .tmp-* leftovers
of an interrupted write, cleaned at start. Everything loads with weights_only=True: a pickle that
would run code is refused before any of it runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint or "latest" pointer that must not or cannot be loaded; the message says which."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temp files left by a write that was killed; returns what was removed."""
    stale = list(Path(run_dir).glob(".tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save(run_dir: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write ckpt_<step>.pt atomically, point `latest` at it, then drop all but the newest keep_last."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"ckpt_{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(run_dir / "latest", lambda f: f.write(path.name.encode()))
    ckpts = sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest ckpt_*.pt; never a path outside run_dir."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _NAME.match(name):  # a bare file name only: no "../", no absolute path
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this folder "
                                  "(expected ckpt_<8 digits>.pt); fix or delete the file")
        target = run_dir / name
        if target.is_symlink() and target.resolve().parent != run_dir.resolve():
            raise CheckpointError(f"{target} is a link to {target.resolve()}, outside {run_dir}; "
                                  "checkpoints must be files of the run folder itself")
        if target.is_file():
            return target
    ckpts = sorted(p for p in run_dir.glob("ckpt_*.pt") if _NAME.match(p.name)) if run_dir.is_dir() else []
    return ckpts[-1] if ckpts else None


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); a malicious or corrupt file raises."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}".strip()) from e
