"""Input normalisation end to end: the numbers each layout of weights expects, through both loaders;
bicubic resizing; target augmentation only when asked."""

import numpy as np
import pytest
import torch
from data_trees import make_tree
from PIL import Image

from pwda_fast import config, pictures
from pwda_fast.data import build_datasets, dali, normalization
from pwda_fast.data.loader import SegmentationDataset

CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not installed "
                                "(pip install nvidia-dali-cuda130)")
H, W = 6, 10


def caffe_expected(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W): BGR, 0-255, minus the DeepLab mean (written out here, not
    read from the module under test)."""
    bgr = rgb[..., ::-1].astype(np.float32)
    return (bgr - np.array([104.00698793, 116.66876762, 122.67891434], np.float32)).transpose(2, 0, 1)


def imagenet_expected(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W): RGB / 255, ImageNet mean and std, in float64."""
    x = rgb.astype(np.float64) / 255
    return ((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)


EXPECTED = {"caffe": caffe_expected, "imagenet": imagenet_expected}


@pytest.fixture
def pair(tmp_path):
    """A tiny PNG whose every pixel and channel differs, and its trainId label -> (paths, rgb)."""
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[0, 0] = (250, 120, 5)  # a pixel where a red/blue swap is large
    lab = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 19
    Image.fromarray(rgb).save(tmp_path / "i.png")
    Image.fromarray(lab, "L").save(tmp_path / "l.png")
    return (tmp_path / "i.png", tmp_path / "l.png"), rgb, lab


def test_definitions_and_round_trip():
    pixel = np.array([[[250, 120, 5]]], np.float32)  # R, G, B
    assert normalization.apply(pixel, "caffe")[0, 0].tolist() == pytest.approx(
        [5 - 104.00698793, 120 - 116.66876762, 250 - 122.67891434], abs=1e-4)
    assert normalization.apply(pixel, "imagenet")[0, 0].tolist() == pytest.approx(
        [(250 / 255 - 0.485) / 0.229, (120 / 255 - 0.456) / 0.224, (5 / 255 - 0.406) / 0.225], abs=1e-5)
    x = np.random.default_rng(1).uniform(0, 255, (5, 7, 3)).astype(np.float32)
    for name in normalization.NAMES:
        np.testing.assert_allclose(normalization.undo(normalization.apply(x, name), name), x, atol=1e-4)
        mean_rgb = np.array(normalization.get(name).mean[::-1] if name == "caffe"
                            else normalization.get(name).mean, np.float32)
        assert np.abs(normalization.apply(mean_rgb, name)).max() < 1e-5  # the mean colour is 0
    assert normalization.get("auto") is normalization.IMAGENET  # unresolved: the no-weights choice
    with pytest.raises(ValueError, match="'bgr'; valid: caffe, imagenet"):
        normalization.get("bgr")


@pytest.mark.parametrize("name", ["caffe", "imagenet"])
def test_torch_loader_end_to_end(pair, name):
    paths, rgb, lab = pair
    item = SegmentationDataset([paths], train=False, normalize=name)[0]
    np.testing.assert_allclose(item["image"].numpy(), EXPECTED[name](rgb), atol=1e-5)
    assert item["label"].numpy().tolist() == lab.tolist()
    # Padding a crop larger than the image: the mean colour (0 after normalisation) and void.
    padded = SegmentationDataset([paths], crop=(H + 2, W + 3), normalize=name)[(0, 5)]
    image, label = padded["image"].numpy(), padded["label"].numpy()
    assert (image[:, label == 255] == 0).all() and (label == 255).sum() == (H + 2) * (W + 3) - H * W
    # The picture of the input has the file's colours again (a caffe input is BGR).
    assert (pictures.to_rgb(item["image"], name) == rgb).all()


@needs_dali
@pytest.mark.parametrize("name", ["caffe", "imagenet"])
def test_dali_pipeline_end_to_end(pair, name):
    paths, rgb, lab = pair
    batch = next(dali.train_loader(SegmentationDataset([paths], normalize=name), 1, 0, 0, 1, 0, 1, CPU))
    np.testing.assert_allclose(batch["image"][0].numpy(), EXPECTED[name](rgb), atol=1e-4)
    assert batch["label"][0].numpy().tolist() == lab.tolist()
    padded = SegmentationDataset([paths], crop=(H + 2, W + 3), normalize=name)
    batch = next(dali.train_loader(padded, 1, 0, 0, 1, 0, 1, CPU))
    image, label = batch["image"][0].numpy(), batch["label"][0].numpy()
    assert (np.abs(image[:, label == 255]) < 1e-4).all() and (label == 255).sum() == (H + 2) * (W + 3) - H * W


@pytest.fixture
def textured(tmp_path):
    """A 40x30 image with sharp edges and noise (where bicubic and bilinear disagree) and a label."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rgb[:, ::4] = 255
    lab = rng.choice(np.array([0, 2, 13, 255], np.uint8), (30, 40))
    Image.fromarray(rgb).save(tmp_path / "i.png")
    Image.fromarray(lab, "L").save(tmp_path / "l.png")
    return (tmp_path / "i.png", tmp_path / "l.png"), {0, 2, 13, 255}


def _torch_item(paths, interpolation, **kw):
    return SegmentationDataset([paths], size=(27, 17), train=False, interpolation=interpolation, **kw)[0]


def test_torch_bicubic_differs_and_labels_stay_exact(textured):
    paths, ids = textured
    linear, cubic = (_torch_item(paths, i) for i in ("bilinear", "bicubic"))
    assert (linear["image"] - cubic["image"]).abs().max() > 0.1
    assert torch.equal(linear["label"], cubic["label"]) and set(cubic["label"].unique().tolist()) <= ids
    expected = np.asarray(Image.open(paths[0]).resize((27, 17), Image.BICUBIC))
    np.testing.assert_allclose(cubic["image"].numpy(), imagenet_expected(expected), atol=1e-5)
    # The random rescale of training uses the same filter.
    train = [SegmentationDataset([paths], scale=(0.6, 0.6), interpolation=i)[(0, 3)] for i in
             ("bilinear", "bicubic")]
    assert (train[0]["image"] - train[1]["image"]).abs().max() > 0.1
    assert torch.equal(train[0]["label"], train[1]["label"])
    with pytest.raises(ValueError, match="'nearest' is not one of bilinear, bicubic"):
        SegmentationDataset([paths], interpolation="nearest")


@needs_dali
def test_dali_bicubic_differs_and_labels_stay_exact(textured):
    paths, ids = textured
    out = {}
    for interpolation in ("bilinear", "bicubic"):
        ds = SegmentationDataset([paths], size=(27, 17), scale=(1.3, 1.3), interpolation=interpolation)
        out[interpolation] = next(dali.train_loader(ds, 1, 0, 0, 1, 0, 1, CPU))
    linear, cubic = out["bilinear"], out["bicubic"]
    assert linear["image"].shape == (1, 3, 22, 35)  # 17 * 1.3 and 27 * 1.3, rounded
    # The torch loader's one resize reaches the same size.
    torch_item = SegmentationDataset([paths], size=(27, 17), scale=(1.3, 1.3))[(0, 0)]
    assert torch_item["image"].shape == (3, 22, 35) and torch_item["label"].shape == (22, 35)
    assert (linear["image"] - cubic["image"]).abs().max() > 0.1
    assert torch.equal(linear["label"], cubic["label"]) and set(cubic["label"].unique().tolist()) <= ids


def _sets(tmp_path, **data):
    make_tree(tmp_path / "gta5", "gta5", n=2)
    make_tree(tmp_path / "cityscapes", "cityscapes", n=2)
    overrides = {"data.source": "gta5", "data.source_root": str(tmp_path / "gta5"),
                 "data.target": "cityscapes", "data.target_root": str(tmp_path / "cityscapes"),
                 "data.source_size": [64, 48], "data.target_size": [64, 48], "data.crop": [48, 64],
                 "data.scale": [0.5, 1.5], "data.flip": True, "data.normalize": "caffe",
                 "data.interpolation": "bicubic", **{f"data.{k}": v for k, v in data.items()}}
    return build_datasets(config.load(None, overrides).data, log=lambda _: None)


@pytest.mark.parametrize("target_augment", [False, True])
def test_target_augmented_only_when_asked(tmp_path, target_augment):
    sets = _sets(tmp_path, target_augment=target_augment)
    for role in ("source", "target", "val"):
        assert (sets[role].normalize, sets[role].interpolation) == ("caffe", "bicubic")
    assert (sets["source"].scale, sets["source"].flip) == ((0.5, 1.5), True)
    assert sets["target"].crop == [48, 64]
    # The crop covers the whole 64x48 target image: without rescale and flip every draw is the same.
    draws = [sets["target"][(0, d)]["image"] for d in range(8)]
    assert all(torch.equal(draws[0], d) for d in draws) is not target_augment
    if not target_augment:
        assert (sets["target"].scale, sets["target"].flip) == ((1.0, 1.0), False)
        plain = SegmentationDataset(sets["target"].pairs, size=(64, 48), train=False, normalize="caffe",
                                    interpolation="bicubic")
        assert torch.equal(draws[0], plain[0]["image"])


@pytest.mark.parametrize("layout, name, stride",
                         [("caffe", "caffe", "1x1"), ("torchvision", "imagenet", "3x3")])
def test_init_weights_layout_decides_normalisation_end_to_end(tmp_path, layout, name, stride):
    """A small init file in each layout -> the resolved config -> what the loader feeds the network."""
    from pwda_fast import engine
    from pwda_fast.models import build_networks

    cfg = config.load("toy", {"model.bn": "train"})
    g = build_networks(cfg.model)[0]
    backbone = {k: v for k, v in g.state_dict().items() if not k.startswith(("aux_head.", "main_head."))}
    state = ({"Scale." + k: v for k, v in backbone.items()} if layout == "caffe"
             else {**backbone, "fc.weight": torch.zeros(1000, 8), "fc.bias": torch.zeros(1000)})
    torch.save(state, tmp_path / "init.pth")
    cfg = engine.finalize(config.load("toy", {"model.init_weights": str(tmp_path / "init.pth")})).cfg
    assert (cfg.data.normalize, cfg.model.stride_on) == (name, stride)
    val = build_datasets(cfg.data, None, lambda msg: None)["val"]
    item = val[0]
    rgb = np.asarray(Image.open(val.pairs[0][0]).convert("RGB"))
    assert rgb.shape[:2] == tuple(item["image"].shape[1:])  # the toy is stored at its training size
    np.testing.assert_allclose(item["image"].numpy(), EXPECTED[name](rgb), atol=1e-4)
