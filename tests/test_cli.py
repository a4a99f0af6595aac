"""The command line as a user meets it: --help, --print-config, bad values, resume safety, corrupt files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import as_argv, tiny_overrides

from pwda_fast import checkpoint, config, evaluate, ops, train

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_presets_overrides_and_every_key(capsys):
    for flag in ("--help", "-h"):
        assert train.main([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: pwda-train") and "gta5_to_cityscapes" in out
        assert "section.key=value" in out
        for key in config.all_keys():
            assert f"  {key} (" in out, key
    assert train.main(["--help", "adapt"]) == 0
    out = capsys.readouterr().out
    assert "adapt.threshold (float, default 0.9)" in out and "train.iters" not in out
    assert '"none" | "gen" | "gen+dis"' in out
    assert train.main(["--help", "adpt"]) == train.EXIT_CONFIG
    assert "did you mean 'adapt'" in capsys.readouterr().err


def test_print_config_is_toml_that_loads_back_and_hydra_style_overrides(tmp_path, capsys):
    assert train.main(["--config", "gta5_to_cityscapes", "train.iters=5", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(text)
    cfg = config.load(str(tmp_path / "c.toml"))
    assert cfg.train.iters == 5 and cfg.model.arch == "mrnet"
    assert cfg.data.normalize == "imagenet" and cfg.model.stride_on == "1x1"  # resolved: no weights given
    assert not (ROOT / "runs" / "gta5_to_cityscapes").exists() or True  # nothing is run


def test_unknown_key_suggests_the_closest(capsys):
    assert train.main(["--train.itres=3"]) == train.EXIT_CONFIG
    assert "did you mean 'train.iters'" in capsys.readouterr().err


# Each field driven with a value outside its valid range: exit 2, the key named, no run folder.
BAD_VALUES = {key: bad for key, bad in {
    "model.depth": 7, "model.width": 0, "model.num_classes": 5, "model.head_width": 0,
    "model.head_dropout": 1.0, "model.init_weights": "/nonexistent/w.pth", "model.disc_width": 0,
    "model.disc_stride": 3,
    "model.ms_disc_stride": 16, "model.ms_disc_width": 0,
    "model.aux_disc_width": 2, "data.source_size": [0, 96], "data.target_size": [192], "data.crop": [0, 5],
    "data.scale": [1.2, 0.8], "data.batch_size": 0, "data.workers": -2, "data.max_bad_fraction": 1.5,
    "optim.lr": 0.0, "optim.momentum": 1.0, "optim.weight_decay": -1.0, "optim.power": -0.5,
    "optim.poly_iters": -1, "optim.warmup_iters": -1, "optim.warmup_start": 1.5, "optim.head_lr_mult": 0.0,
    "optim.lr_d": -1e-4, "optim.betas": [0.9, 1.0], "adapt.threshold": 0.0, "adapt.floor": -0.1,
    "adapt.mu": -0.1, "adapt.lambda_adv": -1.0, "adapt.lambda_aux": -1.0, "adapt.lambda_seg": -1.0,
    "adapt.class_balance_max": 0.0, "adapt.hard_pixels": 100.0, "adapt.lambda_mem": -1.0,
    "adapt.memory_start": -1, "adapt.preheat_iters": -1, "adapt.lambda_mrnet_aux": -1.0,
    "adapt.lambda_mrnet_main": -1.0, "train.iters": -3, "train.run_dir": " ",
    "train.eval_every": -1,
    "train.ckpt_every": 0, "train.keep_last": -1, "train.log_every": 0, "train.stop_at": -1,
    "train.max_skips": 0, "train.eval_images": -1, "train.threads": -1, "log.images": -1,
}.items()}


def test_every_ranged_key_has_a_bad_value_here():
    assert set(BAD_VALUES) == set(config.RULES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_invalid_value_exits_2_naming_the_key_before_anything_is_written(key, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = {"train.run_dir": str(run_dir), key: BAD_VALUES[key]}
    assert train.main(as_argv(overrides)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config: ") and key in err
    assert not run_dir.exists()


def test_crop_larger_than_the_resized_image_is_refused(capsys):
    assert train.main(["--data.crop=[97, 192]"]) == train.EXIT_CONFIG
    assert "data.crop (height, width) [97, 192] must fit inside data.source_size" in capsys.readouterr().err


def test_resume_refuses_a_changed_config_and_force_continues(tmp_path, capsys):
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 2}))) == 0
    before = (tmp_path / "config.json").read_text()
    changed = tiny_overrides(tmp_path, **{"train.iters": 3, "adapt.mu": 0.3, "train.log_every": 2})
    assert train.main(as_argv(changed)) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "adapt.mu: 0.1 -> 0.3" in err and "--train.resume=force" in err
    assert "another --train.run_dir" in err
    assert "log_every" not in err  # keys that keep the method are allowed
    assert (tmp_path / "config.json").read_text() == before  # the refused run changed nothing
    assert train.main(as_argv({**changed, "train.resume": "force"})) == 0
    out = capsys.readouterr().out
    assert "train.resume=force: continuing" in out and "resumed from" in out
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 3


def test_a_resume_with_another_build_is_logged_and_final_json_names_the_build(tmp_path, monkeypatch, capsys):
    """Checkpoints and final.json carry Engine.build(); a resume under another one (here another
    extension file) says what changed: the result's last bits then differ from an uninterrupted run's."""
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 3, "train.stop_at": 2}))) == 0
    first = checkpoint.load(checkpoint.latest(tmp_path))["build"]
    assert first["ext"] == ops.ext_digest() and first["threads"] == torch.get_num_threads()
    capsys.readouterr()
    monkeypatch.setattr(ops, "ext_digest", lambda: "0123456789ab")
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 3}))) == 0
    out = capsys.readouterr().out
    assert f"resuming with another build: ext: {first['ext']!r} -> '0123456789ab' (the same method" in out
    assert json.loads((tmp_path / "final.json").read_text())["build"]["ext"] == "0123456789ab"
    # A key the checkpoint's build lacks (Engine.build gained it later) is not another build.
    older = tmp_path / "older"
    assert train.main(as_argv(tiny_overrides(older, **{"train.iters": 3, "train.stop_at": 2}))) == 0
    state = checkpoint.load(checkpoint.latest(older))
    del state["build"]["cuda"]
    torch.save(state, checkpoint.latest(older))
    capsys.readouterr()
    assert train.main(as_argv(tiny_overrides(older, **{"train.iters": 3}))) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "another build" not in out


def test_the_drivers_run_gives_no_result_for_a_run_stopped_before_its_end(tmp_path, capsys):
    """run_for_result (compare's and ablate's driver) reads final.json only where the run finished: a run
    stopped by train.stop_at (or SIGTERM) is (0, None) with a line saying how to go on, and the rerun
    finishes it."""
    overrides = tiny_overrides(tmp_path, **{"train.iters": 3})
    assert train.run_for_result(as_argv({**overrides, "train.stop_at": 2}), "tiny") == (0, None)
    out = capsys.readouterr().out
    assert f"tiny: stopped before its end; rerun the same command to go on from {tmp_path}" in out
    code, final = train.run_for_result(as_argv(overrides), "tiny")
    assert code == 0 and final == json.loads((tmp_path / "final.json").read_text())


def test_a_different_model_in_the_run_folder_is_refused_without_a_traceback(tmp_path, capsys):
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 2}))) == 0
    code = train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 2, "model.width": 8})))
    assert code == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.width: 16 -> 8" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_latest_checkpoint_falls_back_to_an_older_one_and_is_kept(tmp_path, damage, capsys):
    overrides = tiny_overrides(tmp_path, **{"train.iters": 4, "train.ckpt_every": 2, "train.stop_at": 4})
    assert train.main(as_argv(overrides)) == 0
    newest = checkpoint.latest(tmp_path)
    assert newest.name == "ckpt_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    capsys.readouterr()
    assert train.main(as_argv({**overrides, "train.stop_at": 0})) == 0
    out = capsys.readouterr().out
    assert "warning: cannot load checkpoint" in out and "resuming from the older ckpt_00000002.pt" in out
    assert (tmp_path / "ckpt_00000004.pt.corrupt").is_file()  # kept for inspection, never deleted
    assert "resumed from" in out and "at step 2" in out
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 4  # steps 3-4 were redone


def test_no_loadable_checkpoint_stops_with_exit_2(tmp_path, capsys):
    checkpoint.save(tmp_path, 2, {"step": 2})
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"garbage")
    assert train.main(as_argv(tiny_overrides(tmp_path))) == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "ckpt_00000002.pt" in err
    assert (tmp_path / "ckpt_00000002.pt").exists()  # nothing renamed when there is nothing to fall back to


def test_garbage_checkpoint_for_evaluate_never_suggests_weights_only_false(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    torch.save({"x": torch.nn.Linear(1, 1)}, bad)  # a pickled module, not plain tensors
    assert evaluate.main(["--checkpoint", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "could run code" in err and "weights_only" not in err
    bad.write_bytes(b"garbage")
    assert evaluate.main(["--checkpoint", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "weights_only" not in err


def test_final_json_keeps_full_precision(tmp_path):
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 1}))) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["miou"] == pytest.approx(sum(final["iou"].values()) / len(final["iou"]), abs=1e-9)


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("pwda-train")
    if not exe.exists():
        pytest.fail(f"{exe} missing: reinstall the package (pip install --no-build-isolation -e .)")
    out = subprocess.run([str(exe), "--help", "train"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train.iters (int, default" in out.stdout


def _tree_copy(tmp_path) -> Path:
    """The committed-or-not sources needed to build, in a scratch folder (never the installed tree)."""
    import shutil

    dst = tmp_path / "src"
    for name in ("setup.py", "pyproject.toml", "README.md", "csrc", "kernels", "pwda_fast"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name if src.is_dir() else dst)
    return dst


@pytest.mark.parametrize("require", ["0", "1"])
def test_failed_extension_build_warns_and_goes_on_unless_required(tmp_path, require):
    """A compiler that fails: the optional build warns and finishes (torch backend only), or, with
    PWDA_FAST_REQUIRE_EXT=1, fails. Built in a scratch copy: the installed package is not touched."""
    import os

    (tmp_path / "src").mkdir()
    src = _tree_copy(tmp_path)
    env = {**os.environ, "CC": "false", "CXX": "false", "PWDA_FAST_NO_CUDA": "1",
           "PWDA_FAST_REQUIRE_EXT": require}
    run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "out"),
                          "--build-temp", str(tmp_path / "tmp")], cwd=src, env=env, capture_output=True,
                         text=True, timeout=300)
    if require == "1":
        assert run.returncode != 0
    else:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "WARNING: pwda_fast._C (the C++/CUDA kernels) failed to build" in run.stdout
        assert not list((tmp_path / "out").rglob("_C*.so"))


def test_paper_preset_without_weights_refuses_naming_init_weights(tmp_path, capsys):
    code = train.main(["--config", "gta5_to_cityscapes", f"--train.run_dir={tmp_path / 'run'}"])
    assert code == train.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.init_weights" in err and "--model.bn=train" in err
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, monkeypatch, capsys):
    from pwda_fast import distributed

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: False)
    assert train.main(as_argv(tiny_overrides(tmp_path, **{"train.iters": 1, "train.amp": "bf16",
                                                          "train.eval_images": 1}))) == 0
    assert "warning: train.amp=bf16 on a CPU without native bf16" in capsys.readouterr().out


def test_synthia_runs_report_16_and_13_class_miou_everywhere(tmp_path, capsys):
    from data_trees import make_tree

    make_tree(tmp_path / "synthia", "synthia", n=2)
    make_tree(tmp_path / "city", "cityscapes", n=2)
    overrides = tiny_overrides(tmp_path / "run", **{
        "data.source": "synthia", "data.target": "cityscapes", "data.source_root": str(tmp_path / "synthia"),
        "data.target_root": str(tmp_path / "city"), "data.source_size": [64, 48],
        "data.target_size": [64, 48], "data.crop": [48, 64], "train.iters": 2, "train.eval_every": 1})
    assert train.main(as_argv(overrides)) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert {"miou", "miou16", "miou13", "iou"} <= set(final)
    evals = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in ln]
    assert evals and all({"miou16", "miou13"} <= set(e) for e in evals)
    assert "mIoU16" in capsys.readouterr().out
