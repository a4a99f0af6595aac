"""The settings: one dataclass per config section, the documentation of each key the string under it.

Only the schema lives here (names, types, defaults, meanings). Reading TOML presets and command-line
overrides, the valid ranges, --help and the generated reference (docs/CONFIG.md, from these
docstrings) are pwda_fast/config.py's job.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal


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
    ms_disc_stride: int = 8
    """Stride of scale 0 of MRNet's multi-scale discriminators (adapt.adversary = "mrnet"): 8 = MRNet's
    (three 3x3 stride-2 convs; 64x128 cells on a 512x1024 crop, each seeing 155 pixels); 4, 2 or 1
    keep that many halvings and make the remaining stride-2 convs 1x1, as model.disc_stride does for
    the paper's D (the toy: 1, MRNet's 64x128 cells on 64x128 crops, fields of 21 pixels, its 155
    shrunk 8x)."""
    ms_disc_width: int = 32
    """Width of MRNet's multi-scale discriminators (adapt.adversary = "mrnet"): 32 = MRNet's MsImageDis
    dim (its residual blocks at twice that); the toy takes 8, MRNet's 32 / 4 as its BCE D's 16 is the
    paper's 64 / 4."""
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
    """Source images are resized to this (width, height) times the random scale (data.scale), once,
    before cropping."""
    target_size: list[int] = field(default_factory=lambda: [1024, 512])
    """Target images are resized to this (width, height)."""
    crop: list[int] = field(default_factory=lambda: [512, 1024])
    """Training crop (height, width), taken at random from the resized image."""
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Random rescale range of source images, applied in the same single resize as
    data.source_size ([1, 1] = none)."""
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
    warmup_d: bool = False
    """The discriminators' learning rates warm up with G's over optim.warmup_iters, from
    optim.warmup_start of optim.lr_d (CLAN's preheat ramps both from 0: warmup_start = 0)."""
    impl: Literal["auto", "torch", "apex"] = "auto"
    """Optimizer implementation: "auto" (torch's fused SGD and Adam, on CUDA and CPU: they skip a
    non-finite step on a device flag, so the step never waits for the GPU), "torch" (torch's own
    default per device) or "apex"."""
    backbone_repeats: bool = False
    """Update each backbone tensor as often per step as MRNet's and AdaptSegNet's parameter list names
    it (conv1 once, bottleneck convs 3x, downsample convs 4x: 314 entries for R101's 104 tensors); their
    SGD stepped every entry, so their published numbers trained that way (docs/METHOD.md)."""


@dataclass
class AdaptConfig:
    mode: Literal["adapt", "source_only"] = "adapt"
    """"adapt" (three-stage PWDA loop) or "source_only" (stage 1 only, the baseline)."""
    weighting: Literal["none", "gen", "gen+dis", "gen+aux"] = "gen+dis"
    """Pixel weighting: "none" (DA without pixel-wise weighting), "gen" (GenMap) or "gen+dis"
    (GenMap + DisMap, the paper's best: D_aux and its feature-level term, eq. 8, train, and w = eq. 6);
    "gen+aux" trains D_aux and its term as gen+dis does but weights by GenMap alone (w = eq. 4): the
    ablation that separates adding the feature-level adversary from weighting by it."""
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
    """No pixel weighting (in the generator and the discriminator stage) before this iteration; the
    paper names none. CLAN's preheat of P steps (its NUM_STEPS_STOP / 20) weights from step P + 1 and
    ramps both learning rates from 0 over the first P: preheat_iters = P + 1 with optim.warmup_iters = P,
    optim.warmup_start = 0, optim.warmup_d = true."""
    adversary: Literal["pwda", "mrnet"] = "pwda"
    """The output-space adversary: "pwda" (the paper's: AdaptSegNet's BCE D on the main head, D_aux on
    the features, pixel weighting as adapt.weighting says) or "mrnet" (MRNet as published, what the
    paper's "DA without pixel-wise weighting" row ran: two multi-scale LSGAN discriminators, D1 on
    the aux head and D2 on the main head, source side fed softmax(0.5 * aux + main), gradient penalty
    0.01, weights lambda_mrnet_aux / lambda_mrnet_main; needs adapt.weighting = "none"). D_aux is
    not used with "mrnet"; docs/METHOD.md."""
    lambda_mrnet_aux: float = 2e-4
    """adapt.adversary = "mrnet": weight of D1's LSGAN loss on the aux head in the generator stage
    (MRNet's --lambda-adv-target1 0.0002)."""
    lambda_mrnet_main: float = 1e-3
    """adapt.adversary = "mrnet": weight of D2's LSGAN loss on the main head in the generator stage
    (MRNet's --lambda-adv-target2 0.001)."""


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
    cuda_graphs: bool = False
    """Replay the whole training iteration as one CUDA graph after 3 eager ones (pwda_fast/graphs.py):
    one GPU, no torch.compile, train.amp "none" or "bf16", optim.impl "auto". Experimental: off until
    the H200 measurement decides its default."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, as a preemption would (0 = run to train.iters)."""
    max_skips: int = 20
    """Stop (exit code 3) after this many consecutive steps skipped for non-finite values."""
    allow_world_size_change: bool = False
    """Allow resuming a checkpoint written with a different number of processes."""
    resume: Literal["auto", "force"] = "auto"
    """"auto": resume run_dir's latest checkpoint only if the config matches it in every key of the
    method (keys that only choose how it runs, such as threads, kernels or logging, may differ; they and
    another build are logged); "force": resume whatever the differences (they are logged)."""
    threads: int = 0
    """Intra-op CPU threads of each process (0 = the cores available to it, divided among local ranks)."""
    eval_images: int = 0
    """Evaluate on the first this many target-val images only (0 = all); for quick runs and tests."""
    eval_protocol: Literal["single", "mrnet"] = "single"
    """Evaluation: "single" (main head, one scale) or "mrnet" (fused heads, scales 1 and 1.25, flips)."""


@dataclass
class KernelsConfig:
    loss: Literal["auto", "torch", "ext", "ext_v2", "triton"] = "auto"
    """The weighted adversarial loss's kernel (ops.weighted_adv_loss): "auto" (ext where it runs, else
    Triton on CUDA, else torch), "torch", "ext" (C++/CUDA), "ext_v2" (the second CUDA kernel: 16-byte
    loads, one launch per forward; opt-in until a GPU run has validated it) or "triton". Was
    kernels.backend, which is still read."""
    upsample: Literal["auto", "torch", "triton"] = "auto"
    """D_aux's leaky_relu(upsample(.)) at image size (ops.upsample_leaky_relu): "auto" (Triton on CUDA,
    else torch), "torch" or "triton"."""


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
