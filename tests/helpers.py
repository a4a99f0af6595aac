"""Helpers shared by the tests (fixtures live in conftest.py)."""

import json
import math
from pathlib import Path

import torch

from pwda_fast import checkpoint, config
from pwda_fast.data import build_datasets
from pwda_fast.data.loader import train_loader


def tiny_overrides(run_dir, **extra) -> dict:
    """A toy run small enough for a test: few steps, 2-image batches, no worker processes."""
    overrides = {"train.run_dir": str(run_dir), "train.iters": 4, "train.eval_every": 0,
                 "train.ckpt_every": 2, "train.log_every": 1, "data.batch_size": 2, "data.workers": 0,
                 "data.crop": [48, 96]}
    overrides.update(extra)
    return overrides


def run_step(adapter, step: int, source: dict, target: dict | None) -> tuple[dict, bool]:
    """One iteration launched and read at once -> ({loss name: float}, stepped)."""
    report = adapter.launch(step, source, target).read()
    return report.losses, report.stepped


def as_argv(overrides: dict) -> list[str]:
    return ["--config", "toy"] + [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]


def training_lines(run_dir) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (evaluation lines left out)."""
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "seg" in ln]


def assert_same_networks(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical G, D and D_aux weights."""
    for net in ("g", "d", "d_aux"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"


def assert_same_optimizers(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical optimizer states."""
    for opt in ("opt_g", "opt_d", "opt_d_aux"):
        for pid, st in a[opt]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b[opt]["state"][pid][k]), f"{opt} state {pid}.{k} differs"


class InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward: a gradient overflow (fp16) or a non-finite
    gradient with every loss finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class Payload:
    """Unpickles by writing "the pickle ran" to `marker`: a checkpoint holding it runs code if loaded
    with full unpickling, which must not happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def disk_full_on_save(monkeypatch) -> None:
    """checkpoint's torch.save writes part of a file, then fails as a full disk would."""

    def fails(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", fails)


def toy_batches(crop, n: int = 2) -> list[tuple[dict, dict]]:
    """n (source, target) batches of 2 from the toy pair at `crop` (H, W), the same on every call."""
    data = build_datasets(config.load("toy", {"data.crop": list(crop)}).data, None, lambda msg: None)
    src, tgt = train_loader(data["source"], 2, 3, 0, 1, 0, 0), train_loader(data["target"], 2, 4, 0, 1, 0, 0)
    return [(next(src), next(tgt)) for _ in range(n)]
