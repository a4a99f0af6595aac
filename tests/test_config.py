"""Config precedence (CLI > file > defaults), errors that list valid keys, presets, JSON dump."""

import json
import warnings
from pathlib import Path

import pytest

from pwda_fast import config
from pwda_fast.config import ConfigError


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[optim]\nlr = 0.5\nmomentum = 0.8\n[adapt]\nweighting = "gen"\n')
    cfg = config.load(str(path), {"optim.lr": 1e-4})
    assert cfg.optim.lr == 1e-4  # CLI
    assert cfg.optim.momentum == 0.8  # file
    assert cfg.optim.weight_decay == 5e-4  # default
    assert cfg.adapt.weighting == "gen"


def test_paper_defaults():
    cfg = config.Config()
    a, o = cfg.adapt, cfg.optim
    assert (a.threshold, a.floor, a.mu, a.lambda_adv, a.lambda_aux) == (0.9, 0.01, 0.1, 5e-4, 5e-4)
    assert (o.lr, o.momentum, o.weight_decay, o.power, o.lr_d, o.betas) == (
        2.5e-4, 0.9, 5e-4, 0.9, 1e-4, [0.9, 0.99])


def test_cli_parsing():
    name, overrides = config.parse_args(["--config", "toy", "--optim.lr=1e-4", "--train.run_dir", "x/y",
                                         "--data.flip=false", "--data.crop=[64, 128]",
                                         "--adapt.weighting=gen+dis"])
    assert name == "toy"
    assert overrides == {"optim.lr": 1e-4, "train.run_dir": "x/y", "data.flip": False,
                         "data.crop": [64, 128], "adapt.weighting": "gen+dis"}
    cfg = config.load(name, overrides)
    assert cfg.data.crop == [64, 128] and cfg.adapt.weighting == "gen+dis"


@pytest.mark.parametrize("overrides, match", [
    ({"optim.lrr": 1.0}, r"unknown config key 'optim.lrr'; valid keys in \[optim\]: .*lr, lr_d"),
    ({"nope.lr": 1.0}, r"unknown config key 'nope.lr'; sections are \['adapt', 'data'"),
    ({"train.iters": "many"}, r"train.iters must be int; got 'many'"),
    ({"train.iters": 1.5}, r"train.iters must be int"),
    ({"train.iters": True}, r"train.iters must be int"),
    ({"adapt.weighting": "dis"}, r"adapt.weighting must be one of \('none', 'gen', 'gen\+dis', 'gen\+aux'\)"),
    ({"data.crop": 5}, r"data.crop must be a list of int"),
])
def test_errors_list_valid_keys_and_types(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load("toy", overrides)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown config key 'train.epochs'; valid keys"):
        config.load(str(bad))
    with pytest.raises(ConfigError, match=r"unknown config 'nosuch': not a file, and presets are"):
        config.load("nosuch")


def test_int_accepted_for_float_and_json_roundtrip():
    cfg = config.load("toy", {"optim.lr": 1})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    again = config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


@pytest.mark.parametrize("preset", sorted(p.stem for p in config.CONFIG_DIR.glob("*.toml")))
def test_every_preset_loads(preset):
    config.load(preset)


def test_required_key_names_exist():
    cfg = config.load("toy")
    for key in ("train.iters", "train.run_dir", "train.seed", "train.eval_every", "kernels.loss",
                "adapt.weighting", "adapt.threshold", "adapt.floor", "adapt.mu", "adapt.lambda_adv",
                "adapt.lambda_aux", "data.loader"):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_every_field_is_documented():
    for line in config.describe().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented: {line}"


def test_configuration_reference_is_current():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    assert docs == config.reference_markdown(), (
        "docs/CONFIG.md is stale: run python -m pwda_fast.config --update-docs docs/CONFIG.md")


def test_configs_saved_before_a_key_existed_keep_their_old_meaning():
    saved = config.load("toy").to_dict()
    for section, name in (("model", "arch"), ("model", "stride_on"), ("data", "normalize"),
                          ("data", "target_augment"), ("adapt", "aux_at")):
        del saved[section][name]
    old = config.from_dict(saved)
    assert (old.model.arch, old.model.stride_on, old.data.normalize, old.data.target_augment,
            old.adapt.aux_at) == ("deeplabv2", "1x1", "imagenet", True, "feature")
    assert config.from_dict(config.load("toy").to_dict()) == config.load("toy")  # current ones unchanged


def test_a_renamed_key_still_reads_and_a_user_is_told_the_new_name(tmp_path):
    """kernels.backend became kernels.loss: a saved config (a checkpoint's) reads silently; a TOML file
    or an override reads too, with a FutureWarning that names the new key and the file."""
    saved = config.load("toy").to_dict()
    saved["kernels"] = {"backend": "torch", "upsample": "auto"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.from_dict(saved).kernels.loss == "torch"
    with pytest.warns(FutureWarning, match="'kernels.backend' is now 'kernels.loss'"):
        assert config.load("toy", {"kernels.backend": "torch"}).kernels.loss == "torch"
    path = tmp_path / "old.toml"
    path.write_text('[kernels]\nbackend = "torch"\n')
    with pytest.warns(FutureWarning, match=f"{path}: config key 'kernels.backend'"):
        assert config.load(str(path)).kernels.loss == "torch"
    with (pytest.raises(ConfigError, match="kernels.loss must be one of"),  # checked under its new name
          pytest.warns(FutureWarning, match="'kernels.backend' is now 'kernels.loss'")):
        config.load("toy", {"kernels.backend": "cudnn"})


def test_halves_of_two_built_in_pairs_are_refused():
    with pytest.raises(config.ConfigError, match="halves of two different built-in pairs"):
        config.load("toy", {"data.target": "toy_partial"})
    assert config.load("toy", {"data.source": "toy_partial", "data.target": "toy_partial"})
