"""Checkpoints that survive crashes: temp file + fsync + atomic rename, a "latest" pointer, keep-last-K.

Files in run_dir (named in run_folder.py): ckpt_<step:08d>.pt, latest (a text file naming one of them),
best.pt and best.json (the networks of the evaluation with the highest target mIoU so far, and its
scores), and .tmp-* leftovers of an interrupted write, cleaned at start. keep_last counts ckpt_* files
only. Everything loads with weights_only=True: a pickle that would run code is refused before any of it
runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from pwda_fast import adversaries, config, metrics, tensorfile
from pwda_fast.models import Nets, build_networks
from pwda_fast.run_folder import RunFolder


class CheckpointError(RuntimeError):
    """A checkpoint or "latest" pointer that must not or cannot be loaded; the message says which."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(file)` into a temp file, fsync, and rename it into place."""
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove temp files left by a write that was killed; returns what was removed."""
    stale = list(Path(run_dir).glob(".tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save(run_dir: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write ckpt_<step>.pt atomically, point `latest` at it, then drop all but the newest keep_last."""
    folder = RunFolder(run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    path = folder.checkpoint(step)
    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(folder.latest, lambda f: f.write(path.name.encode()))
    ckpts = folder.checkpoints()
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or the newest ckpt_*.pt; never a path outside run_dir."""
    folder = RunFolder(run_dir)
    run_dir, pointer = folder.path, folder.latest
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not folder.is_checkpoint(name):  # a bare file name only: no "../", no absolute path
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this folder "
                                  "(expected ckpt_<8 digits>.pt); fix or delete the file")
        target = run_dir / name
        if target.is_symlink() and target.resolve().parent != run_dir.resolve():
            raise CheckpointError(f"{target} is a link to {target.resolve()}, outside {run_dir}; "
                                  "checkpoints must be files of the run folder itself")
        if target.is_file():
            return target
    ckpts = folder.checkpoints()
    return ckpts[-1] if ckpts else None


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); a malicious or corrupt file raises CheckpointError."""
    return tensorfile.load(path, what=f"cannot load checkpoint {path}", kind="PyTorch checkpoint",
                           error=CheckpointError, map_location=map_location)


def networks_state(engine, step: int, cfg) -> dict:
    """What evaluation, export and a warm start need: G, D and D_aux weights and the config."""
    return {"step": step, **engine.nets.state_dict(), "config": cfg.to_dict(), "backend": engine.backend,
            "build": engine.build()}


def training_state(engine, step: int, cfg, world_size: int, skipped: int,
                   loaders: dict | None = None) -> dict:
    """Everything a resumed run needs to continue bit for bit (the config travels with it).

    loaders: {role: [position of rank 0, 1, ...]} of input pipelines that report one (DALI's
    DaliBatches.state()); the torch loader needs none, its position follows from the step.
    """
    return {
        **networks_state(engine, step, cfg),
        **engine.optimizers.state_dict(),
        "adapter": engine.adapter.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "world_size": world_size,
        "data": {"samples_per_rank": step * cfg.data.batch_size, **({"loaders": loaders} if loaders else {})},
        "skipped": skipped,
    }


def best_score(run_dir: str | Path) -> dict | None:
    """run_dir's best.json ({"step", "miou"[, "miou16", "miou13"], "checkpoint"}); None when there is
    none. One that cannot be read raises CheckpointError (a run must not replace a best it cannot rank)."""
    path = RunFolder(run_dir).best_record
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except ValueError as e:
        best = f"not JSON ({e})"
    if not (isinstance(best, dict) and isinstance(best.get("step"), int)
            and isinstance(best.get("miou"), int | float)):
        raise CheckpointError(f"{path} is {best!r:.200}, not the best evaluation's "
                              f"{{\"step\", \"miou\", ...}}; delete it and {RunFolder.BEST} to rank "
                              "this run's evaluations afresh")
    return best


def save_best(run_dir: str | Path, step: int, result: dict, state: dict) -> bool:
    """Keep best.pt (`state`, e.g. networks_state) and best.json when result["miou"] beats the mIoU
    in best.json (strictly; none yet: any) -> True when written. best.pt is written before best.json,
    each atomically, so best.json never names weights that are not on disk."""
    folder = RunFolder(run_dir)
    best = best_score(folder.path)
    if best is not None and result["miou"] <= best["miou"]:
        return False
    scores = {k: result[k] for k in metrics.SCORES if k in result}
    atomic_write(folder.best, lambda f: torch.save({**state, "best": scores}, f))
    record = {"step": step, **scores, "checkpoint": RunFolder.BEST}
    atomic_write(folder.best_record, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
    return True


def _newest_loadable(run_dir: Path, main: bool, log) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, `latest` first. Unloadable newer ones are kept, renamed
    <name>.corrupt (rank 0), with a warning; when none loads, CheckpointError lists why each failed."""
    first = latest(run_dir)
    if first is None:
        return None
    older = sorted((p for p in RunFolder(run_dir).checkpoints() if p != first), reverse=True)
    failed = []
    for path in [first, *older]:
        try:
            state = load(path)
        except (CheckpointError, OSError) as e:
            failed.append((path, e))
            continue
        for bad, why in failed:
            log(f"warning: {why}; resuming from the older {path.name}, keeping the bad file as "
                f"{bad.name}.corrupt")
            if main:
                bad.rename(bad.with_name(bad.name + ".corrupt"))
        return path, state
    raise CheckpointError(f"no checkpoint in {run_dir} loads: {'; '.join(str(e) for _, e in failed)}. "
                          "Move the folder away to start afresh, or restore a good checkpoint into it")


def resume(run_dir: str | Path, engine, cfg, dist, log=print, loaders: dict | None = None) -> tuple[int, int]:
    """Load the newest loadable checkpoint of run_dir into `engine` -> (step, skipped); (0, 0) when
    there is none. `loaders`, when given, receives the checkpoint's input-pipeline positions
    ({role: [position per rank]}, see training_state).

    Refused (ConfigError) when it was written by another number of processes (unless
    train.allow_world_size_change) or with a config that differs in a key of the method (unless
    train.resume = "force"); differences in config.SAME_METHOD keys and in the build (Engine.build:
    backends, extension, threads, CPU kernels) are logged. Rank 0 takes the saved random streams; the
    other ranks reseed from (seed, rank, step), distinct and reproducible.
    """
    found = _newest_loadable(Path(run_dir), dist.main, log)
    if found is None:
        return 0, 0
    path, state = found
    if state["world_size"] != dist.world and not cfg.train.allow_world_size_change:
        raise config.ConfigError(
            f"{path} was written by {state['world_size']} processes, this run has {dist.world}; "
            "the data order would change. Relaunch with the same number of processes, or pass "
            "--train.allow_world_size_change=true to continue anyway")
    _check_same_run(path, state, cfg, log)
    _log_other_build(state, engine.build(), log)
    try:
        engine.nets.load_state_dict(state)
    except KeyError as e:
        raise CheckpointError(f"{path} has no {e.args[0]} weights; use another train.run_dir") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit this run's {e}; use another train.run_dir") from None
    engine.optimizers.load_state_dict(state)
    engine.adapter.load_state_dict(state.get("adapter", {}))
    if loaders is not None:
        loaders.update(state.get("data", {}).get("loaders", {}))
    if dist.main:
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
    else:
        torch.manual_seed((cfg.train.seed + dist.rank) * 1_000_003 + state["step"])
    log(f"resumed from {path} at step {state['step']}")
    return state["step"], state.get("skipped", 0)


def _listing(diff: dict) -> str:
    """{key: (old, new)} -> "key: old -> new, ..."."""
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())


def _log_other_build(state: dict, build: dict, log) -> None:
    """Logs how the checkpoint's build (Engine.build) differs from this run's `build`, if it does.
    Only what both record is compared: checkpoints written before builds were stored have none, and a
    key Engine.build gained later (for example torch's CUDA version) says nothing of what ran before."""
    saved = state.get("build") or {}
    diff = {k: (saved[k], v) for k, v in build.items() if k in saved and saved[k] != v}
    if diff:
        log("resuming with another build: " + _listing(diff)
            + " (the same method; the result's last bits differ from an uninterrupted run's)")


def _check_same_run(path: Path, state: dict, cfg, log) -> None:
    try:
        saved = config.from_dict(state["config"])
    except (config.ConfigError, KeyError) as e:
        raise CheckpointError(f"{path} holds a config this version cannot read ({e}); "
                              "use another train.run_dir") from None
    diff = config.differences(saved, cfg)
    changed = {k: v for k, v in diff.items() if k not in config.SAME_METHOD}
    neutral = {k: v for k, v in diff.items() if k in config.SAME_METHOD}
    if neutral:
        log(f"resuming with changed settings that keep the method: {_listing(neutral)}")
    if not changed:
        return
    if cfg.train.resume != "force":
        raise config.ConfigError(
            f"{path.parent} holds a run trained with a different config ({_listing(changed)}). "
            "To start a new run pass another --train.run_dir; to continue this one with the new values "
            "pass --train.resume=force")
    log(f"warning: train.resume=force: continuing {path} with changed settings: {_listing(changed)}")


def load_networks(path: str | Path, device: torch.device):
    """A training checkpoint or best.pt -> (Nets in eval mode on `device`, the config it was trained with).

    G must be in the file; D and D_aux are loaded when present (a generator-only file evaluates).
    """
    return networks_from_state(load(path), device)


def networks_from_state(state: dict, device: torch.device):
    """A loaded checkpoint -> (Nets in eval mode on `device`, its config); ConfigError for a config this
    version cannot read, KeyError without G, RuntimeError (naming the network) for weights that do not fit."""
    cfg = config.from_dict(state["config"])
    # The checkpoint holds every weight; the init file need not exist here (a copy, not a write-back).
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_weights=""))
    discriminators = adversaries.get(cfg.adapt.adversary).discriminators
    nets = Nets(*build_networks(cfg.model, discriminators=discriminators))
    nets.load_state_dict(state, required=("g",))
    for net in nets:
        net.to(device).eval()
    return nets, cfg
