"""Label tables and the per-layout label readers: raw ids -> Cityscapes trainIds, exactly."""

import numpy as np
import pytest
from data_trees import make_tree, write_png16
from PIL import Image

from pwda_fast.data import open_split
from pwda_fast.data.datasets import read_synthia_ids, to_train_ids
from pwda_fast.data.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CITYSCAPES_LABELS,
    CLASSES,
    IGNORE,
    SYNTHIA_13,
    SYNTHIA_16,
    SYNTHIA_ID_TO_TRAIN,
)

# The 19 evaluated classes as published (cityscapesscripts helpers/labels.py): labelId -> trainId.
PUBLISHED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_table_matches_the_published_train_ids():
    assert [i for _, i, _ in CITYSCAPES_LABELS] == list(range(34))
    assert {i: t for _, i, t in CITYSCAPES_LABELS if t != IGNORE} == PUBLISHED
    assert [n for n, _, t in sorted(CITYSCAPES_LABELS, key=lambda r: r[2]) if t != IGNORE] == list(CLASSES)
    expected = np.full(256, IGNORE)
    for label_id, train_id in PUBLISHED.items():
        expected[label_id] = train_id
    np.testing.assert_array_equal(CITYSCAPES_ID_TO_TRAIN, expected)


def test_cityscapes_table_matches_cityscapesscripts_when_installed():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels",
                                 reason="cityscapesscripts not installed (pip install --no-deps "
                                        "cityscapesscripts to run this cross-check)")
    published = {(lab.name, lab.id, lab.trainId) for lab in labels.labels if lab.id >= 0}
    assert published == set(CITYSCAPES_LABELS)


def test_synthia_mapping_and_protocol_classes():
    # SYNTHIA README ids of the classes (sky 1, building 2, road 3, ..., wall 21) -> trainIds.
    expected = {1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation",
                7: "pole", 8: "car", 9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle",
                15: "traffic light", 16: "terrain", 17: "rider", 18: "truck", 19: "bus", 20: "train",
                21: "wall"}
    for raw in range(1 << 16):
        want = CLASSES.index(expected[raw]) if raw in expected else IGNORE
        if SYNTHIA_ID_TO_TRAIN[raw] != want:
            pytest.fail(f"SYNTHIA id {raw} -> {SYNTHIA_ID_TO_TRAIN[raw]}, expected {want}")
    assert len(SYNTHIA_16) == 16 and not {"terrain", "truck", "train"} & set(SYNTHIA_16)
    assert len(SYNTHIA_13) == 13 and not {"wall", "fence", "pole"} & set(SYNTHIA_13)


def test_synthia_16bit_reader_keeps_all_bits(tmp_path):
    ids = np.array([[0, 3, 21, 22], [256 + 3, 300, 65535, 10]], np.uint16)
    write_png16(tmp_path / "l.png", np.stack([ids, np.full_like(ids, 4000), ids], -1))
    np.testing.assert_array_equal(read_synthia_ids(tmp_path / "l.png"), ids)
    write_png16(tmp_path / "a.png", np.stack([ids] * 4, -1))  # RGBA variant
    np.testing.assert_array_equal(read_synthia_ids(tmp_path / "a.png"), ids)
    train = np.asarray(to_train_ids(tmp_path / "l.png", read=read_synthia_ids, lut=SYNTHIA_ID_TO_TRAIN))
    # 259 and 300 are not SYNTHIA ids: void, not the class of their low byte.
    np.testing.assert_array_equal(train, [[IGNORE, 0, 3, IGNORE], [IGNORE, IGNORE, IGNORE, 11]])


@pytest.mark.parametrize("dataset", ["gta5", "synthia", "cityscapes"])
def test_each_layout_reads_exact_train_ids(tmp_path, dataset):
    made = make_tree(tmp_path, dataset, n=3)
    domain = open_split(dataset, str(tmp_path), "val" if dataset == "cityscapes" else "source")
    by_image = {img: lab for img, _, lab in made}
    assert len(domain.pairs) == 3
    for image, label in domain.pairs:
        np.testing.assert_array_equal(np.asarray(domain.label_reader(label)), by_image[image])
    if dataset == "gta5":  # the reader used the palette indices, not the palette colours
        assert Image.open(domain.pairs[0][1]).mode == "P"


def test_stored_train_ids_out_of_range_become_void(tmp_path):
    Image.fromarray(np.array([[0, 18, 19, 254, 255]], np.uint8), "L").save(tmp_path / "t.png")
    np.testing.assert_array_equal(np.asarray(to_train_ids(tmp_path / "t.png")), [[0, 18, 255, 255, 255]])


def test_cityscapes_train_split_is_unlabelled(tmp_path):
    make_tree(tmp_path, "cityscapes", n=2)
    pairs = open_split("cityscapes", str(tmp_path), "train").pairs
    assert len(pairs) == 2 and all(lab is None for _, lab in pairs)
