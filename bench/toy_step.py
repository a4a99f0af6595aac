"""Median wall time of one toy PWDA iteration (`Adapter.step` on real toy batches, 2 threads).

    python bench/toy_step.py [section.key=JSON ...]          e.g. 'data.crop=[64,128]'

Three warm-up steps, then the median and minimum of 11. For a CPU without AVX-512, run it with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (PyTorch's and oneDNN's kernels then use AVX2 only).
"""

import json
import sys
import time

import torch

from pwda_fast import config, engine
from pwda_fast.data import build_datasets
from pwda_fast.data.loader import train_loader


def main(argv: list[str]) -> None:
    torch.set_num_threads(2)
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in argv)}
    final = engine.finalize(config.load("toy", {"data.workers": 0, **overrides}))
    cfg = final.cfg
    adapter = engine.build(final, torch.device("cpu"), log=lambda *a: None).adapter
    data = build_datasets(cfg.data, log=lambda *a: None)
    b = cfg.data.batch_size
    src, tgt = train_loader(data["source"], b, 0, 0, 1, 0, 0), train_loader(data["target"], b, 1, 0, 1, 0, 0)
    batches = [(next(src), next(tgt)) for _ in range(14)]
    times = []
    for i, (s, t) in enumerate(batches):
        t0 = time.perf_counter()
        adapter.launch(300, s, t).read()  # past memory_start: the whole iteration
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    print(f"{overrides or 'toy preset'}: median step {times[len(times) // 2] * 1000:.0f} ms, "
          f"min {times[0] * 1000:.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
