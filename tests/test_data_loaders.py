"""Both input pipelines yield aligned image/label pairs through crop, rescale and flip, sharded by rank."""

import itertools

import numpy as np
import pytest
import torch
from data_trees import aligned_fraction, make_tree
from PIL import Image

from pwda_fast import config
from pwda_fast.data import build_datasets, dali, normalization, train_batches
from pwda_fast.data.loader import DataError, InfiniteSampler, SegmentationDataset
from pwda_fast.data.prepare import prepare

CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not installed "
                                "(pip install nvidia-dali-cuda130)")


def _cfg(src_name, src, tgt, **data):
    overrides = {"data.source": src_name, "data.source_root": str(src), "data.target": "cityscapes",
                 "data.target_root": str(tgt), "data.source_size": [80, 60], "data.target_size": [64, 48],
                 "data.crop": [40, 48], "data.scale": [0.8, 1.3], "data.flip": True, "data.batch_size": 4,
                 "data.workers": 0, **{f"data.{k}": v for k, v in data.items()}}
    return config.load(None, overrides).data


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    for name in ("gta5", "synthia", "cityscapes"):
        make_tree(root / name, name, n=12)
    prepared = root / "prepared"  # a prepared copy of GTA5 for DALI; the raw tree stays raw
    prepare("gta5", root / "gta5", out=prepared, jpeg=True, progress=False)
    prepare("cityscapes", root / "cityscapes", out=root / "prepared_city", jpeg=True, progress=False)
    return root


def _check_aligned(batch):
    images, labels = batch["image"].numpy(), batch["label"].numpy()
    assert images.shape[1:] == (3, 40, 48) and labels.shape[1:] == (40, 48)
    assert batch["label"].dtype == torch.int64
    for image, label in zip(images, labels):
        assert aligned_fraction(image, label) > 0.9
        # The check can fail: against the mirrored label the planted scene does not match.
        assert aligned_fraction(image, label[:, ::-1]) < 0.6


@pytest.mark.parametrize("source", ["gta5", "synthia"])
def test_torch_loader_aligned_from_raw_labels(trees, source):
    sets = build_datasets(_cfg(source, trees / source, trees / "cityscapes", loader="torch"))
    cfg = _cfg(source, trees / source, trees / "cityscapes")
    batches = train_batches(cfg, sets["source"], 3, 0, 1, 0, CPU)
    for batch in itertools.islice(batches, 3):
        _check_aligned(batch)


def test_torch_loader_val_keeps_full_label_resolution(trees):
    sets = build_datasets(_cfg("gta5", trees / "gta5", trees / "cityscapes"))
    item = sets["val"][0]
    assert item["image"].shape == (3, 48, 64) and item["label"].shape == (48, 64)
    big = SegmentationDataset(sets["val"].pairs, size=(32, 24), train=False,
                              label_reader=sets["val"].label_reader, resize_label=False)[0]
    assert big["image"].shape == (3, 24, 32) and big["label"].shape == (48, 64)


@pytest.mark.parametrize("size", [(80, 60), None])
def test_torch_loader_resizes_once_to_the_scaled_size(tmp_path, size):
    """MRNet's loader and the DALI pipeline: one resize from the stored image to round(size * s); not
    a resize to `size` followed by a second one by s, which would blur the image twice."""
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(rng.integers(0, 19, (70, 100), dtype=np.uint8), "L").save(tmp_path / "l.png")
    ds = SegmentationDataset([(tmp_path / "i.png", tmp_path / "l.png")], size=size, scale=(0.8, 1.3),
                             interpolation="bicubic", normalize="imagenet")
    for draw in range(4):
        s = np.random.default_rng(draw).uniform(0.8, 1.3)  # the sample's first draw is its scale
        w, h = size or (100, 70)
        scaled = (int(w * s + 0.5), int(h * s + 0.5))
        image = np.asarray(Image.open(tmp_path / "i.png").resize(scaled, Image.BICUBIC), np.float32)
        label = np.asarray(Image.open(tmp_path / "l.png").resize(scaled, Image.NEAREST), np.int64)
        item = ds[(0, draw)]
        assert item["image"].shape == (3, scaled[1], scaled[0])
        expected = normalization.apply(image, "imagenet").transpose(2, 0, 1)
        np.testing.assert_array_equal(item["image"].numpy(), expected)
        np.testing.assert_array_equal(item["label"].numpy(), label)


def test_torch_sharding_is_disjoint_per_rank():
    def share(size, rank, world):
        return [i for i, _ in itertools.islice(InfiniteSampler(size, seed=5, rank=rank, world=world),
                                                -(-size // world))]
    shares = [share(12, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(12))  # one epoch: every file once, on one rank
    shares = [share(10, r, 3) for r in range(3)]  # uneven: 2 files repeat so every rank gets 4
    assert set(sum(shares, [])) == set(range(10)) and len(sum(shares, [])) == 12


def test_loader_choice():
    ds = SegmentationDataset([("a.png", "raw/labels/a.png")], labels_are_train_ids=False)
    assert dali.choose("torch", ds, CPU) == "torch"
    assert dali.choose("auto", ds, CPU) == "torch"
    if dali.available():
        with pytest.raises(DataError, match="raw/labels/a.png are not 8-bit trainId.*pwda-prepare"):
            dali.choose("dali", ds, CPU)
        assert dali.choose("dali", SegmentationDataset([]), CPU) == "dali"


def test_explicit_dali_without_dali_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dali, "import_error", lambda: ImportError("No module named 'nvidia.dali'"))
    with pytest.raises(DataError, match="pip install nvidia-dali-cuda130.*data.loader=torch"):
        dali.choose("dali", SegmentationDataset([]), CPU)
    assert dali.choose("auto", SegmentationDataset([]), torch.device("cuda")) == "torch"


@needs_dali
def test_dali_cpu_pipeline_aligned_with_prepared_labels(trees):
    cfg = _cfg("gta5", trees / "gta5", trees / "cityscapes", loader="dali",
               source_prepared=str(trees / "prepared"), target_prepared=str(trees / "prepared_city"),
               image_format="jpeg")
    sets = build_datasets(cfg)
    assert sets["source"].pairs[0][0].suffix == ".jpg" and sets["target"].pairs[0][0].suffix == ".jpg"
    assert all(image.suffix == ".png" for image, _ in sets["val"].pairs)  # evaluation: the originals
    batches = train_batches(cfg, sets["source"], 3, 0, 1, 0, CPU)
    seen = set()
    for batch in itertools.islice(batches, 3):
        _check_aligned(batch)
        seen |= set(batch["index"].tolist())
    assert len(seen) == 12  # three batches of four: one epoch, every file once
    target = next(train_batches(cfg, sets["target"], 4, 0, 1, 0, CPU))  # unlabelled: all void
    assert target["image"].shape == (4, 3, 40, 48) and (target["label"] == 255).all()


@needs_dali
def test_dali_pads_with_mean_and_void_and_voids_out_of_range(tmp_path):
    lab = np.full((20, 24), 3, np.uint8)
    lab[0, 0] = 77  # not a trainId: must reach the loss as void
    Image.fromarray(lab, "L").save(tmp_path / "l.png")
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "i.png")
    ds = SegmentationDataset([(tmp_path / "i.png", tmp_path / "l.png")], crop=(32, 40))
    batch = next(dali.train_loader(ds, 1, 0, 0, 1, 0, 1, CPU))
    label, image = batch["label"][0], batch["image"][0]
    assert label.shape == (32, 40) and set(label.unique().tolist()) == {3, 255}
    assert (label == 3).sum() == 20 * 24 - 1
    padded = (label == 255) & (image.abs().sum(0) < 1e-4)  # void and the mean colour
    assert padded.sum() == 32 * 40 - 20 * 24


@needs_dali
def test_dali_sharding_is_disjoint_per_rank(trees):
    cfg = _cfg("gta5", trees / "gta5", trees / "cityscapes", source_prepared=str(trees / "prepared"),
               batch_size=2)
    ds = build_datasets(cfg)["source"]
    shares = []
    for rank in range(3):
        it = dali.train_loader(ds, 2, 11, rank, 3, 0, 1, CPU)
        shares.append(set(itertools.chain.from_iterable(next(it)["index"].tolist() for _ in range(2))))
    assert all(len(s) == 4 for s in shares)
    assert set().union(*shares) == set(range(12))  # disjoint: 3 x 4 distinct files out of 12
