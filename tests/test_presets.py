"""Every value of the paper presets, pinned against a table that says where it comes from.

One row per key of the resolved config (every section, defaults included). Sources, as docs/METHOD.md
names them: "paper" = Tian, Qu, Payeur, Unsupervised Pixel-Wise Weighted Adversarial Domain
Adaptation; "README" = MRNet's Stage-I command in layumi/Seg-Uncertainty's README.md; train_ms.py,
trainer_ms.py, utils/tool.py, dataset/*.py, model/deeplab_multi.py, evaluate_cityscapes.py = MRNet's
code there (the code wins where it and a paper differ: METHOD.md §7); "AdaptSegNet" =
wasidennis/AdaptSegNet; "engine" = a choice of this engine, not a setting of the method.
A changed value, a key without a row, or a key newly set in a preset file fails here.
"""

import tomllib

import pytest

from pwda_fast import config

GTA5 = {
    # --- model ---
    "model.arch": ("mrnet", "paper §5.2: MRNet's 'ResNet-101 with memory module' as the FCN backbone"),
    "model.depth": (101, "paper §5.2 ResNet-101; deeplab_multi.py DeeplabMulti blocks [3, 4, 23, 3]"),
    "model.width": (64, "deeplab_multi.py ResNetMulti inplanes = 64 (the DeepLab init weights' shapes)"),
    "model.num_classes": (19, "the 19 Cityscapes classes; train_ms.py NUM_CLASSES = 19"),
    "model.bn": ("stats", "deeplab_multi.py BN requires_grad = train_bn (no --train_bn in README), model "
                          "kept in train(): frozen affine, batch statistics (METHOD.md §3)"),
    "model.stride_on": ("auto", "engine: follows init_weights; DeepLab init -> '1x1', deeplab_multi.py's "
                                "'# change' stride on the 1x1 conv"),
    "model.head_width": (256, "deeplab_multi.py Classifier_Module: 256-channel branches"),
    "model.head_norm": ("gn", "README --norm-style gn"),
    "model.head_se": (True, "README --use-se"),
    "model.head_dropout": (0.1, "README --drop 0.1 (train_ms.py --droprate)"),
    "model.init_weights": ("", "given by the user: README / train_ms.py RESTORE_FROM "
                               "DeepLab_resnet_pretrained_init (the engine downloads nothing)"),
    "model.disc_width": (64, "paper §5.2 D 64-128-256-512-1; AdaptSegNet model/discriminator.py ndf = 64"),
    "model.disc_stride": (32, "paper §5.2 / AdaptSegNet model/discriminator.py: five 4x4 stride-2 convs"),
    "model.ms_disc_stride": (8, "adversary mrnet only: model/ms_discriminator.py MsImageDis, three "
                                "stride-2 convs per scale (not used by the paper's rows)"),
    "model.ms_disc_width": (32, "adversary mrnet only: trainer_ms.py MsImageDis dim 32 (not used by the "
                                "paper's rows)"),
    "model.aux_disc_width": (256, "engine: the paper gives no D_aux widths; METHOD.md §2"),
    # --- data ---
    "data.source": ("gta5", "paper: GTA5 -> Cityscapes"),
    "data.target": ("cityscapes", "paper: GTA5 -> Cityscapes"),
    "data.source_root": ("", "engine: given by the user"),
    "data.target_root": ("", "engine: given by the user"),
    "data.source_prepared": ("", "engine: prepared labels beside the images"),
    "data.target_prepared": ("", "engine: prepared labels beside the images"),
    "data.loader": ("auto", "engine"),
    "data.image_format": ("auto", "engine"),
    "data.source_size": ([1280, 720], "train_ms.py INPUT_SIZE = '1280,720'"),
    "data.target_size": ([1024, 512], "train_ms.py INPUT_SIZE_TARGET = '1024,512'"),
    "data.crop": ([512, 1024], "README --crop-size 1024,512 (width, height; train_ms.py makes it (h, w))"),
    "data.scale": ([0.8, 1.2], "dataset/gta5_dataset.py random_scale = 0.8 + random() * 0.4 (scale=True)"),
    "data.flip": (True, "train_ms.py GTA5DataSet(mirror=True)"),
    "data.target_augment": (False, "train_ms.py cityscapesDataSet(scale=False, mirror=args.random_mirror), "
                                   "no --random-mirror in README"),
    "data.interpolation": ("bicubic", "dataset/gta5_dataset.py image.resize(..., Image.BICUBIC)"),
    "data.normalize": ("auto", "engine: follows init_weights; DeepLab init -> 'caffe' = train_ms.py "
                               "IMG_MEAN, BGR 0-255 (METHOD.md §4)"),
    "data.batch_size": (2, "README --batch-size 2 (on --gpu-ids 0,1: METHOD.md §7)"),
    "data.workers": (4, "engine (train_ms.py NUM_WORKERS = 2)"),
    "data.skip_bad": (False, "engine"),
    "data.max_bad_fraction": (0.01, "engine"),
    "data.validate": ("header", "engine"),
    # --- optim ---
    "optim.lr": (2e-4, "README --learning-rate 2e-4"),
    "optim.momentum": (0.9, "train_ms.py MOMENTUM = 0.9"),
    "optim.weight_decay": (5e-4, "train_ms.py WEIGHT_DECAY = 0.0005"),
    "optim.power": (0.9, "train_ms.py POWER = 0.9; utils/tool.py lr_poly"),
    "optim.poly_iters": (100000, "train_ms.py NUM_STEPS = 100000, lr_poly's horizon (README sets none)"),
    "optim.head_lr_mult": (10.0, "utils/tool.py adjust_learning_rate: param_groups[1] at lr * 10"),
    "optim.lr_d": (1e-4, "train_ms.py LEARNING_RATE_D = 1e-4 (AdaptSegNet's too)"),
    "optim.betas": ([0.9, 0.99], "trainer_ms.py optim.Adam(betas=(0.9, 0.99)) (AdaptSegNet's too)"),
    "optim.nesterov": (True, "trainer_ms.py optim.SGD(nesterov=True)"),
    "optim.warmup_iters": (5000, "README --warm-up 5000"),
    "optim.warmup_start": (0.1, "utils/tool.py adjust_learning_rate: lr * (0.1 + 0.9 * i / warm_up)"),
    "optim.warmup_d": (False, "adjust_learning_rate_D: poly 0.9, no warm-up (METHOD.md); "
                           "CLAN ramps D as well"),
    "optim.impl": ("auto", "engine"),
    "optim.backbone_repeats": (True, "model/deeplab_multi.py get_1x_lr_params_NOscale lists each "
                                     "backbone tensor once per module above it; SGD stepped each entry"),
    # --- adapt ---
    "adapt.mode": ("adapt", "paper: the adapted model, not the source-only baseline"),
    "adapt.weighting": ("gen+dis", "paper Table 3's best row: GenMap + DisMap, eq. (6)"),
    "adapt.threshold": (0.9, "paper eq. (3): T = 0.9"),
    "adapt.floor": (0.01, "paper eq. (3): 0.01 above T"),
    "adapt.mu": (0.1, "paper eqs. (4), (6): mu = 0.1"),
    "adapt.lambda_adv": (5e-4, "paper eq. (8): lambda_adv"),
    "adapt.lambda_aux": (5e-4, "paper eq. (8): D_aux's term under the same lambda_adv"),
    "adapt.lambda_seg": (0.5, "README --lambda-seg 0.5"),
    "adapt.class_balance": (True, "README --class-balance"),
    "adapt.class_balance_max": (7.0, "README --max-value 7"),
    "adapt.often_balance": (True, "README --often-balance"),
    "adapt.hard_pixels": (80.0, "README --only-hard-label 80"),
    "adapt.memory": (True, "README --lambda-kl-target 0.1 (trainer_ms.py loss_kl)"),
    "adapt.lambda_mem": (0.1, "README --lambda-kl-target 0.1"),
    "adapt.memory_start": (15000, "trainer_ms.py: lambda_kl is 0 while i_iter < 15000"),
    "adapt.aux_at": ("image", "paper §5.2: encodings up-sampled to the input image size before D_aux"),
    "adapt.weight_grad": ("detached", "paper silent; its weighting map read as a constant (METHOD.md §1)"),
    "adapt.d_target": ("weighted", "paper eq. 9: D's target term weighted by w as written"),
    "adapt.preheat_iters": (0, "the paper names no preheat (CLAN's is an option)"),
    "adapt.adversary": ("pwda", "paper §5.2: AdaptSegNet's D (and D_aux) in place of MRNet's MsImageDis "
                                "D1, D2"),
    "adapt.lambda_mrnet_aux": (2e-4, "README --lambda-adv-target1 0.0002 (read only with adversary mrnet)"),
    "adapt.lambda_mrnet_main": (1e-3, "README --lambda-adv-target2 0.001 (read only with adversary mrnet)"),
    # --- train ---
    "train.iters": (25000, "README: pseudo labels and Stage II start from GTA5_25000.pth"),
    "train.run_dir": ("runs/gta5_to_cityscapes", "engine"),
    "train.seed": (1234, "train_ms.py RANDOM_SEED = 1234 (defined, unused there)"),
    "train.eval_every": (5000, "engine: at each checkpoint"),
    "train.ckpt_every": (5000, "train_ms.py SAVE_PRED_EVERY = 5000"),
    "train.keep_last": (3, "engine"),
    "train.log_every": (10, "engine"),
    "train.device": ("auto", "engine"),
    "train.amp": ("none", "engine: fp32, as MRNet trains without --fp16"),
    "train.channels_last": (False, "engine"),
    "train.compile": (False, "engine"),
    "train.cuda_graphs": (False, "engine: experimental, off until measured on an H200"),
    "train.stop_at": (0, "engine"),
    "train.max_skips": (20, "engine"),
    "train.allow_world_size_change": (False, "engine"),
    "train.resume": ("auto", "engine"),
    "train.threads": (0, "engine"),
    "train.eval_images": (0, "all 500 Cityscapes val images, as evaluate_cityscapes.py"),
    "train.eval_protocol": ("mrnet", "evaluate_cityscapes.py: fused heads, scales 1 and 1.25, flips "
                                     "(METHOD.md §6)"),
    # --- kernels, log ---
    "kernels.loss": ("auto", "engine"),
    "kernels.upsample": ("auto", "engine"),
    "log.tensorboard": (False, "engine"),
    "log.images": (1, "engine"),
}

SYNTHIA = {
    **GTA5,
    "data.source": ("synthia", "paper: SYNTHIA (RAND-CITYSCAPES) -> Cityscapes"),
    # train_ms_synthia.py keeps INPUT_SIZE = '1280,720' from the GTA5 script (README gives no SYNTHIA
    # command); the preset keeps SYNTHIA's own aspect instead (METHOD.md §4).
    "data.source_size": ([1280, 760], "SYNTHIA's native 1280x760 (METHOD.md §4)"),
    "train.run_dir": ("runs/synthia_to_cityscapes", "engine"),
}

TABLES = {"gta5_to_cityscapes": GTA5, "synthia_to_cityscapes": SYNTHIA}

# Keys both preset files leave to the dataclass defaults; every other key is written in the file.
DEFAULTED = {
    "model.num_classes", "model.init_weights", "model.disc_stride", "model.ms_disc_stride",
    "model.ms_disc_width",
    "data.source_root", "data.target_root", "data.source_prepared", "data.target_prepared", "data.loader",
    "data.image_format", "data.skip_bad", "data.max_bad_fraction", "data.validate",
    "optim.impl", "optim.warmup_d",
    "train.seed", "train.keep_last", "train.log_every", "train.device", "train.amp", "train.channels_last",
    "train.compile", "train.cuda_graphs", "train.stop_at", "train.max_skips", "train.allow_world_size_change",
    "train.resume",
    "train.threads", "train.eval_images", "adapt.weight_grad", "adapt.d_target",
    "adapt.preheat_iters", "adapt.adversary", "adapt.lambda_mrnet_aux", "adapt.lambda_mrnet_main",
    "kernels.loss", "kernels.upsample", "log.tensorboard", "log.images",
}


def resolved(preset: str) -> dict:
    return {f"{s}.{k}": v for s, keys in config.load(preset).to_dict().items() for k, v in keys.items()}


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_every_resolved_key_has_a_row(preset):
    keys, table = set(resolved(preset)), TABLES[preset]
    assert not sorted(keys - set(table)), "keys without a row here: add each with its value and source"
    assert not sorted(set(table) - keys), "rows for keys the config no longer has"
    assert all(source.strip() for _, source in table.values())


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_every_preset_value_is_the_cited_one(preset):
    got, table = resolved(preset), TABLES[preset]
    wrong = {k: (got[k], want) for k, (want, _) in table.items()
             if k in got and (got[k] != want or type(got[k]) is not type(want))}
    assert not wrong, f"{preset}: {{key: (preset value, cited value)}} = {wrong}"


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_preset_file_sets_the_keys_it_is_expected_to(preset):
    data = tomllib.loads((config.CONFIG_DIR / f"{preset}.toml").read_text())
    written = {f"{section}.{key}" for section, keys in data.items() for key in keys}
    assert written == set(TABLES[preset]) - DEFAULTED, (
        f"written in {preset}.toml but pinned as a default: {sorted(written & DEFAULTED)}; "
        f"pinned as written but not in the file: {sorted(set(TABLES[preset]) - DEFAULTED - written)}")


def test_every_paper_preset_has_a_table():
    # toy is the engine's demo, not a setting of the paper.
    presets = {p.stem for p in config.CONFIG_DIR.glob("*.toml")} - {"toy"}
    assert presets == set(TABLES)
