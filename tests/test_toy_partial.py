"""The toy_partial pair: deterministic per seed, cached, aligned classes alike and shifted ones not."""

import numpy as np
import pytest

from pwda_fast import config
from pwda_fast.data import class_groups, open_split, toy, toy_partial
from pwda_fast.data.labels import CLASSES

TINY = {("source", "train"): 3, ("target", "train"): 2, ("target", "val"): 2}


@pytest.fixture
def tiny_pair(monkeypatch):
    """Generate 7 scenes instead of 1300."""
    monkeypatch.setattr(toy_partial, "SPLITS", TINY)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, tiny_pair):
    a = toy_partial.ensure_toy_partial(tmp_path / "a", log=lambda _: None, seed=7)
    b = toy_partial.ensure_toy_partial(tmp_path / "b", log=lambda _: None, seed=7)
    c = toy_partial.ensure_toy_partial(tmp_path / "c", log=lambda _: None, seed=8)
    assert a.name == "toy_partial-v1-s7" and c.name == "toy_partial-v1-s8"
    files_a, files_b, files_c = _files(a), _files(b), _files(c)
    # 3 + 2 + 2 images, labels for source/train and target/val only, the COMPLETE marker.
    assert len(files_a) == 7 + 5 + 1
    assert files_a == files_b
    images = [name for name in files_a if name.name.endswith("_leftImg8bit.png")]
    assert all(files_a[name] != files_c[name] for name in images)


def test_second_call_reuses_the_cache(tmp_path, tiny_pair):
    logged = []
    out = toy_partial.ensure_toy_partial(tmp_path, log=logged.append, seed=0)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert len(logged) == 1 and "toy_partial v1 seed 0" in logged[0] and "(7 scenes)" in logged[0]
    assert toy_partial.ensure_toy_partial(tmp_path, log=logged.append, seed=0) == out
    assert len(logged) == 1  # nothing generated
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert not list(tmp_path.glob(".toy_partial*"))  # no temporary folder left behind


def test_the_dataset_code_reads_it_from_the_config_choice(tmp_path, tiny_pair):
    toy_partial.ensure_toy_partial(tmp_path, log=lambda _: None)
    source = open_split("toy_partial", str(tmp_path), "source")
    target = open_split("toy_partial", str(tmp_path), "train")
    val = open_split("toy_partial", str(tmp_path), "val")
    assert source.name == "toy_partial" and len(source.pairs) == 3 and all(lab for _, lab in source.pairs)
    assert len(target.pairs) == 2 and all(lab is None for _, lab in target.pairs)  # target train: unlabelled
    assert len(val.pairs) == 2 and all(lab.is_file() for _, lab in val.pairs)
    cfg = config.load("toy", {"data.source": "toy_partial", "data.target": "toy_partial"})
    assert (cfg.data.source, cfg.data.target) == ("toy_partial", "toy_partial")


def test_class_groups_split_the_toy_classes():
    groups = class_groups("toy_partial")
    assert set(groups) == {"aligned", "shifted"}
    assert sorted(groups["aligned"] + groups["shifted"]) == sorted(toy.TOY_CLASSES)
    assert not set(groups["aligned"]) & set(groups["shifted"])
    assert class_groups("toy") == {"all": toy.TOY_CLASSES}
    assert class_groups("cityscapes") == {"all": tuple(range(len(CLASSES)))}


def test_labels_do_not_depend_on_the_domain():
    """Rendering is the only difference: the k-th scene has one layout whichever domain renders it."""
    for k in range(5):
        (src, lab_s), (tgt, lab_t) = toy_partial.scene(3, "source", k), toy_partial.scene(3, "target", k)
        assert np.array_equal(lab_s, lab_t) and not np.array_equal(src, tgt)


def _class_statistics(domain: str, scenes: int = 80, seed: int = 5) -> dict[int, tuple[np.ndarray, float]]:
    """{class: (mean RGB over all its pixels, mean within-image sd of its pixels' brightness)} over
    independent scenes of `domain` (the two domains get disjoint scene numbers, as in the pair)."""
    offset = 0 if domain == "source" else 10_000
    sums, counts, sds = {}, {}, {}
    for k in range(scenes):
        image, lab = toy_partial.scene(seed, domain, offset + k)
        image = image.astype(np.float64)
        for cls in toy.TOY_CLASSES:
            pixels = image[lab == cls]
            if len(pixels) > 20:
                sums[cls] = sums.get(cls, 0) + pixels.sum(0)
                counts[cls] = counts.get(cls, 0) + len(pixels)
                sds.setdefault(cls, []).append(pixels.mean(1).std())
    return {cls: (sums[cls] / counts[cls], float(np.mean(sds[cls]))) for cls in sums}


def test_aligned_classes_look_alike_across_domains_and_shifted_ones_do_not():
    source, target = _class_statistics("source"), _class_statistics("target")
    for cls in toy_partial.ALIGNED:
        colour_gap = np.abs(source[cls][0] - target[cls][0]).max()
        # 80 scenes: the per-image colour offset (sd 8) averages to about 1 level; 4 leaves room.
        assert colour_gap < 4, (CLASSES[cls], colour_gap)
        assert abs(source[cls][1] - target[cls][1]) < 1, CLASSES[cls]  # the same noise, no texture
    for cls in toy_partial.SHIFTED:
        colour_gap = np.abs(source[cls][0] - target[cls][0]).max()
        assert colour_gap > 40, (CLASSES[cls], colour_gap)
        assert target[cls][1] > source[cls][1] + 5, CLASSES[cls]  # joints, grain, windows, two-tone clothes


def test_shifted_target_colours_sit_nearer_another_class_than_their_own():
    """The design rule of docs/TOY_PARTIAL.md: a source-trained model has a reason to mislabel them."""
    new = {toy.SIDEWALK: [toy_partial.SIDEWALK_T], toy.TERRAIN: [toy_partial.TERRAIN_T],
           toy.CAR: list(toy_partial.CAR_BODIES_T), toy.PERSON: list(toy_partial.PERSON_TOPS_T)}
    for cls, colours in new.items():
        for rgb in colours:
            own = np.linalg.norm(np.subtract(rgb, toy.SOURCE_COLOURS[cls]))
            nearest_other = min(np.linalg.norm(np.subtract(rgb, c)) for k, c in toy.SOURCE_COLOURS.items()
                                if k != cls)
            assert nearest_other < own, (CLASSES[cls], rgb)
