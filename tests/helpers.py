"""Helpers shared by the tests (fixtures live in conftest.py)."""

import json


def tiny_overrides(run_dir, **extra) -> dict:
    """A toy run small enough for a test: few steps, 2-image batches, no worker processes."""
    overrides = {"train.run_dir": str(run_dir), "train.iters": 4, "train.eval_every": 0,
                 "train.ckpt_every": 2, "train.log_every": 1, "data.batch_size": 2, "data.workers": 0,
                 "data.crop": [48, 96]}
    overrides.update(extra)
    return overrides


def as_argv(overrides: dict) -> list[str]:
    return ["--config", "toy"] + [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
