"""Reading a file of tensors that someone else may have written: torch.load with weights_only=True,
and its failures said in our words.

torch's own message for a refused file advises weights_only=False, the one thing not to do with a file
one did not write; checkpoints, warm-start weights and exported generators all come through here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

OURS = "pwda_fast never writes such files: it was written by something else or modified"


def load(path: str | Path, *, what: str, kind: str, error: type[Exception], refused: str = OURS,
         map_location="cpu"):
    """torch.load(path, weights_only=True); a refused, damaged or foreign file raises `error` with a
    message that starts with `what` (e.g. "cannot load checkpoint runs/x/ckpt_00000010.pt"), says it
    is not a `kind` when damaged and, when refused for the objects it holds, ends with `refused`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # no code was refused: a damaged or foreign file
            raise error(f"{what}: UnpicklingError: the file is truncated, damaged or not a {kind}") from e
        raise error(f"{what}: UnpicklingError: it holds Python objects other than tensors and plain "
                    f"containers, which could run code when loaded, so it is refused; {refused}") from e
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip() and "weights_only" not in ln), "")
        detail = f" ({first[:160]})" if first else ""
        raise error(f"{what}: {type(e).__name__}: the file is truncated, damaged or not a "
                    f"{kind}{detail}") from e
