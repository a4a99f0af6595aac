"""The NVIDIA DALI input pipeline (data.loader=dali): the torch loader's semantics, decoded on the GPU.

Two file readers, one for images and one for labels, see file lists in the same order and share an
explicit seed and shard settings, so they draw the same permutation: sample i of the image stream is
the image of sample i of the label stream (the readers' index outputs are compared on every batch).
One random scale, crop position and flip per sample drive the image and its label (the dataset's
interpolation for images, nearest for labels); images are normalised as the dataset says
(normalization.py), decoded straight to BGR for "caffe". JPEG images decode on the GPU with
device="mixed"; PNG decodes on the CPU even then, hence `prepare --jpeg`. Without a GPU the whole
pipeline runs on the CPU (device_id=None).

Labels must be 8-bit trainId PNGs (the toy domains or a prepared tree): DALI decodes GTA5's palette
PNGs to colours and SYNTHIA's 16-bit labels to 8 bits, losing the class ids.

Resume: pipelines are built with DALI's checkpointing on, and DaliBatches.state() is the state of
the readers and random operators after the batches handed out so far (DALI records it per consumed
batch, so the two it prefetches are not in it). A pipeline rebuilt from that state continues with
the next batch an uninterrupted run would read: the same files, scales, crops and flips. The
training checkpoint keeps one state per rank and domain; a run resumed from one without it (written
by the torch loader or by another number of processes), or over a different number of files,
starts a fresh permutation seeded by (seed, k) instead, and says so.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pwda_fast.data import normalization
from pwda_fast.data.labels import CLASSES, IGNORE
from pwda_fast.data.loader import DataError, SegmentationDataset


@functools.cache
def import_error() -> ImportError | None:
    """Why DALI cannot be imported, or None. Imported on first use: it takes about 3 s."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401  (an optional extra: nvidia-dali-cuda130)
    except ImportError as e:
        return e
    return None


def available() -> bool:
    return import_error() is None


def choose(requested: str, dataset: SegmentationDataset, device: torch.device) -> str:
    """data.loader -> "dali" or "torch". An explicit "dali" that cannot run raises with the reason."""
    if requested == "torch":
        return "torch"
    problem = None
    if not available():
        problem = (f"NVIDIA DALI is not importable ({import_error()}); install it with "
                   f"`pip install nvidia-dali-cuda130` (or `pip install pwda_fast[dali]`)")
    elif not dataset.labels_are_train_ids and any(lab is not None for _, lab in dataset.pairs):
        first = next(lab for _, lab in dataset.pairs if lab is not None)
        problem = (f"labels such as {first} are not 8-bit trainId PNGs, the only labels DALI decodes "
                   f"without losing class ids; run `pwda-prepare --dataset "
                   f"gta5|synthia|cityscapes --root DIR` once for that dataset")
    if requested == "dali":
        if problem:
            raise DataError(f"data.loader=dali cannot run: {problem}; or set data.loader=torch")
        return "dali"
    # "auto": DALI pays off when it can decode on a GPU; on a CPU the torch loader is as fast.
    return "dali" if problem is None and device.type == "cuda" else "torch"


def _permuted(paths: list, seed: int) -> tuple[list[str], list[int]]:
    """Files in one seeded order: the readers' own shuffle is only a 1024-sample buffer, so without
    this the first epoch would follow the name order (consecutive GTA5 frames)."""
    order = np.random.default_rng(seed).permutation(len(paths)).tolist()
    return [str(paths[i]) for i in order], order


def _graph(images, labels, indices, size, crop, scale, flip, norm, interpolation, seed, shard, shards,
           gpu):
    """-> image (3, h, w) float normalised, [label (h, w) uint8 trainIds], index, [label index].

    norm: a normalization.Normalization; interpolation: "bilinear" | "bicubic" (images only).
    """
    from nvidia.dali import fn, types
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[interpolation]
    common = dict(seed=seed, shard_id=shard, num_shards=shards, random_shuffle=True,
                  pad_last_batch=False)
    encoded, index = fn.readers.file(files=images, labels=indices, name="images", **common)
    img = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                            output_type=types.BGR if norm.bgr else types.RGB)
    lab = lab_index = None
    if labels is not None:
        lab_encoded, lab_index = fn.readers.file(files=labels, labels=indices, **common)
        lab = fn.decoders.image(lab_encoded, device="cpu", output_type=types.GRAY)
        lab = lab.gpu() if gpu else lab

    lo, hi = scale
    # A fixed factor (lo == hi) as a constant node: DALI's uniform refuses an empty range.
    s = (fn.random.uniform(range=[lo, hi]) if lo < hi
         else types.Constant(float(lo), dtype=types.FLOAT, device="cpu"))
    if size is not None or (lo, hi) != (1.0, 1.0):
        if size is not None:
            w, h = float(size[0]), float(size[1])
        else:  # the encoded header says how large the image is
            shape = fn.cast(fn.peek_image_shape(encoded), dtype=types.FLOAT)
            h, w = shape[0], shape[1]
        if (lo, hi) != (1.0, 1.0):
            # DALI's cast rounds to nearest, halves away from zero: the torch loader's int(w * s + 0.5).
            w = fn.cast(fn.cast(w * s, dtype=types.INT32), dtype=types.FLOAT)
            h = fn.cast(fn.cast(h * s, dtype=types.INT32), dtype=types.FLOAT)
        # One resize with the combined factor: the same output size for image and label.
        img = fn.resize(img, resize_x=w, resize_y=h, interp_type=interp)
        if lab is not None:
            lab = fn.resize(lab, resize_x=w, resize_y=h, interp_type=types.INTERP_NN, antialias=False)

    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    window = {}
    if crop is not None:
        window = dict(crop_h=float(crop[0]), crop_w=float(crop[1]),
                      crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                      crop_pos_y=fn.random.uniform(range=[0.0, 1.0]),
                      out_of_bounds_policy="pad")
    # Padding is 0 after normalisation, i.e. the mean colour, as in the torch loader.
    img = fn.crop_mirror_normalize(img, mirror=mirror, mean=list(norm.mean), std=list(norm.std),
                                   dtype=types.FLOAT, output_layout="CHW", **window)
    if lab is None:
        return img, index
    if window:
        lab = fn.crop(lab, **{**window, "out_of_bounds_policy": "constant"}, fill_values=IGNORE)
    lab = fn.flip(lab, horizontal=mirror)
    # Stored values outside 0..18 become void, so the loss never sees an out-of-range class.
    lab = fn.lookup_table(lab, keys=list(range(len(CLASSES))), values=list(range(len(CLASSES))),
                          default_value=IGNORE, dtype=types.UINT8)
    return img, fn.reshape(lab, layout="HW", rel_shape=[1, 1]), index, lab_index


def pipeline(dataset: SegmentationDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1,
             threads: int = 2, device_id: int | None = None, checkpoint: bytes | None = None):
    """A built DALI pipeline over `dataset`'s files, augmentation, interpolation and normalisation
    settings (train mode), with checkpointing on; `checkpoint` (from a pipeline built with the same
    arguments) puts its readers and random operators where that one stood.

    Outputs per batch: image (B, 3, h, w) float32, label (B, h, w) uint8 and two (B,) int32 file
    indices (image and label reader) when the dataset has labels; else image and index.
    """
    from nvidia.dali import Pipeline

    images, order = _permuted([p[0] for p in dataset.pairs], seed)
    labelled = all(p[1] is not None for p in dataset.pairs)
    labels = _permuted([p[1] for p in dataset.pairs], seed)[0] if labelled else None
    seed %= 2**31
    pipe = Pipeline(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, seed=seed,
                    prefetch_queue_depth=2, enable_checkpointing=True, checkpoint=checkpoint)
    with pipe:
        pipe.set_outputs(*_graph(images, labels, order, dataset.size, dataset.crop, dataset.scale,
                                 dataset.flip, normalization.get(dataset.normalize),
                                 dataset.interpolation, seed, rank, world, device_id is not None))
    pipe.build()
    return pipe


def _data_error(e: RuntimeError) -> DataError:
    """DALI's error for a batch it could not produce (e.g. a corrupt file, which it does not name)."""
    said = [ln.strip() for ln in str(e).splitlines() if "operator" in ln or "failure" in ln]
    return DataError(f"DALI could not read a batch ({' '.join(said) or str(e).splitlines()[0]}); it does not "
                     "name the file: data.validate=\"full\" decodes every file before training and names the "
                     "bad ones (with data.skip_bad=true it leaves them out), or data.loader=torch names it")


class DaliBatches:
    """Endless {"image" (B, 3, h, w) float32, "label" (B, h, w) int64, "index" (B,)} batches from one
    DALI pipeline, and state(): where it stands, for train_loader(state=...) to continue from."""

    def __init__(self, iterator, labelled: bool, seed: int, files: int):
        self.iterator, self.labelled, self.seed, self.files = iterator, labelled, seed, files

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        try:  # None: an epoch ended, and auto_reset has rewound the iterator for the next one
            (out,) = next(self.iterator, None) or next(self.iterator)
        except RuntimeError as e:
            raise _data_error(e) from None
        image, index = out["image"], out["index"].reshape(-1).long()
        if self.labelled:
            if not torch.equal(index, out["label_index"].reshape(-1).long()):
                raise RuntimeError(f"DALI image and label readers fell out of step: images "
                                   f"{index.tolist()} vs labels {out['label_index'].flatten().tolist()}")
            label = out["label"].long()
        else:  # the unlabelled target: void everywhere, like the torch loader
            label = torch.full((image.shape[0], *image.shape[2:]), IGNORE, dtype=torch.int64,
                               device=image.device)
        return {"image": image, "label": label, "index": index}

    def state(self) -> dict:
        """{"seed": the pipeline's seed, "files": how many it reads, "pipeline": DALI's serialized
        checkpoint (bytes) after the batches handed out so far}."""
        return {"seed": self.seed, "files": self.files, "pipeline": self.iterator.checkpoints()[0]}


def train_loader(dataset: SegmentationDataset, batch_size: int, seed: int, rank: int, world: int,
                 start_step: int, workers: int, device: torch.device, state: dict | None = None
                 ) -> DaliBatches:
    """Endless batches (DaliBatches) of `dataset`.

    On a CUDA device images and labels arrive on that device. `seed` must be the same on every rank:
    the ranks shard one seeded file order. `state`, this rank's DaliBatches.state() of an earlier run
    with the same arguments, continues that run's batches exactly; without it a run resumed at
    start_step > 0 draws a fresh permutation (see the module docstring).
    """
    if not dataset.train:
        raise ValueError("the DALI pipeline serves training batches only; evaluate with val_loader")
    if state is not None and state["files"] != len(dataset):
        raise ValueError(f"a DALI state saved over {state['files']} files cannot continue over "
                         f"{len(dataset)}")
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    seed = state["seed"] if state is not None else seed * 1_000_003 + start_step
    pipe = pipeline(dataset, batch_size, seed, rank, world, workers, device_id,
                    state["pipeline"] if state is not None else None)
    labelled = all(p[1] is not None for p in dataset.pairs)
    names = ["image", "label", "index", "label_index"] if labelled else ["image", "index"]
    try:  # the iterator runs the pipeline for its first batch already
        it = DALIGenericIterator([pipe], names, reader_name="images", auto_reset=True,
                                 last_batch_policy=LastBatchPolicy.DROP)
    except RuntimeError as e:
        raise _data_error(e) from None
    return DaliBatches(it, labelled, seed, len(dataset))
