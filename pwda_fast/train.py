"""Entry point: config -> distributed -> build -> loop -> close.

    pwda-train                                                  # toy domains, CPU or GPU
    torchrun --nproc_per_node=8 -m pwda_fast.train --config gta5_to_cityscapes \
        --data.source_root=/data/gta5 --data.target_root=/data/cityscapes

Rerunning the same command with the same train.run_dir resumes from its latest checkpoint.
Exit codes: 0 done (or stopped cleanly by SIGTERM / train.stop_at), 2 bad config, data or checkpoint,
3 too many consecutive non-finite steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pwda_fast import (
    checkpoint,
    config,
    distributed,
    engine,
    inference,
    metrics,
    pictures,
    weight_stats,
)
from pwda_fast.data import build_datasets, class_groups, train_batches
from pwda_fast.data.loader import DataError, data_error_message
from pwda_fast.guard import StepResult
from pwda_fast.logger import LoggerError, MetricsLogger
from pwda_fast.run_folder import RunFolder
from pwda_fast.skips import NonFiniteError, SkipCounter

EXIT_CONFIG, EXIT_NONFINITE = 2, 3


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
    """One run: `setup` builds (or resumes) everything, `run` loops, evaluates and checkpoints."""

    def __init__(self, run: config.Config | engine.Final, info: distributed.Dist, device: torch.device,
                 workers: int | None = None):
        """run: the final config (engine.finalize; a Config is finalized here); workers: the loader
        workers this process runs (main's CPU budget; data.workers when not given)."""
        self.final = run if isinstance(run, engine.Final) else engine.finalize(run)
        self.cfg, self.dist, self.device = self.final.cfg, info, device
        self.workers = self.cfg.data.workers if workers is None else workers
        self.run_dir = Path(self.cfg.train.run_dir)
        self.stop_requested = False  # SIGTERM reached this process
        self.stop_agreed = False  # under DDP: a step's reduction said some rank was asked to stop
        self.skips: SkipCounter | None = None
        self.pending: tuple[int, StepResult] | None = None  # the last step launched, its numbers not yet read
        self.bar: tqdm | None = None
        self.clock = (0, 0.0)  # (first step, its time): the logged it/s
        self.engine: engine.Engine | None = None
        self.datasets: dict | None = None
        self.logger: MetricsLogger | None = None
        self.loaders: dict = {}  # role -> the batch iterator of that domain
        self.saved_positions: dict = {}  # role -> [loader position per rank], from the checkpoint

    def log(self, msg: str) -> None:
        if self.dist.main:
            tqdm.write(msg)

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self) -> int:
        """Networks and optimizers (resumed when run_dir has a checkpoint that fits this config),
        datasets, then the run folder and logger -> the step to start from. Nothing in run_dir is
        written before the config, checkpoint and data checks have passed."""
        cfg, info = self.cfg, self.dist
        self.engine = engine.build(self.final, self.device, info, log=self.log)
        self.final = engine.Final(cfg, None)  # the weights are in the generator now: drop the file's copy
        if cfg.train.amp == "bf16" and self.device.type == "cpu" and not distributed.cpu_has_bf16():
            self.log("warning: train.amp=bf16 on a CPU without native bf16 (no AVX-512 BF16 / AMX) is "
                     "emulated: the toy step measured 7.7x slower than fp32; use train.amp=none here")
        if cfg.train.amp == "fp16" and self.device.type == "cpu":
            self.log("warning: train.amp=fp16 is for GPUs without bf16; CPU convolutions in fp16 take "
                     "torch's slow path (the toy step measured 13x slower than fp32); use "
                     "train.amp=none here")
        kernels = ", ".join(f"{key} {name!r} ({getattr(cfg.kernels, key)!r} requested)"
                            for key, name in self.engine.kernels.names().items())
        self.log(f"device {self.device}, {info.world} process(es), kernels: {kernels}, amp {cfg.train.amp}, "
                 f"channels_last {cfg.train.channels_last}, {torch.get_num_threads()} thread(s), "
                 f"{self.workers} loader worker(s)")
        start, skipped = checkpoint.resume(self.run_dir, self.engine, cfg, info, self.log,
                                           loaders=self.saved_positions)
        self.skips = SkipCounter(cfg, self.log, skipped)
        best = checkpoint.best_score(self.run_dir)  # read now: an unreadable best.json stops the run here
        if best is not None:
            self.log(f"best so far: target mIoU {best['miou']:.2f} at step {best['step']} "
                     f"({RunFolder.BEST})")
        try:  # layout, validation and decoding problems: messages that name the files, no traceback
            self.datasets = build_datasets(cfg.data, cfg.train.run_dir, self.log, self.device)
        except (ValueError, OSError) as e:
            raise config.ConfigError(f"data: {e}") from e
        self.log(f"data: {len(self.datasets['source'])} source, {len(self.datasets['target'])} target, "
                 f"{len(self.datasets['val'])} target-val images")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if info.main:
            checkpoint.clean_stale(self.run_dir)
            RunFolder(self.run_dir).write_config(cfg)
        self.logger = MetricsLogger(self.run_dir, info.main, cfg.log.tensorboard, purge_step=start)
        return start

    def batches(self, start: int):
        """Endless (source, target-or-None) batch pairs, positioned at `start`."""
        cfg, info = self.cfg, self.dist
        seeds = {"source": cfg.train.seed, "target": cfg.train.seed + 1}
        for role in ("source", "target") if cfg.adapt.mode == "adapt" else ("source",):
            saved = self.saved_positions.get(role)  # positions of another number of ranks do not fit
            position = saved[info.rank] if saved and len(saved) == info.world else None
            data_cfg = dataclasses.replace(cfg.data, workers=self.workers)  # a copy: the config stays final
            self.loaders[role] = train_batches(data_cfg, self.datasets[role], seeds[role], info.rank,
                                               info.world, start, self.device, position, self.log)
        src, tgt = self.loaders["source"], self.loaders.get("target")
        while True:
            pair = next(src), next(tgt) if tgt is not None else None
            for batch in filter(None, pair):
                for problem in batch.pop("skipped", ()):
                    self.log(f"warning: skipped {problem} (data.skip_bad=true)")
            yield pair

    @contextlib.contextmanager
    def sigterm_stops_after_the_step(self):
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        start = self.setup()
        cfg, adapter = self.cfg, self.engine.adapter
        self.bar = tqdm(total=cfg.train.iters, initial=start, disable=not self.dist.main, dynamic_ncols=True,
                        desc=cfg.adapt.mode, smoothing=0.1)
        step, self.clock = start, (start, time.perf_counter())
        batches = self.batches(start)
        with self.sigterm_stops_after_the_step(), contextlib.closing(self.bar):
            while step < cfg.train.iters:
                source, target = next(batches)
                _fault_injection_hook(self.run_dir, step, self.dist.rank)
                if self.stop_requested:
                    adapter.request_stop()
                result = adapter.launch(step, source, target)
                self.flush()  # the previous step's numbers: waits for that step only, this one stays queued
                step += 1
                self.pending = step, result
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.iters:
                    self.evaluate(step)
                if self.checkpoint_or_stop(step):
                    return 0
        self.finish(step)
        return 0

    def flush(self) -> None:
        """Read the launched step's numbers (a wait for the device): count a skip, log, show progress.
        Called one step late in the loop, and before anything that needs the step finished (an
        evaluation, a checkpoint, the end)."""
        if self.pending is None:
            return
        (step, result), self.pending = self.pending, None
        report = result.read()
        self.stop_agreed = self.stop_agreed or report.stop
        self.skips.record(step, report)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in report.losses.items()}, refresh=False)
        first, t0 = self.clock
        self.log_step(step, report.losses, report.lr, rate=(step - first) / (time.perf_counter() - t0))

    def log_step(self, step: int, losses: dict, lr: float, rate: float) -> None:
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.iters:
            self.logger.write({"step": step, "lr": lr, **losses, "skipped": self.skips.skipped,
                               "it_s": round(rate, 3)})

    def loader_positions(self) -> dict:
        """{role: [position of rank 0, 1, ...]} of the loaders that report one (DALI), gathered from
        every rank (each reads its own shard); {} with the torch loader. Every rank calls this."""
        local = {role: it.state() for role, it in self.loaders.items() if hasattr(it, "state")}
        if not local:
            return {}
        gathered = [local]
        if self.dist.enabled:
            gathered = [None] * self.dist.world
            torch.distributed.all_gather_object(gathered, local)
        return {role: [positions[role] for positions in gathered] for role in local}

    def checkpoint_or_stop(self, step: int) -> bool:
        """Checkpoint at the cadence, at the end and on preemption -> True when the run must stop now."""
        cfg = self.cfg
        # Every rank stops after the same step, whichever of them got the signal: under DDP the request
        # rides in the steps' own all-reduce and is read with their losses, one step late (no read here).
        stop = self.stop_agreed if self.dist.enabled else self.stop_requested
        preempted = stop or step == cfg.train.stop_at
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.iters or preempted:
            self.flush()
            positions = self.loader_positions()
            if self.dist.main:
                state = checkpoint.training_state(self.engine, step, cfg, self.dist.world, self.skips.skipped,
                                                  positions)
                checkpoint.save(self.run_dir, step, state, cfg.train.keep_last)
            distributed.barrier(self.dist)
        if preempted:
            why = "SIGTERM" if stop else f"train.stop_at={step}"
            self.log(f"stopped at step {step} ({why}); checkpoint written, rerun to resume")
        return preempted

    def evaluate(self, step: int) -> dict | None:
        """Target-val mIoU (rank 0), logged with the prediction and weighting-map pictures; a new
        highest mIoU replaces best.pt and best.json."""
        self.flush()
        result = None
        if self.dist.main:
            val, g = self.datasets["val"], self.engine.nets.g
            if self.cfg.train.eval_images:
                val = torch.utils.data.Subset(val, range(min(self.cfg.train.eval_images, len(val))))
            result = metrics.with_protocols(  # SYNTHIA runs add the 16- and 13-class mIoU
                inference.evaluate_model(g, val, self.device, self.cfg.train.amp,
                                         protocol=self.cfg.train.eval_protocol), self.cfg.data.source)
            fig2 = weight_stats.measure(g, self.engine.nets.d_aux, self.datasets["val"], self.cfg.adapt,
                                        class_groups(self.cfg.data.target), batch=self.cfg.data.batch_size)
            self.logger.write({"step": step, "eval": True,
                               **{k: result[k] for k in metrics.SCORES if k in result}, **fig2})
            if self.logger.tensorboard and self.cfg.log.images:
                self.logger.images(step, pictures.training_figures(
                    g, self.engine.nets.d_aux, self.datasets["val"], self.cfg.adapt, self.cfg.log.images,
                    self.cfg.data.batch_size))
            state = checkpoint.networks_state(self.engine, step, self.cfg)
            best = checkpoint.save_best(self.run_dir, step, result, state)
            self.log(f"step {step}: target mIoU {result['miou']:.2f}"
                     + (f" (best so far: wrote {RunFolder.BEST})" if best else ""))
        distributed.barrier(self.dist)
        return result

    def finish(self, step: int) -> None:
        result = self.evaluate(step)
        if self.dist.main:
            RunFolder(self.run_dir).write_final({**result, "build": self.engine.build()})
            a = self.cfg.adapt
            self.log(metrics.format_result(
                result, f"target val after {step} iterations ({a.mode}, weighting {a.weighting})"))


def run_for_result(argv: list[str], title: str) -> tuple[int, dict | None]:
    """One run in this process, announced with its command line -> (exit code, its final.json or None).

    The driver of `compare` and `ablate`: rerunning resumes an unfinished run and re-evaluates a finished one.
    None with code 0 is a run stopped cleanly before its end (SIGTERM, train.stop_at): the driver stops too,
    and rerunning its command goes on from the checkpoint.
    """
    print(f"\n=== {title}: {shlex.join(['python', '-m', 'pwda_fast.train', *argv])}", flush=True)
    code = main(argv)
    if code != 0:
        return code, None
    folder = RunFolder(config.load(*config.parse_args(argv)).train.run_dir)
    if not folder.final.exists():
        print(f"{title}: stopped before its end; rerun the same command to go on from {folder.path}",
              flush=True)
        return 0, None
    return 0, folder.read_final()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        output = config.requested_output(argv)
        if output and output[0] == "help":
            print(config.help_text("pwda-train", output[1]), end="")
            return 0
        final = engine.finalize(config.load(*config.parse_args(argv)))
        if output:  # --print-config: the config as the run would use it
            print(config.to_toml(final.cfg), end="")
            return 0
        engine.check_trainable(final.cfg)
        device = distributed.choose_device(final.cfg.train.device)
    except (config.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    threads, workers = distributed.cpu_budget(final.cfg.train.threads, final.cfg.data.workers)
    torch.set_num_threads(threads)
    info = distributed.setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    trainer = Trainer(final, info, device, workers)
    del final  # the Trainer drops its init weights once the generator has them
    try:
        return trainer.run()
    except (config.ConfigError, FileNotFoundError, checkpoint.CheckpointError, LoggerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except DataError as e:  # a file that fails mid-run, possibly raised in a loader worker
        print(f"error: data: {data_error_message(e)}", file=sys.stderr)
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
