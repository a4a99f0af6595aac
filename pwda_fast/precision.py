"""The autocast precisions of train.amp, shared by training (adapt) and inference."""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, amp: str):
    """train.amp ("none" | "bf16" | "fp16") -> the autocast context of that precision."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
