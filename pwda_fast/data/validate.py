"""Pre-flight validation: find bad files before the first step, not 40k steps into a run.

"header" checks read only PNG/JPEG headers (existence, size, label mode): about 0.2 ms a file, so
25k GTA5 pairs take seconds. "full" also decodes every image and label and checks the label values
against the dataset's known ids (minutes for 25k pairs). Label values outside the known set never
reach the loss either way: the readers map them to 255 (void).
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pwda_fast.data.datasets import Domain

SHOWN = 20


def check_pair(domain: Domain, image: Path, label: Path | None, full: bool) -> str | None:
    """The problem with one (image, label) pair, or None when it is fine."""
    try:
        with Image.open(image) as img:
            size = img.size
            if full:
                img.load()
    except FileNotFoundError:
        return "image file is missing"
    except Exception as e:  # Pillow raises several types for truncated or foreign files
        return f"image does not decode ({type(e).__name__}: {e})"
    if label is None:
        return None
    try:
        with Image.open(label) as lab:
            lab_size, mode = lab.size, lab.mode
    except FileNotFoundError:
        raw = domain.raw_labels.get(label)
        if raw is not None and raw.is_file():
            return (f"has no prepared label: {label} is missing although the raw label {raw} is there "
                    f"(the prepared tree is out of date: rerun `{domain.prepare_command}`)")
        return f"has no label: {label} is missing"
    except Exception as e:
        return f"label {label} does not decode ({type(e).__name__}: {e})"
    if lab_size != size:
        return f"label {label} is {lab_size[0]}x{lab_size[1]} but the image is {size[0]}x{size[1]}"
    if mode not in domain.label_modes:
        return f"label {label} has Pillow mode {mode}, expected one of {sorted(domain.label_modes)}"
    if full:
        try:
            values = set(np.unique(domain.read_ids(label)).tolist())
        except Exception as e:
            return f"label {label} does not decode ({type(e).__name__}: {e})"
        unknown = sorted(values - domain.known_ids)
        if unknown:
            return f"label {label} holds values {unknown[:10]} outside the {domain.name} ids"
    return None


def find_bad(domain: Domain, full: bool = False, progress: bool = True) -> list[dict]:
    """[{"image", "label", "problem"}] for every bad pair of `domain`, in file order."""
    pairs = domain.pairs
    # Threads overlap the file-system latency of header reads (and Pillow's decoders release the GIL).
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        problems = list(tqdm(pool.map(lambda p: check_pair(domain, p[0], p[1], full), pairs),
                             total=len(pairs), desc=f"validate {domain.name}", leave=False,
                             disable=not progress or len(pairs) < 2000))
    return [{"image": str(img), "label": str(lab) if lab else None, "problem": problem}
            for (img, lab), problem in zip(pairs, problems) if problem]


def describe(bad: list[dict]) -> str:
    lines = [f"  {b['image']}: {b['problem']}" for b in bad[:SHOWN]]
    if len(bad) > SHOWN:
        lines.append(f"  ... and {len(bad) - SHOWN} more")
    return "\n".join(lines)


def validate(domain: Domain, role: str, *, full: bool = False, skip_bad: bool = False,
             max_bad_fraction: float = 0.01, log=print) -> tuple[Domain, list[dict]]:
    """-> (domain without its bad pairs, the bad pairs). `role` names it in messages ("source").

    Without skip_bad any bad pair raises ValueError; with it, bad pairs are dropped unless they are
    more than max_bad_fraction of the pairs.
    """
    bad = find_bad(domain, full)
    if not bad:
        return domain, bad
    total = len(domain.pairs)
    head = f"{role} data ({domain.name}): {len(bad)} of {total} files are bad"
    stale = sum("has no prepared label" in b["problem"] for b in bad)
    if stale:  # skipping cannot help here: the files are there, their prepared copies are not
        raise ValueError(f"{head}:\n{describe(bad)}\n{stale} of them are missing from the prepared tree "
                         f"only; rerun `{domain.prepare_command}` (it converts only what is missing).")
    if not skip_bad:
        raise ValueError(f"{head}:\n{describe(bad)}\nFix or remove them, or set data.skip_bad=true to "
                         f"train without them (up to data.max_bad_fraction={max_bad_fraction}).")
    if len(bad) > max_bad_fraction * total:
        raise ValueError(f"{head} ({100 * len(bad) / total:.1f}%), more than data.max_bad_fraction="
                         f"{max_bad_fraction} allows even with data.skip_bad:\n{describe(bad)}\n"
                         f"Check that the root folder holds the dataset in its published layout.")
    bad_images = {b["image"] for b in bad}
    kept = [p for p in domain.pairs if str(p[0]) not in bad_images]
    log(f"{head}; skipping them (data.skip_bad=true)")
    return dataclasses.replace(domain, pairs=kept), bad


def write_report(run_dir: str | Path, bad: dict[str, list[dict]]) -> Path:
    """{role: [bad pair]} -> run_dir/bad_files.json, written atomically (every rank writes the same)."""
    path = Path(run_dir) / "bad_files.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(bad, indent=2))
    tmp.replace(path)
    return path
