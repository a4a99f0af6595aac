"""After training: pwda-export (state_dict and ONNX) and warm starts from a checkpoint or an export."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import as_argv, tiny_overrides
from PIL import Image

from pwda_fast import checkpoint, config, engine, export, models, train
from pwda_fast.data import normalization
from pwda_fast.data.labels import CLASSES, PALETTE

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY_MODEL = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
              "model.aux_disc_width": 8}


@pytest.fixture(scope="module")
def source_only(tmp_path_factory):
    """A 2-step source-only run with settings the defaults would not choose (Caffe inputs, stride on
    the 3x3 conv), so that a warm start can only get them from the checkpoint -> its ckpt path."""
    run_dir = tmp_path_factory.mktemp("source_only")
    overrides = tiny_overrides(run_dir, **TINY_MODEL, **{
        "adapt.mode": "source_only", "train.iters": 2, "train.eval_images": 2,
        "data.normalize": "caffe", "model.stride_on": "3x3"})
    assert train.main(as_argv(overrides)) == 0
    return checkpoint.latest(run_dir)


@pytest.fixture(scope="module")
def exported(source_only, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    assert export.main(["--checkpoint", str(source_only), "--out", str(out)]) == 0
    return out


# --- export: state_dict -------------------------------------------------------------------------

def test_state_dict_export_is_plain_tensors_equal_to_the_checkpoint(source_only, exported):
    weights = torch.load(exported / "generator.pt", weights_only=True)
    saved = checkpoint.load(source_only)["g"]
    assert type(weights) is dict and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_generator_json_says_how_to_rebuild_feed_and_read_it(source_only, exported):
    meta = json.loads((exported / "generator.json").read_text())
    cfg = config.from_dict(checkpoint.load(source_only)["config"])
    assert (meta["format"], meta["version"]) == (models.EXPORT_FORMAT, models.EXPORT_VERSION)
    assert meta["model"] == {**cfg.to_dict()["model"], "init_weights": ""}
    assert (meta["model"]["arch"], meta["model"]["depth"], meta["model"]["stride_on"]) == ("mrnet", 14, "3x3")
    assert meta["num_classes"] == 19 and meta["classes"] == list(CLASSES)
    assert meta["palette"] == PALETTE.tolist() and meta["ignore_index"] == 255
    norm = meta["input"]
    assert (norm["normalization"], norm["channel_order"], norm["pixel_range"]) == ("caffe", "BGR", [0, 255])
    assert norm["mean"] == list(normalization.CAFFE.mean) and norm["std"] == [1.0, 1.0, 1.0]
    assert norm["trained_size"] == {"width": 192, "height": 96}
    assert meta["output_stride"] == 8 and meta["outputs"]["file"] == "generator.pt"
    assert "main" in meta["outputs"]["prediction"]
    assert meta["trained"] == {"steps": 2, "source": "toy", "target": "toy", "mode": "source_only",
                               "weighting": "gen+dis", "miou": None}


def _usage_snippet() -> str:
    """The Python block of docs/USAGE.md that rebuilds an exported generator."""
    lines = (ROOT / "docs" / "USAGE.md").read_text().splitlines()
    start = lines.index("    import json, numpy as np, torch")
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_usage_snippet_rebuilds_the_generator_without_training_code(source_only, exported, tmp_path,
                                                                    monkeypatch):
    shutil.copytree(exported, tmp_path / "exported")
    rgb = np.random.default_rng(0).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "frankfurt_000000_000294_leftImg8bit.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(_usage_snippet(), scope)
    nets, cfg = checkpoint.load_networks(source_only, CPU)
    x = torch.from_numpy(normalization.apply(rgb, cfg.data.normalize)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = export.Prediction(nets.g)(x)
    torch.testing.assert_close(scope["logits"], expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(scope["train_ids"], expected.argmax(1)[0].numpy())


def _plain(path: Path) -> None:
    torch.save({"conv1.weight": torch.ones(2)}, path)


def _code(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("the pickle ran",))
    torch.save({"g": Payload(), "config": {}}, path)


@pytest.mark.parametrize("write, message", [
    (None, r"--checkpoint .*missing.pt does not exist"),
    (lambda p: p.write_bytes(b"not a checkpoint"), r"cannot load checkpoint .*: \w+Error: .*damaged"),
    (_code, r"cannot load checkpoint .*UnpicklingError: it holds Python objects"),
    (_plain, r"is not a pwda_fast training checkpoint .*'g' and 'config'"),
])
def test_unusable_checkpoints_exit_2_with_the_reason(tmp_path, capsys, write, message):
    path = tmp_path / "missing.pt"
    if write is not None:
        write(path)
    assert export.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "the pickle ran" not in captured.out
    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "out").exists()


def test_console_script_and_module_entry(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pwda-export"] == "pwda_fast.export:main"
    argv = ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "pwda_fast.export", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "none.pt does not exist" in proc.stderr


def test_onnx_without_its_packages_exits_2_saying_what_to_install(source_only, tmp_path, capsys,
                                                                  monkeypatch):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name: None if name == "onnxscript" else real(name))
    assert export.main(["--checkpoint", str(source_only), "--out", str(tmp_path), "--format", "onnx"]) == 2
    assert "needs onnxscript: pip install 'pwda_fast[export]'" in capsys.readouterr().err


# --- export: ONNX ------------------------------------------------------------------------------

def test_onnx_export_matches_torch_at_other_sizes_and_batches(source_only, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime",
                              reason="onnxruntime is not installed: pip install -e '.[export]'")
    assert export.main(["--checkpoint", str(source_only), "--out", str(tmp_path), "--format", "onnx"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("onnx check")]
    assert len(printed) == 2 and all(ln.endswith(": ok") for ln in printed)
    meta = json.loads((tmp_path / "generator.json").read_text())
    assert meta["outputs"]["file"] == "generator.onnx" and meta["input"]["normalization"] == "caffe"
    session = ort.InferenceSession(str(tmp_path / "generator.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    nets, cfg = checkpoint.load_networks(source_only, CPU)
    for n, h, w in ((3, 64, 128), (1, 57, 91)):  # neither is a size the export traced or checked
        x = export.normalised_images(cfg, n, h, w, seed=h)
        assert x.abs().max() > 100  # Caffe inputs: 0-255 minus the mean
        with torch.no_grad():
            expected = export.Prediction(nets.g)(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (n, 19, h, w)
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# --- warm start ---------------------------------------------------------------------------------

def _warm_cfg(run_dir: Path, init: Path, **extra) -> config.Config:
    argv = as_argv(tiny_overrides(run_dir, **TINY_MODEL, **{"model.init_weights": str(init), **extra}))
    return config.load(*config.parse_args(argv))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", ["checkpoint", "exported"])
def test_warm_start_builds_the_saved_generator_with_its_stride_and_normalisation(
        source_only, exported, tmp_path, monkeypatch, which):
    init = source_only if which == "checkpoint" else exported / "generator.pt"
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    final = engine.finalize(_warm_cfg(tmp_path, init))
    cfg = final.cfg
    logs = []
    built = engine.build(final, CPU, log=logs.append)
    assert loads == [init]  # read once at start-up: resolve and build share it
    assert built.cfg is cfg
    saved = checkpoint.load(source_only)["g"]
    assert _same(built.nets.g.state_dict(), saved)
    assert (cfg.data.normalize, cfg.model.stride_on) == ("caffe", "3x3")  # the defaults: imagenet, 1x1
    assert built.optimizers.g.state_dict()["state"] == {}
    assert logs[0] == (f"warm start from {init} (trained 2 steps, source_only, toy -> toy): its "
                       "generator weights; D, D_aux, the optimizers and the step start fresh")
    fresh = engine.build(_warm_cfg(tmp_path, "", **{"model.stride_on": "3x3"}), CPU)
    assert not _same(fresh.nets.g.state_dict(), saved)  # the equality above is the warm start's doing


def test_adapt_run_from_a_source_only_checkpoint_starts_at_step_1(source_only, tmp_path, capsys, monkeypatch):
    """Also: one start reads the weight file once and makes its config final once (engine.finalize),
    and the config it saves is that final one."""
    reads, resolves = [], []
    real_read, real_resolve = models.read_init_weights, engine.resolve
    monkeypatch.setattr(models, "read_init_weights", lambda path: reads.append(path) or real_read(path))
    monkeypatch.setattr(engine, "resolve", lambda *a: resolves.append(a[0]) or real_resolve(*a))
    overrides = tiny_overrides(tmp_path, **TINY_MODEL, **{"model.init_weights": str(source_only),
                                                          "train.iters": 1, "train.eval_images": 1})
    assert train.main(as_argv(overrides)) == 0
    assert reads == [str(source_only)] and len(resolves) == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["data"]["normalize"], saved["model"]["stride_on"]) == ("caffe", "3x3")
    assert f"warm start from {source_only} (trained 2 steps" in capsys.readouterr().out
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "seg" in ln] == [1] and "adv" in lines[0]
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 1


@pytest.mark.parametrize("extra, message", [
    ({"model.width": 16, "model.head_width": 32},
     "model.width: 8 there, 16 here; model.head_width: 16 there, 32 here); pass --model.width=8 "
     "--model.head_width=16"),
    ({"model.stride_on": "1x1"}, "model.stride_on: '3x3' there, '1x1' here"),
    ({"data.normalize": "imagenet"}, "trained on data.normalize = 'caffe' inputs, but the config sets "
                                     "'imagenet'; pass --data.normalize=caffe"),
])
def test_warm_start_that_does_not_fit_exits_2_listing_the_keys(source_only, tmp_path, capsys, extra,
                                                                message):
    overrides = tiny_overrides(tmp_path / "run", **{**TINY_MODEL, "model.init_weights": str(source_only),
                                                    **extra})
    assert train.main(as_argv(overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.init_weights {source_only}") and message in err
    assert not (tmp_path / "run").exists()


def test_exported_weights_without_their_json_are_refused(exported, tmp_path, capsys):
    shutil.copy(exported / "generator.pt", tmp_path / "generator.pt")
    overrides = tiny_overrides(tmp_path / "run", **TINY_MODEL,
                               **{"model.init_weights": str(tmp_path / "generator.pt")})
    assert train.main(as_argv(overrides)) == 2
    assert "needs its generator.json beside it" in capsys.readouterr().err
