"""The three-stage loop end to end on the toy domains: outputs, stage isolation, exact resume, faults."""

import json
import math

import pytest
import torch
from helpers import (
    as_argv,
    assert_same_networks,
    assert_same_optimizers,
    run_step,
    tiny_overrides,
    training_lines,
)

from pwda_fast import adapt, checkpoint, config, engine, evaluate, ops, reference, skips, train, weight_stats
from pwda_fast.data import build_datasets
from pwda_fast.data.loader import train_loader


def run(overrides: dict) -> int:
    return train.main(as_argv(overrides))


def test_few_iterations_write_metrics_checkpoint_and_final(tmp_path, capsys):
    assert run(tiny_overrides(tmp_path)) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [ln["step"] for ln in lines if "seg" in ln]
    assert steps == [1, 2, 3, 4]
    assert {"seg", "adv", "adv_aux", "d", "d_aux", "lr", "it_s"} <= set(lines[0])
    assert checkpoint.latest(tmp_path).name == "ckpt_00000004.pt"
    final = json.loads((tmp_path / "final.json").read_text())
    assert set(final) == {"miou", "iou", "protocol", "build"} and 0.0 <= final["miou"] <= 100.0
    assert final["protocol"] == "single"
    assert "road" in final["iou"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["iters"] == 4
    state = checkpoint.load(checkpoint.latest(tmp_path))
    assert state["backend"] in ops.LOSS.available() and state["world_size"] == 1
    assert state["build"] == final["build"] and state["build"]["kernels"]["loss"] == state["backend"]
    assert config.from_dict(state["config"]).train.iters == 4
    assert "mIoU" in capsys.readouterr().out


def _adapter(weighting="gen+dis", **extra):
    cfg = config.load("toy", {"adapt.weighting": weighting, "data.batch_size": 2, "data.workers": 0,
                              "data.crop": [48, 96], **extra})
    adapter = engine.build(cfg, torch.device("cpu"), backend="torch").adapter
    data = build_datasets(cfg.data)
    src = next(train_loader(data["source"], 2, 0, 0, 1, 0, 0))
    tgt = next(train_loader(data["target"], 2, 1, 0, 1, 0, 0))
    return adapter, src, tgt


@pytest.mark.parametrize("weighting", ["none", "gen", "gen+dis"])
def test_generator_stage_leaves_no_gradient_on_discriminators(weighting):
    adapter, src, tgt = _adapter(weighting)
    losses = {}
    adapter.segmenter_stage(src, losses)
    adapter.generator_stage(tgt, losses)
    nets = adapter.nets
    assert all(p.grad is None for p in nets.d.parameters())
    assert all(p.grad is None for p in nets.d_aux.parameters())
    assert all(p.requires_grad for p in nets.d.parameters())  # unfrozen again for stage 3
    assert all(p.grad is not None for p in nets.g.main_head.parameters())
    src_out = adapter.segmenter_stage(src, losses)
    tgt_out = adapter.generator_stage(tgt, losses)
    g_grads = [p.grad.clone() for p in nets.g.parameters() if p.grad is not None]
    adapter.discriminator_stage(src_out, tgt_out, losses)
    assert any(p.grad is not None for p in nets.d.parameters())
    # Stage 3 feeds detached outputs: G's gradients are untouched by it.
    after = [p.grad for p in nets.g.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(g_grads, after))
    assert (weighting == "gen+dis") == any(p.grad is not None for p in nets.d_aux.parameters())


def test_weighting_map_carries_no_gradient(monkeypatch):
    calls = []
    real = ops.weighted_adv_loss

    def spy(seg, disc, aux=None, **kw):
        calls.append((seg.requires_grad, None if aux is None else aux.requires_grad, disc.requires_grad))
        return real(seg, disc, aux, **kw)

    monkeypatch.setattr(ops, "weighted_adv_loss", spy)
    adapter, src, tgt = _adapter("gen+dis")
    run_step(adapter, 0, src, tgt)
    assert calls == [(False, False, True), (False, False, True)]  # generator stage, then D stage


# MRNet's Stage-I recipe on the toy (whose generator is MRNet's, here at half the toy's width): class
# balance with the running weight `often`, hard pixels, the memory term from the second step, Nesterov
# with warm-up.
RECIPE = {"adapt.class_balance": True, "adapt.often_balance": True, "adapt.hard_pixels": 80.0,
          "adapt.memory_start": 1, "optim.nesterov": True, "optim.warmup_iters": 3, "optim.poly_iters": 100,
          "model.width": 8, "model.head_width": 16, "model.disc_width": 8, "model.aux_disc_width": 16}


def nan_seg_loss_at(monkeypatch, bad: int) -> None:
    """Adapter.launch(bad, ...) gets a NaN segmentation loss (so it is skipped), in every run."""
    real_launch, real_ce = adapt.Adapter.launch, reference.seg_ce
    monkeypatch.setattr(reference, "seg_ce", real_ce)  # put back after the test

    def launch(self, i, source, target):
        reference.seg_ce = (lambda *a: real_ce(*a) * math.nan) if i == bad else real_ce
        return real_launch(self, i, source, target)

    monkeypatch.setattr(adapt.Adapter, "launch", launch)


@pytest.mark.parametrize("recipe, skip", [(False, False), (True, False), (True, True)],
                         ids=["toy", "paper-recipe", "paper-recipe-stopped-after-a-skipped-step"])
def test_stop_and_resume_matches_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, recipe, skip):
    common = {"train.iters": 5, "train.ckpt_every": 100, "train.eval_images": 1, **(RECIPE if recipe else {})}
    if skip:  # the second step is skipped, and the split run stops right after it
        nan_seg_loss_at(monkeypatch, 1)
    assert run(tiny_overrides(tmp_path / "full", **common)) == 0
    assert run(tiny_overrides(tmp_path / "split", **common, **{"train.stop_at": 2})) == 0
    assert checkpoint.latest(tmp_path / "split").name == "ckpt_00000002.pt"
    assert run(tiny_overrides(tmp_path / "split", **common)) == 0
    a = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["step"] == b["step"] == 5
    assert_same_networks(a, b)
    assert_same_optimizers(a, b)
    row = lambda r: (r["seg"], r["skipped"])  # noqa: E731
    full, split = training_lines(tmp_path / "full"), training_lines(tmp_path / "split")
    assert [row(r) for r in full] == [row(r) for r in split]
    assert [r["skipped"] for r in full] == ([0, 1, 1, 1, 1] if skip else [0] * 5)
    if recipe:  # the running class weight has moved away from 1, and resumed where it was
        often = a["adapter"]["often"]
        assert (often != 1).any() and torch.equal(often, b["adapter"]["often"])


def test_source_only_mode_and_evaluate_cli(tmp_path, capsys):
    assert run(tiny_overrides(tmp_path, **{"adapt.mode": "source_only", "train.iters": 2})) == 0
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"seg"} and "adv" not in first
    out_json = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(checkpoint.latest(tmp_path)), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    final = json.loads((tmp_path / "final.json").read_text())
    assert final.pop("build")["kernels"]["loss"] in ops.LOSS.names  # the run's build beside its scores
    assert json.loads(out_json.read_text()) == final
    assert f"{final['miou']:6.2f}" in printed


def test_injected_nan_is_skipped_and_persistent_nan_stops(tmp_path, monkeypatch, capsys):
    real = reference.seg_ce
    calls = {"n": 0}

    def nan_once(logits, labels, *weights):
        calls["n"] += 1
        loss = real(logits, labels, *weights)
        return loss * math.nan if calls["n"] == 3 else loss  # the 2nd step's main-head loss

    monkeypatch.setattr(reference, "seg_ce", nan_once)
    assert run(tiny_overrides(tmp_path / "once")) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()
             if "seg" in ln]
    assert [ln["skipped"] for ln in lines] == [0, 1, 1, 1]
    assert "non-finite loss or gradient (seg=nan" in capsys.readouterr().out

    monkeypatch.setattr(reference, "seg_ce", lambda logits, labels, *w: real(logits, labels, *w) * math.nan)
    code = run(tiny_overrides(tmp_path / "always", **{"train.max_skips": 2}))
    assert code == train.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "2 consecutive non-finite steps from step 1 (first non-finite: the seg loss" in err
    assert "the segmenter diverged first: lower optim.lr (now 0.01)" in err
    assert "random weights (no model.init_weights) with model.bn=train" in err  # the toy trains BN


def test_likely_causes_name_what_the_run_saw():
    paper = config.load("gta5_to_cityscapes", {"train.amp": "bf16"})
    causes = "; ".join(skips.likely_causes(paper, "d"))
    assert "adversarial terms diverged first" in causes and "optim.lr_d (now 0.0001)" in causes
    assert "needs pretrained weights: set model.bn=train" in causes and "train.amp=bf16" in causes


def test_config_errors_exit_2_with_message(tmp_path, capsys):
    assert train.main(["--config", "toy", "--train.itres=3"]) == train.EXIT_CONFIG
    assert "unknown config key 'train.itres'; valid keys in [train]" in capsys.readouterr().err


def test_resume_refuses_other_world_size(tmp_path, capsys):
    assert run(tiny_overrides(tmp_path, **{"train.iters": 2})) == 0
    path = checkpoint.latest(tmp_path)
    state = checkpoint.load(path)
    state["world_size"] = 2
    state["step"] = 1
    checkpoint.save(tmp_path, 1, state)
    assert run(tiny_overrides(tmp_path, **{"train.iters": 3})) == train.EXIT_CONFIG
    assert "was written by 2 processes, this run has 1" in capsys.readouterr().err


def test_missing_dataset_exits_2_showing_the_layout(tmp_path, capsys):
    code = run(tiny_overrides(tmp_path / "run", **{"data.source": "gta5",
                                                   "data.source_root": str(tmp_path / "nowhere")}))
    assert code == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: data: ") and "nowhere" in err and "images" in err


def test_compare_entry_runs_both_modes_and_prints_the_table(tmp_path, capsys):
    """`make train`'s entry on a tiny budget: two ordinary runs, then the side-by-side table."""
    from pwda_fast import compare

    extra = [f"--{k}={json.dumps(v)}" for k, v in tiny_overrides(tmp_path).items()
             if k not in ("train.run_dir", "train.iters")]
    assert compare.main(["--iters", "2", "--runs", str(tmp_path), "--seed", "5", *extra]) == 0
    out = capsys.readouterr().out
    finals = {m: json.loads((tmp_path / f"toy-{m}-s5" / "final.json").read_text())
              for m in ("source_only", "adapt")}
    assert f"{finals['source_only']['miou']:>16.2f}{finals['adapt']['miou']:>16.2f}" in out
    gain = finals["adapt"]["miou"] - finals["source_only"]["miou"]
    assert f"adaptation {'gains' if gain >= 0 else 'loses'} {abs(gain):.2f} mIoU" in out
    d_aux = weight_stats.d_aux_at_end(tmp_path / "toy-adapt-s5")["d_aux_end"]  # the step-2 log line
    assert f"D_aux's loss over the last eighth of training: {d_aux:.3f} (2 ln 2 = 1.386 is chance" in out


def test_evaluation_during_training_logs_miou_at_its_cadence(tmp_path, capsys):
    assert run(tiny_overrides(tmp_path, **{"train.eval_every": 2, "train.eval_images": 2})) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if ln.get("eval")]
    assert [ln["step"] for ln in evals] == [2, 4]  # the cadence, then the final evaluation
    assert 0.0 <= evals[0]["miou"] <= 100.0
    assert f"step 2: target mIoU {evals[0]['miou']:.2f}" in capsys.readouterr().out


def test_evaluating_during_training_does_not_change_training(tmp_path):
    """train.eval_every is result-neutral: an evaluation draws nothing from the training's random
    streams (the toy generator's dropout would show it in the next step's losses)."""
    losses = {}
    for every in (0, 1):
        run_dir = tmp_path / f"every{every}"
        assert run(tiny_overrides(run_dir, **{"train.iters": 3, "train.eval_every": every,
                                               "train.eval_images": 2})) == 0
        lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[every] = [(ln["seg"], ln["d"]) for ln in lines if "seg" in ln]
    assert len(losses[0]) == 3 and losses[1] == losses[0]
