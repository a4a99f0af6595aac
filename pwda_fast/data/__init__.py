"""Datasets of both domains: file lists per published layout, validation, then one input pipeline."""

from __future__ import annotations

import torch

from pwda_fast.data import dali, toy, toy_partial
from pwda_fast.data.datasets import Domain, open_domain, stored_domain
from pwda_fast.data.labels import CLASSES
from pwda_fast.data.loader import DataError, SegmentationDataset, train_loader
from pwda_fast.data.validate import validate, write_report

# The dataset split each role reads.
SPLITS = {"source": "source", "target": "train", "val": "val"}
# The built-in toy pairs, generated on first use: name -> (generator, classes grouped for reports).
TOY_PAIRS = {"toy": (toy.ensure_toy, toy.CLASS_GROUPS),
             "toy_partial": (toy_partial.ensure_toy_partial, toy_partial.CLASS_GROUPS)}


def class_groups(name: str) -> dict[str, tuple[int, ...]]:
    """{group: trainIds} of dataset `name`: toy_partial's "aligned" and "shifted" classes; for the
    other datasets one group "all" (the toy's classes, or all 19)."""
    return TOY_PAIRS[name][1] if name in TOY_PAIRS else {"all": tuple(range(len(CLASSES)))}


def open_split(name: str, root: str, split: str, prepared_root: str = "") -> Domain:
    """One split of one dataset with its label reader; the toy domains are generated on first use."""
    if name in TOY_PAIRS:
        base = TOY_PAIRS[name][0](root or None)
        domain = "source" if split == "source" else "target"
        toy_split = "train" if split in ("source", "train") else "val"
        return stored_domain(name, toy.files(base, domain, toy_split))
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


def _reads_jpeg(data_cfg, domain: Domain, dataset: SegmentationDataset, gpu_dali: bool) -> bool:
    """Whether a training set reads prepare's JPEG copies (data.image_format) instead of the originals;
    "auto" reads them only where DALI decodes on a GPU."""
    if data_cfg.image_format == "jpeg" and not domain.jpeg:
        raise DataError(f"data.image_format=jpeg, but {domain.name} has no JPEG copies; run "
                        f"`{domain.prepare_command or f'pwda-prepare --dataset {domain.name} --root DIR'}"
                        f"{'' if '--jpeg' in domain.prepare_command else ' --jpeg'}`, or set "
                        "data.image_format=original")
    auto = data_cfg.image_format == "auto" and gpu_dali and bool(domain.jpeg)
    use = auto or data_cfg.image_format == "jpeg"
    missing = [str(domain.jpeg[image]) for image, _ in dataset.pairs if not domain.jpeg[image].is_file()] \
        if use else []
    if missing:
        raise DataError(f"{len(missing)} JPEG copies of {domain.name} are missing (first: {missing[0]}); "
                        f"rerun `{domain.prepare_command}`, or set data.image_format=original")
    return use


def build_datasets(data_cfg, run_dir: str | None = None, log=print,
                   device: torch.device | None = None) -> dict[str, SegmentationDataset]:
    """DataConfig -> {"source": train set, "target": unlabelled train set, "val": labelled target val}.

    Every file is validated first (data.validate); with data.skip_bad the bad ones are left out and
    listed in run_dir/bad_files.json (and files that fail to decode later are skipped and logged).
    Both training sets take the random crop; the random rescale and flip apply to the source, and to
    the target only with data.target_augment (MRNet and AdaptSegNet augment neither on the target).
    Every set is normalised by data.normalize, which the caller has resolved from the init weights
    ("auto" left unresolved reads as "imagenet"). The training sets read prepare's JPEG copies where
    data.image_format asks for them (on `device`, for "auto"); target-val always reads the originals.
    """
    device = device or torch.device("cpu")
    domains, bad = {}, {}
    for role in SPLITS:
        domains[role], bad[role] = _checked(data_cfg, role, log)
    if run_dir and any(bad.values()):
        log(f"bad files listed in {write_report(run_dir, bad)}")
    pixels = {"normalize": data_cfg.normalize, "interpolation": data_cfg.interpolation}
    augment = {"scale": data_cfg.scale, "flip": data_cfg.flip}

    def train_set(domain: Domain, size, augmented: bool) -> SegmentationDataset:
        dataset = SegmentationDataset(domain.pairs, size=size, crop=data_cfg.crop,
                                      label_reader=domain.label_reader,
                                      labels_are_train_ids=domain.stored_train_ids,
                                      skip_bad=data_cfg.skip_bad, **(augment if augmented else {}), **pixels)
        # An explicit data.loader=dali that cannot run is refused here, before the run folder is touched.
        gpu_dali = dali.choose(data_cfg.loader, dataset, device) == "dali" and device.type == "cuda"
        if _reads_jpeg(data_cfg, domain, dataset, gpu_dali):
            dataset.pairs = [(domain.jpeg[image], label) for image, label in dataset.pairs]
            log(f"data: {domain.name} training images are read from prepare's JPEG copies")
        return dataset

    return {"source": train_set(domains["source"], data_cfg.source_size, True),
            "target": train_set(domains["target"], data_cfg.target_size, data_cfg.target_augment),
            "val": val_dataset(domains["val"], data_cfg.target_size, **pixels)}


def build_val(data_cfg, log=print) -> SegmentationDataset:
    """The validated target val set alone (for evaluation without touching the source data)."""
    return val_dataset(_checked(data_cfg, "val", log)[0], data_cfg.target_size, data_cfg.normalize,
                       data_cfg.interpolation)


def train_batches(data_cfg, dataset: SegmentationDataset, seed: int, rank: int, world: int,
                  start_step: int, device, state: dict | None = None, log=print):
    """Endless {"image" (B, 3, h, w) float32, "label" (B, h, w) int64} batches of one domain.

    data.loader picks the pipeline (dali.choose). Both resume at `start_step` exactly: the torch
    loader from the step alone, DALI from `state`, the `state()` its batches reported at that step
    (kept in the training checkpoint); without a usable one DALI draws a fresh permutation.
    """
    kind = dali.choose(data_cfg.loader, dataset, device)
    if rank == 0:
        log(f"data: {len(dataset)} images through the {kind} loader")
    if kind == "dali":
        if state is not None and state["files"] != len(dataset):
            log(f"warning: the checkpoint's DALI position is over {state['files']} files, the dataset "
                f"now has {len(dataset)}: DALI starts a fresh permutation at step {start_step}")
            state = None
        elif state is None and start_step > 0 and rank == 0:
            log(f"warning: the checkpoint holds no DALI position (written with data.loader=torch or "
                f"another number of processes): DALI starts a fresh permutation at step {start_step}")
        return dali.train_loader(dataset, data_cfg.batch_size, seed, rank, world, start_step,
                                 data_cfg.workers, device, state)
    return train_loader(dataset, data_cfg.batch_size, seed, rank, world, start_step, data_cfg.workers,
                        pin_memory=device.type == "cuda")
