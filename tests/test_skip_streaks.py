"""train.max_skips counts skipped steps in a row: a good step starts the count again, an fp16
calibration skip (an overflow that lowered the loss scale to 1 or more) does not count.

SkipCounter is driven first with StepReports, which pins its rule exactly; then with real steps of a
toy Adapter on both skip decisions (the fused optimizers' device flag once G's momentum exists, and the
host's with optim.impl=torch), under fp16 down to the scale's last halving that still calibrates (the
16th from 65536, onto 1) and the next; then through train.main, whose step numbers the message uses.
Bad steps come from the data (a NaN in a source image) or from an inf gradient (helpers.InfGrad on
the segmentation logits: every loss finite).
"""

import math

import pytest
import torch
from helpers import InfGrad, as_argv, tiny_overrides, training_lines

from pwda_fast import config, engine, reference, train
from pwda_fast.guard import StepReport
from pwda_fast.skips import NonFiniteError, SkipCounter

CPU = torch.device("cpu")
BATCH_CROP = (32, 64)  # of the `batches` fixture (conftest.py)
TOY = {"model.width": 8, "model.head_width": 16, "model.disc_width": 8, "model.aux_disc_width": 8,
       "data.crop": list(BATCH_CROP), "kernels.loss": "torch"}
pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan
# StepReports by letter: G a good step; S a NaN segmentation loss (every later loss NaN too); D a NaN
# discriminator loss, the earlier ones finite; I an inf gradient with every loss finite; C an fp16
# overflow that halved the scale to 2 (calibration).
REPORTS = {
    "G": StepReport({"seg": 1.5, "adv": 0.7, "d": 1.4}, True, False, None, 0.01),
    "S": StepReport({"seg": NAN, "adv": NAN, "d": NAN}, False, False, None, 0.01),
    "D": StepReport({"seg": 1.5, "adv": 0.7, "d": NAN}, False, False, None, 0.01),
    "I": StepReport({"seg": 1.5, "adv": 0.7, "d": 1.4}, False, False, None, 0.01),
    "C": StepReport({"seg": 1.5, "adv": 0.7, "d": 1.4}, False, True, 2.0, 0.01),
}


def counter(max_skips: int, skipped: int = 0) -> tuple[SkipCounter, list[str]]:
    logged = []
    cfg = config.load("toy", {"train.max_skips": max_skips})
    return SkipCounter(cfg, logged.append, skipped), logged


def feed(skips: SkipCounter, reports) -> tuple[int, str] | None:
    """Record the reports as steps 1, 2, ... -> (the step that raised, its message), or None."""
    for step, report in enumerate(reports, 1):
        try:
            skips.record(step, report)
        except NonFiniteError as e:
            return step, str(e)
    return None


@pytest.mark.parametrize("pattern, max_skips", [
    ("GS" * 40, 2),  # alternating, 40 skips in all
    ("SG" * 40, 2),
    ("SSG" * 20, 3),  # streaks one short of the limit
    ("GIGDGS" * 10, 2),  # each kind of bad step
    ("CCCCSGSCG" * 5, 2),  # calibration between them
])
def test_a_good_step_between_bad_ones_starts_the_count_again(pattern, max_skips):
    skips, _ = counter(max_skips)
    assert feed(skips, [REPORTS[c] for c in pattern]) is None
    assert skips.skipped == len(pattern) - pattern.count("G")
    since_good = pattern[pattern.rfind("G") + 1:]
    assert skips.consecutive == len(since_good.replace("C", ""))


def in_a_row(logged: list[str]) -> list[str]:
    return [line.split("(")[-1] for line in logged if "non-finite" in line]


def test_the_log_counts_in_a_row_and_in_all_from_a_resumed_total():
    skips, logged = counter(3, skipped=5)  # a resumed run: 5 skips before the checkpoint
    assert feed(skips, [REPORTS[c] for c in "SGSSGC"]) is None
    assert in_a_row(logged) == ["1 in a row, 6 in all)", "1 in a row, 7 in all)", "2 in a row, 8 in all)"]
    assert logged[-1] == ("step 6: fp16 gradient overflow; loss scale lowered to 2, skipped all three "
                          "optimizer steps (9 skipped in all)")


@pytest.mark.parametrize("pattern, max_skips, stop, start, first", [
    ("S", 1, 1, 1, "the seg loss"),
    ("GSGSSS", 3, 6, 4, "the seg loss"),
    ("SGSS", 2, 4, 3, "the seg loss"),
    ("GDSS", 3, 4, 2, "the d loss"),  # the streak's first step names it, not the last one
    ("SGIDS", 3, 5, 3, "a gradient, with finite losses"),  # an earlier streak's loss is forgotten
    ("GSCS", 2, 4, 2, "the seg loss"),  # a calibration skip neither counts nor ends a streak
    ("G" + "S" * 20, 20, 21, 2, "the seg loss"),  # the default limit
])
def test_max_skips_in_a_row_stop_naming_the_streak(pattern, max_skips, stop, start, first):
    skips, _ = counter(max_skips)
    step, message = feed(skips, [REPORTS[c] for c in pattern])
    assert step == stop and skips.consecutive == max_skips
    last = ", ".join(f"{k}={v:.3g}" for k, v in REPORTS[pattern[-1]].losses.items())
    assert message.startswith(f"{max_skips} consecutive non-finite steps from step {start} (first "
                              f"non-finite: {first}; last: {last}). Likely causes: ")


def test_calibration_skips_never_stop_a_run_but_an_overflow_below_scale_one_does():
    """The scale starts at 65536 and halves on each overflow: 16 halvings reach 1 and calibrate; the
    17th (to 0.5) is an overflow of the gradients themselves."""
    skips, logged = counter(1)
    overflows = [StepReport({"seg": 1.0}, False, scale >= 1.0, scale, 0.01)
                 for scale in (65536.0 / 2**k for k in range(1, 18))]
    assert [r.scale for r in overflows[-2:]] == [1.0, 0.5]
    assert feed(skips, overflows)[0] == 17
    assert skips.skipped == 17 and logged[15].endswith("loss scale lowered to 1, skipped all three "
                                                       "optimizer steps (16 skipped in all)")


# -- real steps -------------------------------------------------------------------------------------

def nan_source(batch: dict) -> dict:
    """The batch with a NaN in its first image: every loss of the step goes NaN."""
    image = batch["image"].clone()
    image[0, 0, 0, 0] = math.nan
    return {**batch, "image": image}


def take_steps(eng, batches, monkeypatch, pattern: str, skips: SkipCounter,
               first: int = 0) -> list[tuple[bool, StepReport]]:
    """Steps first, first + 1, ..., one per letter (G good, S a NaN source image, I an inf gradient),
    each read and recorded as train.Trainer does (step i reported as i + 1) -> [(decided on the
    device, report)]."""
    out, real = [], reference.seg_ce
    for i, kind in enumerate(pattern, first):
        source, target = batches[i % len(batches)]
        with monkeypatch.context() as m:
            if kind == "I":
                m.setattr(reference, "seg_ce", lambda logits, *a: real(InfGrad.apply(logits), *a))
            on_device = eng.adapter.guard.skips_on_device()
            report = eng.adapter.launch(i, nan_source(source) if kind == "S" else source, target).read()
        out.append((on_device, report))
        skips.record(i + 1, report)
    return out


@pytest.mark.parametrize("impl, device_from", [("auto", 1), ("torch", None)])
def test_real_steps_stop_after_max_skips_in_a_row_on_either_skip_decision(batches, monkeypatch, impl,
                                                                         device_from):
    """optim.impl auto: fused optimizers skip on the device flag from step 1 on (step 0 creates G's
    momentum through the host); optim.impl torch: every skip is decided on the host."""
    eng = engine.build(config.load("toy", {**TOY, "optim.impl": impl}), CPU)
    skips, _ = counter(2)
    steps = take_steps(eng, batches, monkeypatch, "GSGIGSG", skips)  # never 2 in a row: no stop
    assert [r.stepped for _, r in steps] == [c == "G" for c in "GSGIGSG"]
    assert [d for d, _ in steps] == [device_from is not None and i >= device_from for i in range(7)]
    assert skips.skipped == 3 and skips.consecutive == 0
    with pytest.raises(NonFiniteError, match=r"^2 consecutive non-finite steps from step 8 \(first "
                                             r"non-finite: a gradient, with finite losses; last: seg=nan"):
        take_steps(eng, batches, monkeypatch, "IS", skips, first=7)
    assert skips.skipped == 5


@pytest.mark.parametrize("impl, start", [("auto", 0), ("torch", 14)])
def test_fp16_overflows_calibrate_down_to_scale_one_and_the_next_one_counts(batches, monkeypatch, impl,
                                                                            start):
    """Real fp16 steps, each overflowing (inf gradients, finite losses) after a good one: from torch's
    start scale 65536 (impl auto; with impl torch from the scale after 14 halvings, 4), the 16th
    halving lands on 1 and is calibration, the 17th lands on 0.5 and stops a run with
    train.max_skips = 1."""
    eng = engine.build(config.load("toy", {**TOY, "optim.impl": impl, "train.amp": "fp16"}), CPU)
    scaler = eng.adapter.guard.scaler
    eng.adapter.load_state_dict({"scaler": {**scaler.state_dict(), "scale": 65536.0 / 2**start}})
    skips, _ = counter(1)
    steps = take_steps(eng, batches, monkeypatch, "G" + "I" * (16 - start), skips)
    assert [r.scale for _, r in steps] == [65536.0 / 2**k for k in (start, *range(start + 1, 17))]
    assert all(r.calibrating and not r.stepped for _, r in steps[1:]) and steps[-1][1].scale == 1.0
    assert [d for d, _ in steps[1:]] == [impl == "auto"] * (16 - start)
    assert skips.skipped == 16 - start and skips.consecutive == 0
    with pytest.raises(NonFiniteError, match=f"^1 consecutive non-finite steps from step {18 - start} "):
        take_steps(eng, batches, monkeypatch, "I", skips, first=17 - start)
    assert scaler.get_scale() == 0.5


# -- through train.main ---------------------------------------------------------------------------

SEED = 7


def nan_source_images_at(monkeypatch, bad: set[int]) -> None:
    """The source batches of steps `bad` (0-based, as the loader counts) carry a NaN image."""
    real = train.train_batches

    def train_batches(data_cfg, dataset, seed, *args, **kwargs):
        batches = real(data_cfg, dataset, seed, *args, **kwargs)
        return batches if seed != SEED else (nan_source(b) if i in bad else b for i, b in enumerate(batches))

    monkeypatch.setattr(train, "train_batches", train_batches)


def test_a_run_stops_at_max_skips_in_a_row_naming_its_step_numbers(tmp_path, monkeypatch, capsys):
    common = {"train.seed": SEED, "train.max_skips": 2, "train.ckpt_every": 100, "train.eval_images": 1,
              "data.crop": list(BATCH_CROP), "train.threads": 1}
    nan_source_images_at(monkeypatch, {1, 3, 5})
    assert train.main(as_argv(tiny_overrides(tmp_path / "alternating", **common, **{"train.iters": 7}))) == 0
    assert [r["skipped"] for r in training_lines(tmp_path / "alternating")] == [0, 1, 1, 2, 2, 3, 3]
    out = capsys.readouterr().out
    assert [f"step {s}: non-finite" in out for s in range(1, 8)] == [s in (2, 4, 6) for s in range(1, 8)]

    nan_source_images_at(monkeypatch, {1, 3, 5, 6})
    run_dir = tmp_path / "stops"
    code = train.main(as_argv(tiny_overrides(run_dir, **common, **{"train.iters": 9})))
    assert code == train.EXIT_NONFINITE
    assert ("error: 2 consecutive non-finite steps from step 6 (first non-finite: the seg loss; last: "
            "seg=nan") in capsys.readouterr().err
    assert [r["step"] for r in training_lines(run_dir)] == [1, 2, 3, 4, 5, 6]  # step 7 raised before its line
