"""skips.likely_causes: for the loss that went non-finite first, the diagnosis names the setting that
weights or steps that loss, with its value in this run's config.

One row per loss term of each adversary: the paper's ("pwda") and MRNet's ("mrnet"), which log the
same names with different weights. Every lambda and rate gets a value of its own, so a diagnosis that
names the right key beside another key's value fails as well as one that names the wrong key.
"""

import math
import re

import pytest
import torch
from helpers import run_step

from pwda_fast import config, engine, skips

BATCH_CROP = (32, 64)  # of the `batches` fixture (conftest.py)
DISTINCT = {"optim.lr": 0.0123, "optim.lr_d": 0.000456, "adapt.lambda_adv": 0.00781,
            "adapt.lambda_aux": 0.00352, "adapt.lambda_mrnet_main": 0.00213,
            "adapt.lambda_mrnet_aux": 0.000917, "adapt.lambda_mem": 0.271, "adapt.lambda_seg": 0.137}
ADVERSARY = {"pwda": {"adapt.adversary": "pwda", "adapt.weighting": "gen+dis"},
             "mrnet": {"adapt.adversary": "mrnet", "adapt.weighting": "none"}}
OWN_LAMBDAS = {"pwda": {"adapt.lambda_adv", "adapt.lambda_aux"},
               "mrnet": {"adapt.lambda_mrnet_main", "adapt.lambda_mrnet_aux"}}

# (adversary, first non-finite loss) -> the keys that govern it: the lambda that weights a generator
# term, the learning rate of the network a term trains.
GOVERNS = {
    ("pwda", "seg"): {"optim.lr"},
    ("pwda", "adv"): {"adapt.lambda_adv"},
    ("pwda", "adv_aux"): {"adapt.lambda_aux"},
    ("pwda", "mem"): {"adapt.lambda_mem"},
    ("pwda", "d"): {"optim.lr_d"},
    ("pwda", "d_aux"): {"optim.lr_d"},
    ("mrnet", "seg"): {"optim.lr"},
    ("mrnet", "adv"): {"adapt.lambda_mrnet_main"},  # D2, on the main head
    ("mrnet", "adv_aux"): {"adapt.lambda_mrnet_aux"},  # D1, on the aux head
    ("mrnet", "mem"): {"adapt.lambda_mem"},
    ("mrnet", "d"): {"optim.lr_d"},
    ("mrnet", "d_aux"): {"optim.lr_d"},
}


def run_config(adversary: str, **extra) -> config.Config:
    return config.load("toy", {**DISTINCT, **ADVERSARY[adversary], "adapt.memory": True,
                               "adapt.memory_start": 0, **extra})


def named(causes: list[str]) -> dict[str, str]:
    """{"optim.lr_d": "0.000456", ...}: each key the causes tell to lower, with the value shown for it
    ("lower adapt.a / adapt.b (now 1 / 2)" pairs the names and values in order)."""
    out = {}
    pattern = r"((?:adapt|optim)\.\w+(?: / (?:adapt|optim)\.\w+)*) \(now ([^)]*)\)"
    for names, values in re.findall(pattern, "; ".join(causes)):
        out.update(zip(names.split(" / "), values.split(" / "), strict=True))
    return out


@pytest.mark.parametrize("adversary, term", list(GOVERNS))
def test_each_term_names_the_setting_that_governs_it_with_its_value(adversary, term):
    cfg = run_config(adversary)
    shown = named(skips.likely_causes(cfg, term))
    for key in GOVERNS[adversary, term]:
        section, name = key.split(".")
        assert shown.get(key) == f"{getattr(getattr(cfg, section), name):g}", (key, shown)
    other = OWN_LAMBDAS["mrnet" if adversary == "pwda" else "pwda"]
    assert not other & shown.keys(), f"names the other adversary's weights: {shown}"


@pytest.mark.parametrize("adversary", sorted(ADVERSARY))
def test_the_table_has_a_row_for_every_loss_a_step_logs(adversary, batches, one_thread):
    """The terms come from a real step (memory on, the paper's adversary with D_aux), so a loss term
    added to the Adapter later needs a row here."""
    cfg = run_config(adversary, **{"model.width": 8, "model.head_width": 16, "model.disc_width": 8,
                                   "model.aux_disc_width": 8, "data.crop": list(BATCH_CROP),
                                   "kernels.loss": "torch"})
    losses, stepped = run_step(engine.build(cfg, torch.device("cpu")).adapter, 0, *batches[0])
    assert stepped and all(math.isfinite(v) for v in losses.values())
    assert set(losses) == {t for a, t in GOVERNS if a == adversary}


def test_a_gradient_with_finite_losses_still_gets_a_diagnosis():
    causes = skips.likely_causes(run_config("pwda"), None)
    assert causes[-1] == "a bad file: data.validate=full checks every file"
    assert named(causes) == {"optim.lr": "0.0123"}


@pytest.mark.parametrize("bn, init, amp, want, absent", [
    ("train", "", "none", "the generator starts from random weights (no model.init_weights) with "
     "model.bn=train; ", ["needs pretrained", "train.amp"]),
    ("stats", "", "bf16", "model.bn=stats, which needs pretrained weights: set model.bn=train; "
     "train.amp=bf16: retry with train.amp=none", []),
    ("frozen", "w.pth", "fp16", "train.amp=fp16: retry with train.amp=none", ["random weights"]),
])
def test_the_run_wide_causes_follow_the_config(bn, init, amp, want, absent):
    cfg = run_config("pwda", **{"model.bn": bn, "train.amp": amp})
    cfg.model.init_weights = init  # likely_causes reads the setting only: no file needed
    text = "; ".join(skips.likely_causes(cfg, "seg"))
    assert want in text and not [a for a in absent if a in text], text
