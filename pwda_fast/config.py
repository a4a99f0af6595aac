"""Typed configuration: dataclass sections, TOML presets, dotted CLI overrides.

Precedence: CLI (`--optim.lr=1e-4`) > TOML file (`--config NAME|PATH`) > dataclass defaults.
Unknown keys and wrong types raise ConfigError listing the valid keys. Each field's docstring (the
string literal under it) is the documentation; `describe()` renders it for the README.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
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
    arch: Literal["mrnet", "deeplabv2"] = "mrnet"
    """Generator: "mrnet" (the paper's: MRNet's heads on layer3 and concat(layer4, layer3)) or
    "deeplabv2" (AdaptSegNet's: ASPP heads on layer3 and layer4)."""
    depth: int = 101
    """ResNet depth of the backbone: 101 (paper), 50, 26 or 14 (toy and tests)."""
    width: int = 64
    """Channels of the stem; every stage scales with it (64 = the standard ResNet)."""
    num_classes: int = 19
    """Segmentation classes (19 Cityscapes trainIds)."""
    bn: Literal["stats", "frozen", "train"] = "stats"
    """Backbone BatchNorm: "stats" (affine frozen, batch statistics used and tracked, as AdaptSegNet and
    MRNet run it), "frozen" (affine and statistics fixed: eval-mode BN) or "train" (all trained)."""
    stride_on: Literal["auto", "1x1", "3x3"] = "auto"
    """Where a bottleneck strides: "1x1" (Caffe / DeepLab-v2 weights), "3x3" (torchvision weights);
    "auto" follows model.init_weights' layout ("1x1" without weights)."""
    head_width: int = 256
    """MRNet heads: channels of each of the five branches (256 in MRNet); the bottleneck has twice this."""
    head_norm: Literal["gn", "bn"] = "gn"
    """MRNet heads: GroupNorm(32) as MRNet's README trains them, or BatchNorm."""
    head_se: bool = True
    """MRNet heads: squeeze-excitation on the concatenated branches."""
    head_dropout: float = 0.1
    """MRNet heads: Dropout2d probability before the classifier."""
    init_weights: str = ""
    """Local file with initial weights for G: ImageNet / DeepLab / AdaptSegNet / MRNet weights (torchvision
    or "Scale." layout), or a warm start from a pwda_fast checkpoint (ckpt_*.pt, best.pt) or exported
    generator.pt (generator weights only; its generator keys must match and its input normalisation is
    used); "" = random."""
    disc_width: int = 64
    """Channels of the first output-space discriminator conv (64-128-256-512 in the paper)."""
    disc_stride: int = 32
    """Total stride of the output-space discriminator: 32 = the paper's D (five 4x4 stride-2 convs,
    16x32 cells on a 512x1024 crop); 16, 8, 4, 2 or 1 keep that many halvings and make the remaining
    convs 1x1, so each cell sees about 3 cells across as in the paper (the toy: 4, 16x32 cells on
    64x128 crops)."""
    aux_disc_width: int = 256
    """Hidden channels of D_aux's first 1x1 conv (then /2, /4); not given in the paper. D_aux runs at
    image size (adapt.aux_at), so its cost grows with this squared: see docs/METHOD.md."""


@dataclass
class DataConfig:
    source: Literal["toy", "toy_partial", "gta5", "synthia"] = "toy"
    """Source (labelled) domain: "toy", "toy_partial" (the built-in pairs; give both roles the same
    one), "gta5" or "synthia"."""
    target: Literal["toy", "toy_partial", "cityscapes"] = "toy"
    """Target (unlabelled) domain: "toy", "toy_partial" (some classes aligned, others shifted:
    docs/TOY_PARTIAL.md) or "cityscapes"."""
    source_root: str = ""
    """Root folder of the source dataset ("" = the toy cache)."""
    target_root: str = ""
    """Root folder of the target dataset ("" = the toy cache)."""
    source_prepared: str = ""
    """Where `pwda_fast.data.prepare --out` put the source's trainId labels ("" = source_root)."""
    target_prepared: str = ""
    """Where `pwda_fast.data.prepare --out` put the target's trainId labels ("" = target_root)."""
    loader: Literal["auto", "torch", "dali"] = "auto"
    """Input pipeline: "torch", "dali" or "auto" (DALI on a GPU when installed); both resume exactly."""
    image_format: Literal["auto", "original", "jpeg"] = "auto"
    """Which files the training sets read when `prepare --jpeg` wrote JPEG copies: "original", "jpeg"
    (the copies; an error without them) or "auto" (the copies only for DALI decoding on a GPU).
    Evaluation always reads the original images."""
    source_size: list[int] = field(default_factory=lambda: [1280, 720])
    """Source images are resized to this (width, height) before cropping."""
    target_size: list[int] = field(default_factory=lambda: [1024, 512])
    """Target images are resized to this (width, height)."""
    crop: list[int] = field(default_factory=lambda: [512, 1024])
    """Training crop (height, width), taken at random from the resized image."""
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random rescale range of source images before cropping ([1, 1] = none)."""
    flip: bool = False
    """Random horizontal flip of source images."""
    target_augment: bool = False
    """Also rescale (data.scale) and flip (data.flip) target images (MRNet and AdaptSegNet do not)."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Image resizing filter (labels always nearest); MRNet resizes with bicubic."""
    normalize: Literal["auto", "caffe", "imagenet"] = "auto"
    """Input normalisation: "caffe" (BGR, 0-255, minus the DeepLab mean, as DeepLab-v2 weights expect),
    "imagenet" (RGB / 255, ImageNet mean and std, as torchvision weights expect); "auto" follows
    model.init_weights' layout ("imagenet" without weights)."""
    batch_size: int = 1
    """Images per domain per step per process."""
    workers: int = -1
    """Loader worker processes; -1 = auto: none on 1-2 available cores (a worker would compete with
    the compute threads), else min(4, cores // 2)."""
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
    """Poly decay exponent: lr * (1 - step / poly_iters) ** power."""
    poly_iters: int = 0
    """Horizon of the poly decay (0 = train.iters); MRNet decays over 100k and keeps the 25k snapshot."""
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
    backbone_repeats: bool = False
    """Update each backbone tensor as often per step as MRNet's and AdaptSegNet's parameter list names
    it (conv1 once, bottleneck convs 3x, downsample convs 4x: 314 entries for R101's 104 tensors); their
    SGD stepped every entry, so their published numbers trained that way (docs/METHOD.md)."""


@dataclass
class AdaptConfig:
    mode: Literal["adapt", "source_only"] = "adapt"
    """"adapt" (three-stage PWDA loop) or "source_only" (stage 1 only, the baseline)."""
    weighting: Literal["none", "gen", "gen+dis"] = "gen+dis"
    """Pixel weighting: "none" (DA without pixel-wise weighting), "gen" (GenMap) or "gen+dis"
    (GenMap + DisMap, the paper's best)."""
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
    class_balance: bool = False
    """MRNet's class weighting of the source CE: classes with fewer than 64*64 pixels per image in the
    batch get weight class_balance_max (recomputed every batch)."""
    class_balance_max: float = 7.0
    """Weight of the rare classes under adapt.class_balance (MRNet: 7)."""
    often_balance: bool = False
    """With class_balance: also up-weight classes absent from recent batches (MRNet's running weight)."""
    hard_pixels: float = 0.0
    """Percentile of the per-pixel source CE below which pixels are ignored (MRNet: 80, i.e. keep the
    hardest 20%); 0 = every pixel."""
    memory: bool = False
    """MRNet memory regularisation on the target (KL toward the fused prediction)."""
    lambda_mem: float = 0.1
    """Weight of the memory regularisation."""
    memory_start: int = 0
    """Iteration at which the memory regularisation starts (MRNet: 15000)."""
    aux_at: Literal["image", "feature"] = "image"
    """Where D_aux runs: "image" (the paper: encodings upsampled to the input size; computed exactly by
    running D_aux's first 1x1 conv at feature size) or "feature" (feature size, logits upsampled)."""
    weight_grad: Literal["detached", "flowing"] = "detached"
    """The weights' gradient in the generator stage: "detached" (w a constant map) or "flowing" (into
    the seg logits and, through D_aux, the features, as CLAN's code does; that term then runs on the
    torch backend). D's stage always detaches. The paper does not say."""
    d_target: Literal["weighted", "unweighted", "normalized"] = "weighted"
    """D's target term in the discriminator stage: "weighted" (w * BCE, eq. 9 as written), "unweighted"
    (plain BCE) or "normalized" (w / mean(w) * BCE, the weights rescaled to mean 1); the paper leaves
    the choice open."""
    preheat_iters: int = 0
    """No pixel weighting (in the generator and the discriminator stage) before this iteration: CLAN's
    preheat (its NUM_STEPS_STOP / 20); the paper names none."""


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
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Autocast precision: "none" (fp32), "bf16", or "fp16" with a dynamic loss scale (for GPUs
    without bf16, such as V100 and T4): a step whose scaled gradients overflow is skipped and the
    scale halved."""
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
    resume: Literal["auto", "force"] = "auto"
    """"auto": resume run_dir's latest checkpoint only if the config matches it in every key that
    changes results; "force": resume whatever the differences (they are logged)."""
    threads: int = 0
    """Intra-op CPU threads of each process (0 = the cores available to it, divided among local ranks)."""
    eval_images: int = 0
    """Evaluate on the first this many target-val images only (0 = all); for quick runs and tests."""
    eval_protocol: Literal["single", "mrnet"] = "single"
    """Evaluation: "single" (main head, one scale) or "mrnet" (fused heads, scales 1 and 1.25, flips)."""


@dataclass
class KernelsConfig:
    backend: Literal["auto", "torch", "ext", "triton"] = "auto"
    """Weighted-loss backend: "auto", "torch", "ext" (C++/CUDA) or "triton"."""
    upsample: Literal["auto", "torch", "triton"] = "auto"
    """D_aux's leaky_relu(upsample(.)) at image size: "auto" (Triton on CUDA, else torch), "torch" or
    "triton"."""


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


# Valid ranges, checked when a config is loaded (before anything is built or written). Choices are
# the fields' Literal types; these are the numeric and path rules: key -> (test, rule in words).
# Dataset roots are checked by the data layer, whose message shows the expected folder layout.
_DEPTHS = (101, 50, 26, 14)
_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
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

# Keys that cannot change what a run computes: a resumed run may differ from its checkpoint in these
# (logged); any other difference is refused unless train.resume = "force".
RESULT_NEUTRAL = {
    "train.run_dir", "train.eval_every", "train.ckpt_every", "train.keep_last", "train.log_every",
    "train.stop_at", "train.max_skips", "train.eval_images", "train.eval_protocol", "train.device",
    "train.allow_world_size_change", "train.resume", "train.threads", "train.compile",
    "data.workers", "data.validate", "data.loader", "kernels.backend", "log.tensorboard", "log.images",
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


def _apply(cfg: Config, key: str, value) -> None:
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
                    _apply(cfg, f"{section}.{key}", value)
                except ConfigError as e:
                    raise ConfigError(f"{path}: {e}") from None
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value)
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
    """Markdown reference of every key: default and docstring (kept in the README by a test)."""
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
            "Generated from `pwda_fast/config.py` by "
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
