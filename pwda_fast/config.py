"""The config manager: TOML presets, dotted CLI overrides, valid ranges, --help, the key reference.

The sections themselves (fields, types, defaults and a docstring under each field) are in
pwda_fast/settings.py and are re-exported here, so `config.Config`, `config.AdaptConfig`, ... still
name them. Precedence: CLI (`--optim.lr=1e-4`) > TOML file (`--config NAME|PATH`) > dataclass
defaults. Unknown keys and wrong types raise ConfigError listing the valid keys. Each field's docstring
is its documentation; `describe()` renders it for docs/CONFIG.md.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import tomllib
import typing
import warnings
from pathlib import Path
from typing import Literal

# Re-exported: callers name the sections as config.Config, config.AdaptConfig, ...
from pwda_fast.settings import (  # noqa: F401
    AdaptConfig,
    Config,
    DataConfig,
    KernelsConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# Valid ranges, checked when a config is loaded (before anything is built or written). Choices are
# the fields' Literal types; these are the numeric and path rules: key -> (test, rule in words).
# Dataset roots are checked by the data layer, whose message shows the expected folder layout.
_DEPTHS = (101, 50, 26, 14)
# inf (and nan, which fails every comparison) are refused: `--optim.lr=inf` parses as a float.
_positive = (lambda v: 0 < v < float("inf"), "must be > 0 (and finite)")
_non_negative = (lambda v: 0 <= v < float("inf"), "must be >= 0 (and finite)")
_fraction = (lambda v: 0 <= v < 1, "must be in [0, 1)")
_file_or_empty = (lambda v: not v or Path(v).is_file(), "must name an existing file (or be empty)")
_size = (lambda v: len(v) == 2 and min(v) > 0, "must be two positive numbers")
RULES = {
    "model.depth": (lambda v: v in _DEPTHS, f"must be one of {_DEPTHS}"),
    "model.width": _positive,
    "model.num_classes": (lambda v: v == 19, "must be 19 (the Cityscapes trainIds the data and metrics use)"),
    "model.head_width": _positive,
    "model.head_dropout": _fraction,
    "model.init_weights": _file_or_empty,
    "model.disc_width": _positive,
    "model.disc_stride": (lambda v: v in (1, 2, 4, 8, 16, 32), "must be one of 1, 2, 4, 8, 16, 32"),
    "model.ms_disc_stride": (lambda v: v in (1, 2, 4, 8), "must be one of 1, 2, 4, 8"),
    "model.ms_disc_width": _positive,
    "model.aux_disc_width": (lambda v: v >= 4, "must be >= 4 (its convs have width, width/2, width/4)"),
    "data.source_size": _size,
    "data.target_size": _size,
    "data.crop": _size,
    "data.scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "must be [lo, hi] with 0 < lo <= hi"),
    "data.batch_size": _positive,
    "data.workers": (lambda v: v >= -1, "must be >= 0, or -1 for auto"),
    "data.max_bad_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "optim.lr": _positive,
    "optim.momentum": _fraction,
    "optim.weight_decay": _non_negative,
    "optim.power": _non_negative,
    "optim.poly_iters": _non_negative,
    "optim.warmup_iters": _non_negative,
    "optim.warmup_start": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "optim.head_lr_mult": _positive,
    "optim.lr_d": _positive,
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    "adapt.threshold": (lambda v: v > 0, "must be > 0 (>= 1 turns the floor off)"),
    "adapt.floor": _non_negative,
    "adapt.mu": _non_negative,
    "adapt.lambda_adv": _non_negative,
    "adapt.lambda_aux": _non_negative,
    "adapt.lambda_seg": _non_negative,
    "adapt.class_balance_max": _positive,
    "adapt.hard_pixels": (lambda v: 0 <= v < 100, "must be a percentile in [0, 100)"),
    "adapt.lambda_mem": _non_negative,
    "adapt.memory_start": _non_negative,
    "adapt.preheat_iters": _non_negative,
    "adapt.lambda_mrnet_aux": _non_negative,
    "adapt.lambda_mrnet_main": _non_negative,
    "train.iters": _positive,
    "train.run_dir": (lambda v: bool(v.strip()), "must not be empty"),
    "train.eval_every": _non_negative,
    "train.ckpt_every": _positive,
    "train.keep_last": _non_negative,
    "train.log_every": _positive,
    "train.stop_at": _non_negative,
    "train.max_skips": _positive,
    "train.eval_images": _non_negative,
    "train.threads": _non_negative,
    "log.images": _non_negative,
}

# Keys that keep the method a run computes (its equations, data, schedule and seeds) and change only how
# or where it runs: a resumed run may differ from its checkpoint in these (logged); any other difference
# is refused unless train.resume = "force". Some (train.threads, train.compile, kernels.loss,
# train.device) can move a result's last bits, and a weighted run is chaotic in them (docs/RESULTS.md):
# Engine.build() records what ran, in checkpoints, final.json and study records.
SAME_METHOD = {
    "train.run_dir", "train.eval_every", "train.ckpt_every", "train.keep_last", "train.log_every",
    "train.stop_at", "train.max_skips", "train.eval_images", "train.eval_protocol", "train.device",
    "train.allow_world_size_change", "train.resume", "train.threads", "train.compile",
    "data.workers", "data.validate", "data.loader", "kernels.loss", "log.tensorboard", "log.images",
}


def validate(cfg: Config) -> None:
    """Every value in its valid range, and the crop inside the resized images; ConfigError lists all."""
    problems = []
    for key, (ok, rule) in RULES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            problems.append(f"{key} {rule}; got {value!r}")
    d = cfg.data
    for size_key, size in (("data.source_size", d.source_size), ("data.target_size", d.target_size)):
        if len(d.crop) == 2 and len(size) == 2 and (d.crop[0] > size[1] or d.crop[1] > size[0]):
            w, h = size
            problems.append(f"data.crop (height, width) {d.crop} must fit inside {size_key} (width, height) "
                            f"{[w, h]}")
    # Each adversary's own rule on the other adapt.* keys. Imported here, not at the top: the
    # adversaries sit above the config (they build networks), and only their rules are needed.
    from pwda_fast import adversaries
    problems += adversaries.get(cfg.adapt.adversary).check(cfg.adapt)
    if {d.source, d.target} == {"toy", "toy_partial"}:  # halves of two different built-in pairs
        problems.append(f"data.source {d.source!r} and data.target {d.target!r} are halves of two "
                        "different built-in pairs; set both to toy or both to toy_partial")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def differences(old: Config, new: Config) -> dict[str, tuple]:
    """{"section.key": (old value, new value)} for every key that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in b for k in b[s] if a.get(s, {}).get(k) != b[s][k]}


def _sections(cfg: Config) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _coerce(key: str, value, typ):
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {item.__name__}; got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{key} must be {typ.__name__}; got {value!r} ({type(value).__name__})")
    return value


# Keys that were renamed: old -> new. Configs, presets and checkpoints written before the rename still
# load; a TOML file or override that uses the old name is told the new one (a saved config is not).
RENAMED = {"kernels.backend": "kernels.loss"}


def _renamed(key: str, source: str) -> str:
    """The current name of `key`, with a FutureWarning naming the new key when `source` is a user's."""
    new = RENAMED.get(key)
    if new is None:
        return key
    if source:
        warnings.warn(f"{source}: config key {key!r} is now {new!r} (it chooses the weighted-loss kernel "
                      f"only; D_aux's upsample has kernels.upsample); read as {new}", FutureWarning,
                      stacklevel=3)
    return new


def _apply(cfg: Config, key: str, value, source: str = "") -> None:
    key = _renamed(key, source)
    sections = _sections(cfg)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {key!r}; sections are {sorted(sections)}"
                          f"{_did_you_mean(key, all_keys())}")
    section = sections[parts[0]]
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{parts[0]}]: "
                          f"{', '.join(sorted(hints))}{_did_you_mean(parts[1], hints, parts[0] + '.')}")
    value = _coerce(key, value, hints[parts[1]])
    setattr(section, parts[1], value)


def section_classes() -> dict[str, type]:
    """{"model": ModelConfig, ...} in the order of Config's fields."""
    return typing.get_type_hints(Config)


def all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in section_classes().items() for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def _parse_cli_value(text: str):
    """`--optim.lr=1e-4` -> 1e-4; TOML literal syntax first, then a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if not preset.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"unknown config {name_or_path!r}: not a file, and presets are {names}")
    return preset


def load(config: str | None = "toy", overrides: dict | None = None) -> Config:
    """Defaults, then the TOML preset or file, then `overrides` ({"optim.lr": 1e-4})."""
    cfg = Config()
    if config:
        path = resolve_preset(config)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                                  f"sections are {sorted(_sections(cfg))}")
            for key, value in values.items():
                try:
                    _apply(cfg, f"{section}.{key}", value, source=str(path))
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value, source="override")
    validate(cfg)
    return cfg


# Keys a config saved before they existed must read as the behaviour of that time, not today's default
# (a checkpoint of the earlier DeepLab-v2 engine must rebuild as DeepLab-v2, with its normalisation).
_BEFORE_THE_KEY_EXISTED = {"model.arch": "deeplabv2", "model.stride_on": "1x1", "data.normalize": "imagenet",
                           "data.target_augment": True, "adapt.aux_at": "feature"}


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy saved in a checkpoint)."""
    cfg = Config()
    if "model" in data:  # a saved config, possibly from before some keys existed
        for key, old in _BEFORE_THE_KEY_EXISTED.items():
            section, name = key.split(".")
            if name not in data.get(section, {}):
                _apply(cfg, key, old)
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, f"{section}.{key}", value)
    return cfg


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """`--config NAME|PATH` and `--section.key=value`, `--section.key value` or `section.key=value`
    -> (config, overrides). `-h`/`--help`/`--print-config` are read by `requested_output` first."""
    config, overrides, i = "toy", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") and "=" in arg and "." in arg.partition("=")[0]:
            arg = "--" + arg  # Hydra / OmegaConf habit: train.iters=5
        if arg == "--print-config":
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config NAME and --section.key=value "
                              "(or section.key=value); --help lists the keys")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            value, i = argv[i + 1], i + 1
        if key == "config":
            config = value
        else:
            overrides[key] = _parse_cli_value(value)
        i += 1
    return config, overrides


def requested_output(argv: list[str]) -> tuple[str, str | None] | None:
    """("help", section or None) for -h/--help [SECTION], ("print", None) for --print-config, else None."""
    for i, arg in enumerate(argv):
        if arg in ("-h", "--help"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            return "help", nxt if nxt and not nxt.startswith("-") else None
    return ("print", None) if "--print-config" in argv else None


def _type_name(typ) -> str:
    if typing.get_origin(typ) is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(typ))
    if typing.get_origin(typ) is list:
        return f"list of {typing.get_args(typ)[0].__name__}"
    return typ.__name__


def help_text(prog: str, section: str | None = None) -> str:
    """--help: usage, the presets, how to override, then every key (or one section's) with its type,
    default and docstring."""
    sections = section_classes()
    if section is not None and section not in sections:
        raise ConfigError(f"--help {section}: no such section{_did_you_mean(section, sections)}; "
                          f"sections are {sorted(sections)}")
    presets = []
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        presets.append(f"  {path.stem:<24} {first}")
    lines = [f"usage: {prog} [--config NAME|FILE.toml] [--section.key=VALUE ...] [--print-config]",
             f"       {prog} --help [SECTION]", "",
             "Trains (or resumes, when train.run_dir holds a checkpoint) one run. Settings come from the",
             "dataclass defaults, then the preset or TOML file, then the command line; values are TOML",
             "literals (--optim.lr=1e-4, --data.crop=[512,1024], --adapt.weighting=gen), and",
             "section.key=value works too. --print-config prints the resolved config as TOML and exits.", "",
             "presets (--config NAME):", *presets, ""]
    for name, cls in sections.items():
        if section not in (None, name):
            continue
        lines.append(f"[{name}]")
        docs, hints, default = field_docs(cls), typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            lines.append(f"  {name}.{f.name} ({_type_name(hints[f.name])}, default "
                         f"{json.dumps(getattr(default, f.name))})")
            lines += [f"      {ln.strip()}" for ln in docs.get(f.name, "").splitlines()]
        lines.append("")
    if section is None:
        lines.append(f"One section only: {prog} --help SECTION (one of {', '.join(sections)}).")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # ints, floats (repr round-trips) and strings (JSON escapes are TOML's)


def to_toml(cfg: Config) -> str:
    """The whole config as a TOML file that `load` reads back to the same Config."""
    lines = []
    for name, section in _sections(cfg).items():
        lines.append(f"[{name}]")
        lines += [f"{f.name} = {_toml_value(getattr(section, f.name))}" for f in dataclasses.fields(section)]
        lines.append("")
    return "\n".join(lines)


def field_docs(section_cls) -> dict[str, str]:
    """Docstrings written under each dataclass field (parsed from the source)."""
    tree = ast.parse(inspect.getsource(section_cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def describe() -> str:
    """Markdown reference of every key: default and docstring (kept in docs/CONFIG.md by a test)."""
    lines = []
    for f in dataclasses.fields(Config):
        section = f.default_factory()
        lines += [f"### [{f.name}]", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(type(section))
        for sf in dataclasses.fields(section):
            default = json.dumps(getattr(section, sf.name))
            doc = " ".join(docs.get(sf.name, "").split())  # one table row: docstring lines joined
            lines.append(f"| `{f.name}.{sf.name}` | `{default}` | {doc} |")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/CONFIG.md: every key with its default and docstring, generated from the dataclasses."""
    return ("# Configuration reference\n\n"
            "Generated from the dataclasses in `pwda_fast/settings.py` by "
            "`python -m pwda_fast.config --update-docs docs/CONFIG.md`"
            " (a test keeps it current). Set a key in a TOML file (`[section]` then `key = value`) or on the "
            "command line (`--section.key=value`); the command line wins.\n\n" + describe())


def update_reference(path: str | Path) -> bool:
    """Rewrite the generated reference at `path`; True if it changed."""
    path = Path(path)
    new = reference_markdown()
    old = path.read_text() if path.is_file() else ""
    path.write_text(new)
    return new != old


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update-docs"]:
        print("updated" if update_reference(sys.argv[2]) else "already current")
    else:
        print(describe())
