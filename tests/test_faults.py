"""Faults the engine must survive: kill -9 mid-checkpoint, SIGTERM, a dying rank, hostile files.

Launcher tests run the real `python -m pwda_fast.train` and `torchrun ... -m pwda_fast.train` as
subprocesses on CPU (gloo), one intra-op thread per process on the 2-core CI machines.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import as_argv, tiny_overrides

from pwda_fast import checkpoint, config, distributed, train
from pwda_fast.models import build_networks

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _argv(run_dir, **extra) -> list[str]:
    """A toy run of 1-image batches that evaluates on 2 val images only."""
    return as_argv(tiny_overrides(run_dir, **{"data.batch_size": 1, "train.eval_images": 2,
                                              "train.ckpt_every": 100, **extra}))


def _python(run_dir, **extra) -> list[str]:
    return [sys.executable, "-m", "pwda_fast.train", *_argv(run_dir, **extra)]


def _torchrun(run_dir, *launcher, **extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *launcher, "-m", "pwda_fast.train", *_argv(run_dir, **extra)]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln and "seg" in ln]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(_steps(run_dir)) >= step:
            return
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before step {step}"
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def _run(cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=240)


# -- kill -9 during checkpoint writes ---------------------------------------------------------------

_WRITER = """
import sys, torch
from pwda_fast import checkpoint
run_dir = sys.argv[1]
last = checkpoint.latest(run_dir)
step = checkpoint.load(last)["step"] if last else 0
print("ready", flush=True)
while True:  # 8 MB checkpoints back to back: a random kill lands inside a write most of the time
    step += 1
    checkpoint.save(run_dir, step, {"step": step, "w": torch.full((2_000_000,), float(step))}, keep_last=2)
"""


def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    rng, previous, stale = random.Random(6), 0, 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        path = checkpoint.latest(tmp_path)
        if path is None:  # killed before its first checkpoint was complete
            assert previous == 0
            continue
        state = checkpoint.load(path)
        assert state["step"] >= previous
        assert torch.equal(state["w"], torch.full((2_000_000,), float(state["step"])))
        previous = state["step"]
        stale += len(checkpoint.clean_stale(tmp_path))
        assert not list(tmp_path.glob(".tmp-*"))
    assert previous > 0
    print(f"{previous} checkpoints written, {stale} interrupted writes cleaned")


_DYING_WRITER = """
import os, signal, sys, torch
from pwda_fast import checkpoint
run_dir = sys.argv[1]
checkpoint.save(run_dir, 1, {"step": 1, "w": torch.ones(1000)})
real_save = torch.save

def dies_half_way(obj, f):  # half a checkpoint reaches the disk, then the process is killed
    f.write(b"\\x80" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dies_half_way
checkpoint.save(run_dir, 2, {"step": 2, "w": torch.ones(1000)})
"""


def test_kill_9_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """Deterministic: the kill lands inside the second write (a temp file is left to prove it)."""
    proc = subprocess.run([sys.executable, "-c", _DYING_WRITER, str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = list(tmp_path.glob(".tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 4096  # the kill landed mid-write
    assert not (tmp_path / "ckpt_00000002.pt").exists()
    assert checkpoint.latest(tmp_path).name == "ckpt_00000001.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 1
    assert checkpoint.clean_stale(tmp_path) == leftovers and not list(tmp_path.glob(".tmp-*"))


def test_checkpoint_write_order_is_data_fsync_rename_dirsync_then_pointer(tmp_path, monkeypatch):
    """A checkpoint is durable before anything names it: fsync(file) -> rename -> fsync(dir), and
    only then the same for `latest`."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", Path(target).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(src).name.split(".")[0] + "->" + Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.save(tmp_path, 5, {"step": 5})
    tmp_ckpt, tmp_ptr = f".tmp-ckpt_00000005.pt.{os.getpid()}", f".tmp-latest.{os.getpid()}"
    assert events == [("fsync", tmp_ckpt), ("rename", ".tmp-ckpt_00000005->ckpt_00000005.pt"),
                      ("fsync", tmp_path.name), ("fsync", tmp_ptr), ("rename", ".tmp-latest->latest"),
                      ("fsync", tmp_path.name)]


def test_failed_checkpoint_write_leaves_the_old_files_untouched(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"step": 1})
    checkpoint.save(tmp_path, 2, {"step": 2})  # a same-named file must not be opened in place either
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fails(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", fails)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, {"step": 2, "new": True})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")}
    assert after == before
    assert checkpoint.load(checkpoint.latest(tmp_path)) == {"step": 2}


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_keeps_exactly_that_many(tmp_path, keep):
    for step in range(1, 7):
        checkpoint.save(tmp_path, step, {"step": step}, keep_last=keep)
    names = sorted(p.name for p in tmp_path.glob("ckpt_*.pt"))
    assert names == [f"ckpt_{s:08d}.pt" for s in range(7 - keep, 7)]
    assert checkpoint.latest(tmp_path).name == "ckpt_00000006.pt"


# -- SIGTERM --------------------------------------------------------------------------------------

# Long enough that the signal, sent after step 2, lands before the end even on an idle machine where
# a toy step takes a few tens of milliseconds (with 20 steps, torchrun's forwarding sometimes lost).
SIGTERM_ITERS = 100

def test_sigterm_finishes_the_step_checkpoints_and_the_rerun_continues(tmp_path):
    cmd = _python(tmp_path, **{"train.iters": SIGTERM_ITERS})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for_step(proc, tmp_path, 2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert time.monotonic() - sent < 30
    stopped = checkpoint.load(checkpoint.latest(tmp_path))["step"]
    assert 2 <= stopped < SIGTERM_ITERS and f"stopped at step {stopped} (SIGTERM)" in out
    assert _steps(tmp_path) == list(range(1, stopped + 1))

    done = _run(cmd)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"at step {stopped}" in done.stdout + done.stderr  # "resumed from ... at step k"
    assert _steps(tmp_path) == list(range(1, SIGTERM_ITERS + 1))
    assert (tmp_path / "final.json").is_file()


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_cleanly_and_the_rerun_finishes(tmp_path):
    cmd = _torchrun(tmp_path, **{"train.iters": SIGTERM_ITERS})
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    _wait_for_step(proc, tmp_path, 2, timeout=120)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    out = proc.communicate(timeout=90)[0]
    assert time.monotonic() - sent < 30, out
    stopped = checkpoint.load(checkpoint.latest(tmp_path))["step"]
    assert 2 <= stopped < SIGTERM_ITERS, out
    assert out.count(f"stopped at step {stopped} (SIGTERM)") == 1, out  # rank 0 alone logs
    assert "Traceback" not in out.partition("stopped at step")[0], out

    done = _run(_torchrun(tmp_path, **{"train.iters": SIGTERM_ITERS}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _steps(tmp_path) == list(range(1, SIGTERM_ITERS + 1))  # one line per step: rank 0 alone writes
    assert checkpoint.load(checkpoint.latest(tmp_path))["world_size"] == 2


# -- a rank that dies -------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_worker_is_relaunched_by_torchrun_and_the_run_resumes(tmp_path):
    done = _run(_torchrun(tmp_path, "--max-restarts=1", **{"train.iters": 5, "train.ckpt_every": 2}),
                PWDA_FAST_TEST_CRASH_AT_STEP="3")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert (tmp_path / ".test-crashed-at-3").exists()  # the fault did happen, once
    assert "resumed from" in out and "ckpt_00000002.pt at step 2" in out, out
    assert _steps(tmp_path) == [1, 2, 3, 4, 5]  # step 3's first attempt trimmed from the log
    assert json.loads((tmp_path / "final.json").read_text())["miou"] >= 0


# -- hostile or mismatched files --------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def test_malicious_checkpoint_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "g": _Payload(marker)}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(checkpoint.CheckpointError, match="cannot load checkpoint .*ckpt_00000001.pt"):
        checkpoint.load(checkpoint.latest(tmp_path))
    assert train.main(as_argv(tiny_overrides(tmp_path))) == train.EXIT_CONFIG
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../other/ckpt_00000001.pt", "/tmp/ckpt_00000001.pt", "ckpt_1.pt"])
def test_latest_pointer_cannot_leave_the_run_folder(tmp_path, name):
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir, 1, {"step": 1})
    (tmp_path / "other").mkdir()
    checkpoint.save(tmp_path / "other", 1, {"step": 1})
    (run_dir / "latest").write_text(name)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint of this folder"):
        checkpoint.latest(run_dir)


def test_latest_checkpoint_cannot_be_a_link_out_of_the_run_folder(tmp_path):
    checkpoint.save(tmp_path / "other", 7, {"step": 7})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt_00000007.pt").symlink_to(tmp_path / "other" / "ckpt_00000007.pt")
    (run_dir / "latest").write_text("ckpt_00000007.pt")
    with pytest.raises(checkpoint.CheckpointError, match="outside"):
        checkpoint.latest(run_dir)


def test_resume_with_another_world_size_needs_explicit_permission(tmp_path):
    def trainer(**extra):
        cfg = config.load("toy", tiny_overrides(tmp_path, **extra))
        t = train.Trainer(cfg, distributed.Dist(), torch.device("cpu"))
        t.g, t.d, t.d_aux = build_networks(cfg.model)
        t.backend, t.skipped = "torch", 0
        return t, train.build_optimizers(cfg, t.g, t.d, t.d_aux, torch.device("cpu"))

    t, opts = trainer()
    state = t.state(6, opts)
    assert state["data"] == {"samples_per_rank": 12} and state["world_size"] == 1
    state["world_size"] = 2
    checkpoint.save(tmp_path, 6, state)
    with pytest.raises(config.ConfigError, match="written by 2 processes, this run has 1.*"
                                                 "allow_world_size_change=true"):
        t.resume(opts)
    t, opts = trainer(**{"train.allow_world_size_change": True})
    assert t.resume(opts) == 6
