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
from helpers import Payload, as_argv, tiny_overrides

from pwda_fast import checkpoint, config, distributed, engine, train

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

def test_malicious_checkpoint_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "g": Payload(marker)}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(checkpoint.CheckpointError, match="cannot load checkpoint .*ckpt_00000001.pt"):
        checkpoint.load(checkpoint.latest(tmp_path))
    assert train.main(as_argv(tiny_overrides(tmp_path))) == train.EXIT_CONFIG
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_resume_with_another_world_size_needs_explicit_permission(tmp_path):
    def built(**extra):
        cfg = config.load("toy", tiny_overrides(tmp_path, **extra))
        return cfg, engine.build(cfg, torch.device("cpu"), backend="torch")

    cfg, eng = built()
    state = checkpoint.training_state(eng, 6, cfg, world_size=1, skipped=0)
    assert state["data"] == {"samples_per_rank": 12} and state["world_size"] == 1
    state["world_size"] = 2
    checkpoint.save(tmp_path, 6, state)
    with pytest.raises(config.ConfigError, match="written by 2 processes, this run has 1.*"
                                                 "allow_world_size_change=true"):
        checkpoint.resume(tmp_path, eng, cfg, distributed.Dist())
    cfg, eng = built(**{"train.allow_world_size_change": True})
    assert checkpoint.resume(tmp_path, eng, cfg, distributed.Dist()) == (6, 0)
