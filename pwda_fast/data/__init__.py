"""Datasets of both domains: file lists per published layout, validation, then one input pipeline."""

from __future__ import annotations

from pwda_fast.data import dali, toy
from pwda_fast.data.datasets import Domain, open_domain, stored_domain
from pwda_fast.data.loader import SegmentationDataset, train_loader
from pwda_fast.data.validate import validate, write_report

# The dataset split each role reads.
SPLITS = {"source": "source", "target": "train", "val": "val"}


def open_split(name: str, root: str, split: str, prepared_root: str = "") -> Domain:
    """One split of one dataset with its label reader; the toy domains are generated on first use."""
    if name == "toy":
        base = toy.ensure_toy(root or None)
        domain = "source" if split == "source" else "target"
        toy_split = "train" if split in ("source", "train") else "val"
        return stored_domain("toy", toy.files(base, domain, toy_split))
    if not root:
        raise ValueError(f"dataset {name!r} needs its root folder: set data.source_root / "
                         f"data.target_root (or --root) to where it was unpacked")
    return open_domain(name, root, split, prepared_root)


def _role(data_cfg, role: str) -> Domain:
    if role == "source":
        return open_split(data_cfg.source, data_cfg.source_root, "source", data_cfg.source_prepared)
    return open_split(data_cfg.target, data_cfg.target_root, SPLITS[role], data_cfg.target_prepared)


def _checked(data_cfg, role: str, log) -> tuple[Domain, list[dict]]:
    return validate(_role(data_cfg, role), role, full=data_cfg.validate == "full",
                     skip_bad=data_cfg.skip_bad, max_bad_fraction=data_cfg.max_bad_fraction, log=log)


def val_dataset(domain: Domain, size, normalize: str = "imagenet",
                interpolation: str = "bilinear") -> SegmentationDataset:
    """Evaluation set: images resized to `size` (width, height) with `interpolation` and normalised
    by `normalize` (data.normalize; "auto" reads as "imagenet"), labels at their stored resolution."""
    return SegmentationDataset(domain.pairs, size=size, train=False, label_reader=domain.label_reader,
                               labels_are_train_ids=domain.stored_train_ids, resize_label=False,
                               normalize=normalize, interpolation=interpolation)


def build_datasets(data_cfg, run_dir: str | None = None, log=print) -> dict[str, SegmentationDataset]:
    """DataConfig -> {"source": train set, "target": unlabelled train set, "val": labelled target val}.

    Every file is validated first (data.validate); with data.skip_bad the bad ones are left out and
    listed in run_dir/bad_files.json. Both training sets take the random crop; the random rescale
    and flip apply to the source, and to the target only with data.target_augment (MRNet and
    AdaptSegNet augment neither on the target). Every set is normalised by data.normalize, which
    the caller has resolved from the init weights ("auto" left unresolved reads as "imagenet").
    """
    domains, bad = {}, {}
    for role in SPLITS:
        domains[role], bad[role] = _checked(data_cfg, role, log)
    if run_dir and any(bad.values()):
        log(f"bad files listed in {write_report(run_dir, bad)}")
    pixels = {"normalize": data_cfg.normalize, "interpolation": data_cfg.interpolation}
    augment = {"scale": data_cfg.scale, "flip": data_cfg.flip}

    def train_set(domain: Domain, size, augmented: bool) -> SegmentationDataset:
        return SegmentationDataset(domain.pairs, size=size, crop=data_cfg.crop,
                                   label_reader=domain.label_reader,
                                   labels_are_train_ids=domain.stored_train_ids,
                                   **(augment if augmented else {}), **pixels)

    return {"source": train_set(domains["source"], data_cfg.source_size, True),
            "target": train_set(domains["target"], data_cfg.target_size, data_cfg.target_augment),
            "val": val_dataset(domains["val"], data_cfg.target_size, **pixels)}


def build_val(data_cfg, log=print) -> SegmentationDataset:
    """The validated target val set alone (for evaluation without touching the source data)."""
    return val_dataset(_checked(data_cfg, "val", log)[0], data_cfg.target_size, data_cfg.normalize,
                       data_cfg.interpolation)


def train_batches(data_cfg, dataset: SegmentationDataset, seed: int, rank: int, world: int,
                  start_step: int, device):
    """Endless {"image" (B, 3, h, w) float32, "label" (B, h, w) int64} batches of one domain.

    data.loader picks the pipeline (dali.choose); the torch loader resumes at `start_step` exactly,
    DALI with a fresh permutation.
    """
    kind = dali.choose(data_cfg.loader, dataset, device)
    if rank == 0:
        print(f"data: {len(dataset)} images through the {kind} loader")
    if kind == "dali":
        return dali.train_loader(dataset, data_cfg.batch_size, seed, rank, world, start_step,
                                 data_cfg.workers, device)
    return train_loader(dataset, data_cfg.batch_size, seed, rank, world, start_step, data_cfg.workers,
                        pin_memory=device.type == "cuda")
