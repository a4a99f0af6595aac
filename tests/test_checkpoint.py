"""Checkpoint files: atomic and durable writes, a mid-write kill, keep_last, the `latest` pointer.

The writer's contract (pwda_fast/checkpoint.py): data -> fsync -> rename -> fsync(dir), then the same
for `latest`; nothing is ever opened in place; keep_last counts exactly.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Payload, disk_full_on_save

from pwda_fast import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
        events.append(("rename", Path(src).name.rsplit(".", 1)[0] + "->" + Path(dst).name))  # no pid
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.save(tmp_path, 5, {"step": 5})
    tmp_ckpt, tmp_ptr = f".tmp-ckpt_00000005.pt.{os.getpid()}", f".tmp-latest.{os.getpid()}"
    assert events == [("fsync", tmp_ckpt), ("rename", ".tmp-ckpt_00000005.pt->ckpt_00000005.pt"),
                      ("fsync", tmp_path.name), ("fsync", tmp_ptr), ("rename", ".tmp-latest->latest"),
                      ("fsync", tmp_path.name)]


def test_failed_checkpoint_write_leaves_the_old_files_untouched(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"step": 1})
    checkpoint.save(tmp_path, 2, {"step": 2})  # a same-named file must not be opened in place either
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    disk_full_on_save(monkeypatch)
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


def test_save_creates_nested_run_folders_and_keep_last_zero_keeps_all(tmp_path):
    run_dir = tmp_path / "a" / "b"
    for step in (1, 2, 3):
        checkpoint.save(run_dir, step, {"step": step}, keep_last=0)
    assert sorted(p.name for p in run_dir.glob("ckpt_*.pt")) == [f"ckpt_{s:08d}.pt" for s in (1, 2, 3)]


def test_latest_without_a_usable_pointer_is_the_newest_checkpoint(tmp_path):
    assert checkpoint.latest(tmp_path / "missing") is None
    assert checkpoint.latest(tmp_path) is None
    for step in (3, 12, 7):
        checkpoint.save(tmp_path, step, {"step": step}, keep_last=0)
    (tmp_path / "ckpt_1.pt").write_bytes(b"")  # not a checkpoint name: ignored
    (tmp_path / "latest").unlink()
    assert checkpoint.latest(tmp_path).name == "ckpt_00000012.pt"  # by step, not by write order
    (tmp_path / "latest").write_text("ckpt_00000099.pt")  # names a file that is gone
    assert checkpoint.latest(tmp_path).name == "ckpt_00000012.pt"
    (tmp_path / "latest").write_text("ckpt_00000003.pt")
    assert checkpoint.latest(tmp_path).name == "ckpt_00000003.pt"  # the pointer wins when it is valid


def test_load_refuses_code_and_names_the_file_and_the_cause(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "g": Payload(marker)}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"cannot load checkpoint .*ckpt_00000001.pt: UnpicklingError: "):
        checkpoint.load(tmp_path / "ckpt_00000001.pt")
    assert not marker.exists()
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt_00000002.pt: \w+Error: "):
        checkpoint.load(tmp_path / "ckpt_00000002.pt")
