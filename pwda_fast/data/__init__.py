"""Datasets of both domains: file lists per published layout, then one input pipeline."""

from __future__ import annotations

from pathlib import Path

from pwda_fast.data import toy
from pwda_fast.data.loader import SegmentationDataset


def domain_files(name: str, root: str, split: str) -> list[tuple[Path, Path | None]]:
    """(image, trainId label or None) pairs of one split of one dataset."""
    if name == "toy":
        base = toy.ensure_toy(root or None)
        domain = "source" if split == "source" else "target"
        return toy.files(base, domain, "train" if split in ("source", "train") else "val")
    raise ValueError(f"dataset {name!r} is not supported by this build; use one of ('toy',)")


def build_datasets(data_cfg) -> dict[str, SegmentationDataset]:
    """DataConfig -> {"source": train set, "target": unlabelled train set, "val": labelled target val}."""
    aug = {"crop": data_cfg.crop, "scale": data_cfg.scale, "flip": data_cfg.flip}
    return {
        "source": SegmentationDataset(domain_files(data_cfg.source, data_cfg.source_root, "source"),
                                      size=data_cfg.source_size, **aug),
        "target": SegmentationDataset(domain_files(data_cfg.target, data_cfg.target_root, "train"),
                                      size=data_cfg.target_size, **aug),
        "val": SegmentationDataset(domain_files(data_cfg.target, data_cfg.target_root, "val"),
                                   size=data_cfg.target_size, train=False),
    }
