"""DALI resumes mid-epoch exactly: a pipeline rebuilt from DaliBatches.state() after k batches hands
out the uninterrupted run's batches k+1, k+2, ... (same files, same augmented pixels), on CPU."""

import copy
import io

import pytest
import torch
from helpers import as_argv, assert_same_networks, tiny_overrides, training_lines

from pwda_fast import checkpoint, config, train
from pwda_fast.data import build_datasets, dali, train_batches

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not installed "
                                "(pip install nvidia-dali-cuda130)")
BATCHES = 7  # over 5 files in batches of 2 (the last odd file dropped): epochs of 2 batches


@pytest.fixture(scope="module")
def datasets():
    """Toy source (labelled; random rescale, crop and flip) and target (unlabelled; crop), 5 files each."""
    cfg = config.load("toy", {"data.crop": [32, 48], "data.scale": [0.7, 1.3], "data.loader": "dali"})
    sets = build_datasets(cfg.data, None, lambda msg: None)
    out = {}
    for role in ("source", "target"):
        out[role] = copy.copy(sets[role])
        out[role].pairs = sets[role].pairs[:5]
    assert out["source"].scale == (0.7, 1.3) and out["source"].flip and out["target"].pairs[0][1] is None
    return out


def loader(dataset, state=None, rank=0, world=1):
    return dali.train_loader(dataset, 2, 21, rank, world, 0, 0, CPU, state)


def through_checkpoint(state: dict) -> dict:
    """The state as a resumed run gets it: saved with torch.save, loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({"data": {"loaders": {"source": [state]}}}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["data"]["loaders"]["source"][0]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("index", "image", "label"))


@pytest.mark.parametrize("role", ["source", "target"])
def test_state_after_k_batches_continues_the_uninterrupted_run(datasets, role):
    dataset = datasets[role]
    untouched = loader(dataset)
    plain = [next(untouched) for _ in range(BATCHES)]
    it, full, states = loader(dataset), [], []
    for _ in range(BATCHES):
        states.append(it.state())  # taken while two batches are prefetched, as at a checkpoint
        full.append(next(it))
    assert all(same(a, b) for a, b in zip(plain, full)), "state() changed the batches"
    assert len({tuple(b["index"].tolist()) for b in full}) > 3, "precondition: the batches differ"
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(full, full[1:])), \
        "precondition: each batch keeps its own pixels (no buffer shared between batches)"
    for k in (1, 2, 5):  # mid-epoch, at an epoch boundary, mid-epoch after two epochs
        resumed = loader(dataset, through_checkpoint(states[k]))
        for step in range(k, BATCHES):
            assert same(next(resumed), full[step]), f"resumed after {k} batches: batch {step} differs"


def test_each_rank_continues_its_own_shard(datasets):
    """Under torchrun every rank reads its own shard, so the checkpoint keeps one state per rank."""
    states, first = [], []
    for rank in (0, 1):
        it = loader(datasets["source"], rank=rank, world=2)
        first.append(set(next(it)["index"].tolist()))
        states.append(it.state())
        want = [next(it) for _ in range(3)]
        resumed = loader(datasets["source"], through_checkpoint(states[-1]), rank=rank, world=2)
        assert all(same(next(resumed), w) for w in want), f"rank {rank}"
    assert not first[0] & first[1], "precondition: the ranks read disjoint shards"
    assert states[0]["pipeline"] != states[1]["pipeline"]


def test_without_a_usable_state_dali_draws_a_fresh_permutation_and_says_so(datasets):
    cfg = config.load("toy", {"data.loader": "dali", "data.batch_size": 2}).data
    dataset, messages = datasets["source"], []
    state = loader(dataset).state()
    fewer = copy.copy(dataset)
    fewer.pairs = dataset.pairs[:4]
    fresh = next(train_batches(cfg, fewer, 21, 0, 1, 3, CPU, state, messages.append))
    assert "over 5 files, the dataset now has 4: DALI starts a fresh permutation at step 3" in messages[-1]
    assert same(fresh, next(dali.train_loader(fewer, 2, 21, 0, 1, 3, 0, CPU)))  # seeded by (seed, step)
    next(train_batches(cfg, dataset, 21, 0, 1, 3, CPU, None, messages.append))
    assert "holds no DALI position" in messages[-1]


def test_trainer_resumes_a_dali_run_bit_for_bit(tmp_path):
    common = {"data.loader": "dali", "data.crop": [32, 64], "train.iters": 4, "train.ckpt_every": 100,
              "train.eval_images": 1, "train.threads": 1}
    assert train.main(as_argv(tiny_overrides(tmp_path / "full", **common))) == 0
    assert train.main(as_argv(tiny_overrides(tmp_path / "split", **common, **{"train.stop_at": 2}))) == 0
    stopped = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    positions = stopped["data"]["loaders"]
    assert set(positions) == {"source", "target"} and all(len(p) == 1 for p in positions.values())
    assert train.main(as_argv(tiny_overrides(tmp_path / "split", **common))) == 0
    a = checkpoint.load(checkpoint.latest(tmp_path / "full"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))
    assert a["step"] == b["step"] == 4
    assert_same_networks(a, b)
    assert [r["seg"] for r in training_lines(tmp_path / "full")] == \
        [r["seg"] for r in training_lines(tmp_path / "split")]
