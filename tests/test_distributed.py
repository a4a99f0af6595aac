"""DDP on CPU (gloo, 2 processes via torch.multiprocessing): the engine's math across ranks.

Why 2 ranks x b equals 1 rank x 2b here: the sampler gives rank r the global positions r, r+2, ...,
so at step s the two ranks together read positions [2bs, 2bs + 2b), exactly the single process's
batch; augmentation depends on (seed, epoch, index) only. Every loss is a mean over the batch's
pixels, the D stage's cat(source, target) keeps that per rank, and DDP averages gradients over
ranks, so the mean of two per-rank means is the mean over 2b. model.bn=frozen keeps BatchNorm from
using per-rank batch statistics; the toy labels have no void pixel, so each rank's CE divides by the
same count. Stage 1 runs under no_sync and stage 2's backward reduces the accumulated gradient.
"""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import run_step

from pwda_fast import config, distributed, engine
from pwda_fast.data import build_datasets
from pwda_fast.data.loader import train_loader

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, batch: int, bn: str, nan_at: tuple[int, int] | None,
           extra: dict | None = None) -> dict:
    """STEPS iterations of the real Adapter on the toy data (config overrides `extra`); returns losses,
    skips and weights."""
    # No dropout: its random masks would differ between one process and the ranks' split of the batch.
    cfg = config.load("toy", {"model.bn": bn, "model.head_dropout": 0.0, "data.batch_size": batch,
                              "data.workers": 0,
                              "data.crop": [48, 96], "kernels.loss": "torch", "train.iters": 100,
                              **(extra or {})})
    info = distributed.Dist(rank, rank, world)
    eng = engine.build(cfg, torch.device("cpu"), info)  # DDP-wrapped when world > 1
    adapter, (g, d, d_aux) = eng.adapter, eng.nets
    data = build_datasets(cfg.data, None, lambda msg: None)
    src = train_loader(data["source"], batch, 7, rank, world, 0, 0)
    tgt = train_loader(data["target"], batch, 8, rank, world, 0, 0)
    out = {"losses": [], "stepped": [], "indices": [], "bn_finite": []}
    for step in range(STEPS):
        s, t = next(src), next(tgt)
        if nan_at == (rank, step):
            s["image"][0, :, :4, :4] = float("nan")
        out["indices"].append(sorted(s["index"].tolist() + [1000 + i for i in t["index"].tolist()]))
        losses, stepped = run_step(adapter, step, s, t)
        out["losses"].append(losses)
        out["stepped"].append(stepped)
        out["bn_finite"].append(all(bool(b.isfinite().all()) for b in g.buffers() if b.is_floating_point()))
    out["params"] = {f"{net}.{k}": v.detach().clone() for net, m in (("g", g), ("d", d), ("d_aux", d_aux))
                     for k, v in m.named_parameters()}
    return out


def _worker(rank, world, port, results, batch, bn, nan_at, extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = _train(rank, world, batch, bn, nan_at, extra)
    finally:
        dist.destroy_process_group()


def _spawn(batch: int, bn: str = "frozen", nan_at=None, extra=None) -> list[dict]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), results, batch, bn, nan_at, extra), nprocs=2)
        return [results[0], results[1]]


# MRNet's own adversary: D1 + D2 as one DDP module, its gradient penalty a double backward through it.
MRNET = {"adapt.adversary": "mrnet", "adapt.weighting": "none", "model.width": 8, "model.head_width": 16}


@pytest.mark.parametrize("extra", [{}, MRNET], ids=["pwda", "mrnet-adversary"])
def test_two_ranks_of_batch_b_match_one_rank_of_batch_2b(extra, one_thread):
    ranks = _spawn(batch=1, extra=extra)
    single = _train(0, 1, 2, "frozen", None, extra)
    for step in range(STEPS):  # the same samples per step, split between the ranks
        assert sorted(ranks[0]["indices"][step] + ranks[1]["indices"][step]) == single["indices"][step]
        assert ranks[0]["losses"][step] == ranks[1]["losses"][step]  # reduced: every rank logs the same
        for name, value in single["losses"][step].items():
            assert ranks[0]["losses"][step][name] == pytest.approx(value, rel=1e-4, abs=1e-6), \
                f"step {step} loss {name}: mean over ranks differs from the 1-process loss"
    assert all(ranks[0]["stepped"]) and all(single["stepped"])
    for name, want in single["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs by rank"
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


def test_nan_on_one_rank_skips_the_step_on_every_rank(one_thread):
    # bn=train: the NaN also reaches rank 1's BatchNorm statistics, which the skip must restore.
    ranks = _spawn(batch=1, bn="train", nan_at=(1, 1))
    for r in ranks:
        assert r["stepped"] == [True, False, True]
        assert all(r["bn_finite"])
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))
    assert all(same(a, b) for s0, s1 in zip(ranks[0]["losses"], ranks[1]["losses"])
               for a, b in zip(s0.values(), s1.values()))
    assert math.isnan(ranks[0]["losses"][1]["seg"])  # the logged mean carries the bad term
    for name, p0 in ranks[0]["params"].items():
        assert torch.isfinite(p0).all(), name
        assert torch.equal(p0, ranks[1]["params"][name]), f"{name} differs between ranks"


def test_skipped_step_restores_batchnorm_statistics(one_thread):
    alone = _train(0, 1, 1, "train", (0, 1))
    assert alone["stepped"] == [True, False, True] and all(alone["bn_finite"])
