"""The training step never makes the host wait for the device, on every preset and recipe.

A host sync in the step (host_syncs.py says which ops those are) stops the CPU from queueing the next
kernels until the GPU has caught up, and raises inside a CUDA-graph capture. The recorder sees the
same aten ops on CPU tensors, so these tests prove on CPU what a GPU run would otherwise find out:
every launched iteration after the first (whose optimizer step creates G's momentum and so decides
on the host, Adapter.skips_on_device) records nothing. The losses are read one step late, outside
the recording, as the training loop reads them. Under DDP (2 CPU ranks) the whole loop is recorded:
the stop request rides in the step's own all-reduce instead of a read per step.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_overrides
from host_syncs import HostSyncs

from pwda_fast import checkpoint, config, engine, ops, reference, train

TINY = {"model.depth": 14, "model.width": 8, "model.head_width": 16, "model.disc_width": 8,
        "model.aux_disc_width": 8, "data.crop": [32, 64]}
BATCH_CROP = (32, 64)  # of the `batches` fixture (conftest.py)
# MRNet's recipe at toy size: class balance with its running weight, hard pixels, the memory term
# switched on inside the recorded steps (a new phase), Nesterov momentum.
RECIPE = {"adapt.class_balance": True, "adapt.often_balance": True, "adapt.hard_pixels": 80.0,
          "adapt.memory": True, "adapt.memory_start": 2, "optim.nesterov": True}
CASES = {
    "toy": {},
    "paper-recipe": RECIPE,
    "class-balance-without-running-weight": {**RECIPE, "adapt.often_balance": False},
    "mrnet-adversary": {**RECIPE, "adapt.adversary": "mrnet", "adapt.weighting": "none"},
    "backbone-repeats": {**RECIPE, "optim.backbone_repeats": True},
    "preheat": {"adapt.preheat_iters": 2},
    "gen-only": {"adapt.weighting": "gen"},
    "no-weighting": {"adapt.weighting": "none"},
    "weight-grad-flowing": {"adapt.weight_grad": "flowing"},
    "d-target-normalized": {"adapt.d_target": "normalized"},
    "aux-at-feature": {"adapt.aux_at": "feature"},
    "bn-stats": {"model.bn": "stats"},
    "fp16": {**RECIPE, "train.amp": "fp16"},
    "bf16-channels-last": {**RECIPE, "train.amp": "bf16", "train.channels_last": True},
    "source-only": {"adapt.mode": "source_only"},
}
STEPS = 5

pytestmark = pytest.mark.usefixtures("one_thread")


def _record_steps(eng: engine.Engine, batches) -> HostSyncs:
    """STEPS launches on alternating batches; all but the first recorded, each read after the next
    launch (as train.py reads them)."""
    syncs, pending = HostSyncs(), None
    for step in range(STEPS):
        source, target = batches[step % len(batches)]
        source, target = dict(source), dict(target)
        if step == 0:
            result = eng.adapter.launch(step, source, target)
        else:
            with syncs:
                result = eng.adapter.launch(step, source, target)
        if pending is not None:
            pending.read()
        pending = result
    assert pending.read().stepped
    return syncs


def _build(overrides: dict, backend: str) -> engine.Engine:
    return engine.build(config.load("toy", {**TINY, **overrides, "kernels.loss": backend}),
                        torch.device("cpu"))


@pytest.mark.parametrize("case", list(CASES))
def test_launched_iterations_never_wait_for_the_device(case, batches):
    backend = "ext" if "ext" in ops.LOSS.available() else "torch"
    syncs = _record_steps(_build(CASES[case], backend), batches)
    assert not syncs.found, syncs.report()


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_each_loss_backend_is_sync_free(backend, batches):
    if backend not in ops.LOSS.available():
        pytest.skip(f"backend {backend!r}: {ops.LOSS.problem(backend, 'cpu')}")
    syncs = _record_steps(_build(RECIPE, backend), batches)
    assert not syncs.found, syncs.report()


def test_the_recorder_finds_the_boolean_mask_that_seg_ce_had(monkeypatch, batches):
    """The check would have caught reference.py's class_weights[labels[valid]] (a nonzero per head)."""
    def masked_seg_ce(logits, labels, class_weights=None):
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=class_weights,
                                                 ignore_index=255, reduction="sum")
        return loss / class_weights[labels[labels != 255]].sum()

    monkeypatch.setattr(reference, "seg_ce", masked_seg_ce)
    syncs = _record_steps(_build(RECIPE, "torch"), batches)
    assert syncs.found and all(s.op == "aten.index" for s in syncs.found), syncs.report()
    assert "boolean mask" in syncs.report() and "test_host_syncs.py" not in syncs.report()
    assert len(syncs.found) == 2 * (STEPS - 1)  # both heads, every recorded step


def test_the_recorder_names_reads_and_the_line_that_made_them():
    with HostSyncs() as syncs:
        t = torch.ones(3)
        t.sum().item()
        t.tolist()
        bool(t.any())
        torch.unique(t)
        torch.equal(t, t)
        t[t > 0]
        with syncs.allowed("a read by design"):
            t.sum().item()
    assert [s.op for s in syncs.found] == ["aten._local_scalar_dense", "Tensor.tolist",
                                           "aten._local_scalar_dense", "aten._unique2", "aten.equal",
                                           "aten.index"]
    assert "no pwda_fast frame" in syncs.found[0].where


# -- the whole loop, one process and two -------------------------------------------------------------

def _loop_overrides(run_dir) -> dict:
    return tiny_overrides(run_dir, **TINY, **RECIPE, **{"train.iters": 6, "train.ckpt_every": 6,
                                                         "kernels.loss": "torch"})


def _record_loop(trainer: train.Trainer, monkeypatch, stop_on_rank_at=None) -> HostSyncs:
    """trainer.run() recorded from its second launch to its last: the set-up, the loader, the one-step-
    late read, the first launch and the checkpoint at the end may wait (by design, or not per step).
    stop_on_rank_at (rank, step): that rank alone is asked to stop before that step, as by SIGTERM."""
    syncs = HostSyncs()

    def let_through(owner, name: str, why: str) -> None:
        method = getattr(owner, name)

        def allowed(*args, **kwargs):
            with syncs.allowed(why):
                return method(*args, **kwargs)
        monkeypatch.setattr(owner, name, allowed)

    for name in ("evaluate", "finish", "loader_positions"):
        let_through(trainer, name, "not per step")
    for name in ("training_state", "save"):
        let_through(checkpoint, name, "checkpoint cadence")
    let_through(train.StepResult, "read", "the losses are read one step late")
    batches, setup = trainer.batches, trainer.setup

    def loader(start):
        it = batches(start)
        for step in range(start, 10**9):
            with syncs.allowed("the loader's work is host-side"):
                pair = next(it)
            if stop_on_rank_at == (trainer.dist.rank, step):
                trainer.stop_requested = True
            yield pair

    def setup_then_let_the_first_launch_through():
        with syncs.allowed("built once"):
            start = setup()
        launch, first = trainer.engine.adapter.launch, [True]

        def launch_once_allowed(step, *batch):
            if first.pop() if first else False:
                with syncs.allowed("the first step decides on the host (G's momentum is created)"):
                    return launch(step, *batch)
            return launch(step, *batch)
        monkeypatch.setattr(trainer.engine.adapter, "launch", launch_once_allowed)
        return start

    monkeypatch.setattr(trainer, "batches", loader)
    monkeypatch.setattr(trainer, "setup", setup_then_let_the_first_launch_through)
    with syncs:
        assert trainer.run() == 0
    return syncs


def test_the_training_loop_is_sync_free_in_one_process(tmp_path, monkeypatch):
    cfg = config.load("toy", _loop_overrides(tmp_path))
    syncs = _record_loop(train.Trainer(cfg, train.distributed.Dist(), torch.device("cpu")), monkeypatch)
    assert not syncs.found, syncs.report()


def _ddp_worker(rank, port, run_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            cfg = config.load("toy", _loop_overrides(run_dir))
            trainer = train.Trainer(cfg, train.distributed.Dist(rank, rank, 2), torch.device("cpu"))
            syncs = _record_loop(trainer, monkeypatch, stop_on_rank_at=(1, 2))
        results[rank] = [str(s) for s in syncs.found]
    finally:
        dist.destroy_process_group()


def test_two_ranks_are_sync_free_and_stop_together_one_step_after_a_request(tmp_path):
    """Rank 1 alone is asked to stop before step 2's launch: its flag rides in step 2's all-reduce, both
    ranks read it with step 2's losses (after launching step 3) and stop after step 3, checkpointed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(port, str(tmp_path), results), nprocs=2)
        found = [results[0], results[1]]
    assert found == [[], []], found
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 4  # steps 0-3 ran: 4 done


# -- the same on CUDA, where torch itself reports every sync -----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["toy", "paper-recipe", "mrnet-adversary", "bf16-channels-last", "preheat"])
def test_on_cuda_torch_sees_no_sync_in_a_launched_iteration(case, batches):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronizing CUDA call: the GPU's own
    verdict on what the recorder above proves on CPU, with every loss backend that runs there. The
    first step of each phase is not watched: it creates G's momentum (step 0) and compiles kernels."""
    cuda = torch.device("cuda")
    for backend in [b for b in ("ext", "triton", "torch") if ops.LOSS.problem(b, "cuda") is None]:
        eng = engine.build(config.load("toy", {**TINY, **CASES[case], "kernels.loss": backend}), cuda)
        pending, seen = None, set()
        for step in range(STEPS):
            pair = [{k: v.to(cuda) for k, v in b.items() if torch.is_tensor(v)}
                    for b in batches[step % len(batches)]]
            phase = eng.adapter.phase(step)
            if phase not in seen:  # a phase's first step compiles (and Triton autotunes: it syncs)
                seen.add(phase)
                result = eng.adapter.launch(step, *pair)
            else:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    result = eng.adapter.launch(step, *pair)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if pending is not None:
                pending.read()
            pending = result
        assert pending.read().stepped, backend
