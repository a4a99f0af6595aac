"""The output-space adversaries, picked by adapt.adversary: each owns its discriminators, the generator
stage's adversarial loss, the discriminator stage's loss, its config rule and the diagnosis of its
loss terms. adapt.Adapter runs the schedule, the segmenter stage, G's target forward and the memory
term, and asks the adversary for the rest; it knows none of them by name.

    "pwda"   the paper's: AdaptSegNet's BCE D on the main head, D_aux on the features, the pixel
             weighting of eqs. 3-9 (adversaries/pwda.py)
    "mrnet"  MRNet as published: its LSGAN multi-scale D1 (aux head) + D2 (main head) with a gradient
             penalty, no weighting (adversaries/mrnet.py)

A new adversary is a module here with a class like those two, and a line in ADVERSARIES (and its name
in settings.AdaptConfig.adversary's Literal, which the config's type check reads).
"""

from __future__ import annotations

from pwda_fast.adversaries.base import Adversary
from pwda_fast.adversaries.mrnet import MRNetAdversary
from pwda_fast.adversaries.pwda import PaperAdversary

ADVERSARIES: dict[str, type[Adversary]] = {cls.name: cls for cls in (PaperAdversary, MRNetAdversary)}


def get(name: str) -> type[Adversary]:
    """adapt.adversary -> its class; ValueError naming the known ones."""
    if name not in ADVERSARIES:
        raise ValueError(f"adapt.adversary must be one of {sorted(ADVERSARIES)}; got {name!r}")
    return ADVERSARIES[name]


__all__ = ["ADVERSARIES", "Adversary", "MRNetAdversary", "PaperAdversary", "get"]
