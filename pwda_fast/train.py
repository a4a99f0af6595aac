"""Entry point: config -> distributed -> build -> loop -> close.

    python -m pwda_fast.train                                   # toy domains, CPU or GPU
    torchrun --nproc_per_node=8 -m pwda_fast.train --config gta5_to_cityscapes \
        --data.source_root=/data/gta5 --data.target_root=/data/cityscapes

Rerunning the same command with the same train.run_dir resumes from its latest checkpoint.
Exit codes: 0 done (or stopped cleanly by SIGTERM / train.stop_at), 2 bad config, data or checkpoint,
3 too many consecutive non-finite steps.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pwda_fast import checkpoint, config, distributed, evaluate, ops
from pwda_fast.adapt import Adapter, Nets
from pwda_fast.data import build_datasets, train_batches
from pwda_fast.logger import MetricsLogger
from pwda_fast.models import build_networks

EXIT_CONFIG, EXIT_NONFINITE = 2, 3


class NonFiniteError(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise config.ConfigError("train.device=cuda but no CUDA device is visible; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_optimizers(cfg, g: nn.Module, d: nn.Module, d_aux: nn.Module, device: torch.device):
    """SGD for G (heads at head_lr_mult), Adam for D and D_aux; fused on CUDA, foreach on CPU."""
    o = cfg.optim
    groups = g.param_groups(o.lr, o.head_lr_mult)
    if o.impl == "apex":
        try:
            import apex.optimizers as apex_opt
        except ImportError as e:
            raise config.ConfigError("optim.impl=apex needs NVIDIA apex built from source with its "
                                     f"CUDA extensions (import apex.optimizers failed: {e}); "
                                     "use optim.impl=auto") from None
        return (apex_opt.FusedSGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay),
                apex_opt.FusedAdam(d.parameters(), lr=o.lr_d, betas=tuple(o.betas)),
                apex_opt.FusedAdam(d_aux.parameters(), lr=o.lr_d, betas=tuple(o.betas)))
    if o.impl == "torch":
        fast = {}  # torch's own default per device
    else:
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return (torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **fast),
            torch.optim.Adam(d.parameters(), lr=o.lr_d, betas=tuple(o.betas), **fast),
            torch.optim.Adam(d_aux.parameters(), lr=o.lr_d, betas=tuple(o.betas), **fast))


def _fault_injection_hook(run_dir: Path, step: int, rank: int) -> None:
    """Test-only fault injection: PWDA_FAST_TEST_CRASH_AT_STEP=k kills rank 1 (rank 0 alone) with
    os._exit(1) before step k, once per run_dir (a marker file remembers), as a dying GPU would."""
    at = os.environ.get("PWDA_FAST_TEST_CRASH_AT_STEP")
    if at is None or step != int(at) or rank != min(1, int(os.environ.get("WORLD_SIZE", 1)) - 1):
        return
    marker = run_dir / f".test-crashed-at-{step}"
    if not marker.exists():
        marker.touch()
        os._exit(1)


class Trainer:
    def __init__(self, cfg: config.Config, info: distributed.Dist, device: torch.device):
        self.cfg, self.dist, self.device = cfg, info, device
        self.run_dir = Path(cfg.train.run_dir)
        self.stop_requested = False
        self.logger: MetricsLogger | None = None

    def log(self, msg: str) -> None:
        if self.dist.main:
            tqdm.write(msg)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def state(self, step: int, optimizers) -> dict:
        return {
            "step": step,
            "g": self.g.state_dict(), "d": self.d.state_dict(), "d_aux": self.d_aux.state_dict(),
            "opt_g": optimizers[0].state_dict(), "opt_d": optimizers[1].state_dict(),
            "opt_d_aux": optimizers[2].state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "config": self.cfg.to_dict(), "backend": self.backend, "world_size": self.dist.world,
            "data": {"samples_per_rank": step * self.cfg.data.batch_size},
            "skipped": self.skipped,
        }

    def save(self, step: int, optimizers) -> None:
        if self.dist.main:
            checkpoint.save(self.run_dir, step, self.state(step, optimizers), self.cfg.train.keep_last)
        distributed.barrier(self.dist)

    def resume(self, optimizers) -> int:
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load(path)
        if state["world_size"] != self.dist.world and not self.cfg.train.allow_world_size_change:
            raise config.ConfigError(
                f"{path} was written by {state['world_size']} processes, this run has {self.dist.world}; "
                "the data order would change. Relaunch with the same number of processes, or pass "
                "--train.allow_world_size_change=true to continue anyway")
        self.g.load_state_dict(state["g"])
        self.d.load_state_dict(state["d"])
        self.d_aux.load_state_dict(state["d_aux"])
        for opt, key in zip(optimizers, ("opt_g", "opt_d", "opt_d_aux")):
            opt.load_state_dict(state[key])
        if self.dist.main:
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and state["rng_cuda"]:
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        else:  # the checkpoint holds rank 0's streams; the others stay distinct, and reproducible
            torch.manual_seed((self.cfg.train.seed + self.dist.rank) * 1_000_003 + state["step"])
        self.skipped = state.get("skipped", 0)
        self.log(f"resumed from {path} at step {state['step']}")
        return state["step"]

    def evaluate(self, step: int) -> dict | None:
        result = None
        if self.dist.main:
            val = self.datasets["val"]
            if self.cfg.train.eval_images:
                val = torch.utils.data.Subset(val, range(min(self.cfg.train.eval_images, len(val))))
            result = evaluate.evaluate_model(self.g, val, self.device, self.cfg.train.amp)
            self.logger.write({"step": step, "eval": True, "miou": result["miou"]})
            self.logger.figures(step, self.g, self.d_aux, self.datasets["val"], self.cfg)
        distributed.barrier(self.dist)
        return result

    def run(self) -> int:
        cfg, info = self.cfg, self.dist
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if info.main:
            checkpoint.clean_stale(self.run_dir)
            (self.run_dir / "config.json").write_text(cfg.to_json())
        torch.manual_seed(cfg.train.seed + info.rank)
        self.backend = ops.resolve_backend(cfg.kernels.backend, self.device)
        self.log(f"device {self.device}, {info.world} process(es), weighted-loss backend "
                 f"{self.backend!r} ({cfg.kernels.backend!r} requested), amp {cfg.train.amp}, "
                 f"channels_last {cfg.train.channels_last}")

        self.g, self.d, self.d_aux = build_networks(cfg.model)
        fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        for net in (self.g, self.d, self.d_aux):
            net.to(self.device, memory_format=fmt).train()
        optimizers = build_optimizers(cfg, self.g, self.d, self.d_aux, self.device)
        self.skipped = 0
        start = self.resume(optimizers)
        self.logger = MetricsLogger(self.run_dir, info.main, cfg.log.tensorboard, cfg.log.images,
                                    purge_step=start)
        try:  # layout, validation and decoding problems: messages that name the files, no traceback
            self.datasets = build_datasets(cfg.data, cfg.train.run_dir, self.log)
        except (ValueError, OSError) as e:
            raise config.ConfigError(f"data: {e}") from e
        self.log(f"data: {len(self.datasets['source'])} source, {len(self.datasets['target'])} target, "
                 f"{len(self.datasets['val'])} target-val images")

        nets = Nets(self.g, self.d, self.d_aux)
        if info.enabled:
            if cfg.model.bn == "train" and self.device.type == "cuda":
                nets.g = nn.SyncBatchNorm.convert_sync_batchnorm(nets.g)
            elif cfg.model.bn == "train":  # torch's SyncBatchNorm raises on CPU tensors
                self.log("model.bn=train on CPU: BatchNorm statistics are per process (no SyncBatchNorm)")
            ids = [self.device.index] if self.device.type == "cuda" else None
            nets = Nets(*(nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in
                          (nets.g, nets.d, nets.d_aux)))
        if cfg.train.compile:
            nets = Nets(torch.compile(nets.g), nets.d, nets.d_aux)
        adapter = Adapter(cfg, nets, *optimizers, self.backend, self.device, info)

        src = train_batches(cfg.data, self.datasets["source"], cfg.train.seed, info.rank, info.world,
                            start, self.device)
        tgt = (train_batches(cfg.data, self.datasets["target"], cfg.train.seed + 1, info.rank, info.world,
                             start, self.device) if cfg.adapt.mode == "adapt" else None)

        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.train.iters, initial=start, disable=not info.main, dynamic_ncols=True,
                   desc=f"{cfg.adapt.mode}", smoothing=0.1)
        step, consecutive, t0 = start, 0, time.perf_counter()
        try:
            while step < cfg.train.iters:
                _fault_injection_hook(self.run_dir, step, info.rank)
                losses, stepped = adapter.step(step, next(src), next(tgt) if tgt is not None else None)
                step += 1
                if stepped:
                    consecutive = 0
                else:
                    consecutive += 1
                    self.skipped += 1
                    bad = ", ".join(f"{k}={v:.3g}" for k, v in losses.items())
                    self.log(f"step {step}: non-finite loss or gradient ({bad}); skipped all three "
                             f"optimizer steps ({consecutive} in a row, {self.skipped} in all)")
                    if consecutive >= cfg.train.max_skips:
                        raise NonFiniteError(f"{consecutive} consecutive non-finite steps (last: {bad}); "
                                             "lower optim.lr, check the data, or try train.amp=none")
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
                if step % cfg.train.log_every == 0 or step == cfg.train.iters:
                    rate = (step - start) / (time.perf_counter() - t0)
                    self.logger.write({"step": step, "lr": adapter.opt_g.param_groups[0]["lr"],
                                        **losses, "skipped": self.skipped, "it_s": round(rate, 3)})
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.iters:
                    result = self.evaluate(step)
                    if result:
                        self.log(f"step {step}: target mIoU {result['miou']:.2f}")
                # Every rank stops after the same step, whichever of them got the signal.
                self.stop_requested = distributed.any_true(self.stop_requested, self.device, info)
                preempted = self.stop_requested or step == cfg.train.stop_at
                if step % cfg.train.ckpt_every == 0 or step == cfg.train.iters or preempted:
                    self.save(step, optimizers)
                if preempted:
                    why = "SIGTERM" if self.stop_requested else f"train.stop_at={step}"
                    self.log(f"stopped at step {step} ({why}); checkpoint written, rerun to resume")
                    return 0
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)

        result = self.evaluate(step)
        if info.main:
            (self.run_dir / "final.json").write_text(json.dumps(result, indent=2))
            self.log(evaluate.format_result(result, f"target val after {step} iterations "
                                                    f"({cfg.adapt.mode}, weighting {cfg.adapt.weighting})"))
        return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.load(*config.parse_args(sys.argv[1:] if argv is None else argv))
        device = pick_device(cfg.train.device)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    info = distributed.setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    trainer = Trainer(cfg, info, device)
    try:
        return trainer.run()
    except (config.ConfigError, FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        if trainer.logger is not None:
            trainer.logger.close()
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
