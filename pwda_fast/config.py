"""Typed configuration: dataclass sections, TOML presets, dotted CLI overrides.

Precedence: CLI (`--optim.lr=1e-4`) > TOML file (`--config NAME|PATH`) > dataclass defaults.
Unknown keys and wrong types raise ConfigError listing the valid keys. Each field's docstring (the
string literal under it) is the documentation; `describe()` renders it for the README.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    depth: int = 101
    """ResNet depth of the DeepLab-v2 generator: 101 (paper), 50, 26 or 14 (toy and tests)."""
    width: int = 64
    """Channels of the stem; every stage scales with it (64 = the standard ResNet)."""
    num_classes: int = 19
    """Segmentation classes (19 Cityscapes trainIds)."""
    bn: Literal["frozen", "train"] = "frozen"
    """BatchNorm mode: "frozen" (affine and statistics fixed, for a pretrained init) or "train"."""
    init_weights: str = ""
    """Local file with ImageNet / DeepLab initial weights (torchvision or "Scale." layout); "" = random."""
    disc_width: int = 64
    """Channels of the first output-space discriminator conv (64-128-256-512 in the paper)."""
    aux_disc_width: int = 1024
    """Hidden channels of the three 1x1 convs of the feature-space discriminator D_aux."""


@dataclass
class DataConfig:
    source: Literal["toy", "gta5", "synthia"] = "toy"
    """Source (labelled) domain: "toy", "gta5" or "synthia"."""
    target: Literal["toy", "cityscapes"] = "toy"
    """Target (unlabelled) domain: "toy" or "cityscapes"."""
    source_root: str = ""
    """Root folder of the source dataset ("" = the toy cache)."""
    target_root: str = ""
    """Root folder of the target dataset ("" = the toy cache)."""
    source_prepared: str = ""
    """Where `pwda_fast.data.prepare --out` put the source's trainId labels ("" = source_root)."""
    target_prepared: str = ""
    """Where `pwda_fast.data.prepare --out` put the target's trainId labels ("" = target_root)."""
    loader: Literal["auto", "torch", "dali"] = "auto"
    """Input pipeline: "torch", "dali" or "auto" (DALI on a GPU when installed; exact resume: torch only)."""
    source_size: list[int] = field(default_factory=lambda: [1280, 720])
    """Source images are resized to this (width, height) before cropping."""
    target_size: list[int] = field(default_factory=lambda: [1024, 512])
    """Target images are resized to this (width, height)."""
    crop: list[int] = field(default_factory=lambda: [512, 1024])
    """Training crop (height, width), taken at random from the resized image."""
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random rescale range applied before cropping ([1, 1] = none)."""
    flip: bool = False
    """Random horizontal flip."""
    batch_size: int = 1
    """Images per domain per step per process."""
    workers: int = 2
    """Loader worker processes."""
    skip_bad: bool = False
    """Skip unreadable or mismatched files (reported) instead of stopping."""
    max_bad_fraction: float = 0.01
    """Stop even with skip_bad when more than this fraction of files is bad."""
    validate: Literal["header", "full"] = "header"
    """Pre-flight file check: "header" (sizes, label modes; seconds) or "full" (decode, label values)."""


@dataclass
class OptimConfig:
    lr: float = 2.5e-4
    """Generator SGD learning rate (heads get head_lr_mult times this)."""
    momentum: float = 0.9
    """Generator SGD momentum."""
    weight_decay: float = 5e-4
    """Generator SGD weight decay."""
    power: float = 0.9
    """Poly decay exponent: lr * (1 - step / iters) ** power."""
    head_lr_mult: float = 10.0
    """Learning-rate multiplier of the classifier heads."""
    lr_d: float = 1e-4
    """Adam learning rate of D and D_aux."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """Adam betas of D and D_aux."""
    nesterov: bool = False
    """Nesterov momentum for G's SGD (MRNet uses it; AdaptSegNet does not)."""
    warmup_iters: int = 0
    """Linear warm-up of G's learning rate over this many iterations before the poly decay (0 = none)."""
    warmup_start: float = 0.1
    """G's warm-up starts at this fraction of optim.lr (MRNet: 0.1)."""
    impl: Literal["auto", "torch", "apex"] = "auto"
    """Optimizer implementation: "auto" (fused on CUDA, foreach on CPU), "torch" or "apex"."""


@dataclass
class AdaptConfig:
    mode: Literal["adapt", "source_only"] = "adapt"
    """"adapt" (three-stage PWDA loop) or "source_only" (stage 1 only, the baseline)."""
    weighting: Literal["none", "gen", "gen+dis"] = "gen+dis"
    """Pixel weighting: "none" (AdaptSegNet), "gen" (GenMap) or "gen+dis" (GenMap + DisMap)."""
    threshold: float = 0.9
    """Confidence threshold T of eq. (3); >= 1 turns the floor off."""
    floor: float = 0.01
    """Weight of pixels whose confidence exceeds T."""
    mu: float = 0.1
    """Offset mu added to the generation confidence (eqs. 4, 6)."""
    lambda_adv: float = 5e-4
    """Weight of the output-space adversarial loss in the generator stage."""
    lambda_aux: float = 5e-4
    """Weight of the feature-space (D_aux) adversarial loss in the generator stage."""
    lambda_seg: float = 0.1
    """Weight of the auxiliary (layer3) head's segmentation loss."""
    memory: bool = False
    """MRNet memory regularisation on the target (KL toward the fused prediction)."""
    lambda_mem: float = 0.1
    """Weight of the memory regularisation."""


@dataclass
class TrainConfig:
    iters: int = 250000
    """Total training iterations."""
    run_dir: str = "runs/default"
    """Folder for checkpoints, metrics.jsonl and final.json; rerunning resumes from it."""
    seed: int = 1234
    """Random seed (each rank adds its rank)."""
    eval_every: int = 5000
    """Evaluate on the target val set every this many iterations (0 = only at the end)."""
    ckpt_every: int = 5000
    """Write a checkpoint every this many iterations (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept in run_dir."""
    log_every: int = 10
    """Append a metrics.jsonl line every this many iterations."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    amp: Literal["none", "bf16"] = "none"
    """Autocast precision: "none" (fp32) or "bf16"."""
    channels_last: bool = False
    """Run networks and inputs in channels_last memory format."""
    compile: bool = False
    """torch.compile the networks."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, as a preemption would (0 = run to train.iters)."""
    max_skips: int = 20
    """Stop (exit code 3) after this many consecutive steps skipped for non-finite values."""
    allow_world_size_change: bool = False
    """Allow resuming a checkpoint written with a different number of processes."""
    eval_images: int = 0
    """Evaluate on the first this many target-val images only (0 = all); for quick runs and tests."""


@dataclass
class KernelsConfig:
    backend: Literal["auto", "torch", "ext", "triton"] = "auto"
    """Weighted-loss backend: "auto", "torch", "ext" (C++/CUDA) or "triton"."""


@dataclass
class LogConfig:
    tensorboard: bool = False
    """Also write TensorBoard scalars and images to run_dir/tensorboard (needs the tensorboard extra)."""
    images: int = 1
    """Target-val images whose prediction and weighting maps go to TensorBoard at each evaluation."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


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


def _apply(cfg: Config, key: str, value) -> None:
    sections = _sections(cfg)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {key!r}; sections are {sorted(sections)}")
    section = sections[parts[0]]
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise ConfigError(f"unknown config key {key!r}; valid keys in [{parts[0]}]: "
                          f"{', '.join(sorted(hints))}")
    value = _coerce(key, value, hints[parts[1]])
    setattr(section, parts[1], value)


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
                    _apply(cfg, f"{section}.{key}", value)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value)
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. the copy saved in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, f"{section}.{key}", value)
    return cfg


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """`--config NAME|PATH` and `--section.key=value` (or `--section.key value`) -> (config, overrides)."""
    config, overrides, i = "toy", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; use --config NAME and --section.key=value")
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
    """Markdown reference of every key: default and docstring (kept in the README by a test)."""
    lines = []
    for f in dataclasses.fields(Config):
        section = f.default_factory()
        lines += [f"### [{f.name}]", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(type(section))
        for sf in dataclasses.fields(section):
            default = json.dumps(getattr(section, sf.name))
            lines.append(f"| `{f.name}.{sf.name}` | `{default}` | {docs.get(sf.name, '')} |")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/CONFIG.md: every key with its default and docstring, generated from the dataclasses."""
    return ("# Configuration reference\n\n"
            "Generated from `pwda_fast/config.py` by `python -m pwda_fast.config --update-docs docs/CONFIG.md`"
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
