"""Images per second of the real `kdlab train` against the shared training step alone.

    .venv/bin/python benchmarks/train_throughput.py --methods kd,dkd,reviewkd \
        --pipelines standard,gpu --threads 2 --rounds 2

For each method and data pipeline this runs the whole trainer (`kdlab.engine.trainer.Trainer`:
loader and augmentation, the step, the callbacks that log, checkpoint and show progress, and the
per-epoch evaluation) on a generated CIFAR-100-shaped set in the official archive format
(`--train` images, default 3,072 = 48 steps of 64, and `--val` evaluation images, default 64),
then times `TrainStep`, the very step object the trainer calls, on one of that data's batches.
The epochs after the first are timed (the first pays one-off costs: worker start-up, model
warm-up), so the ratio is what a long run pays per step beyond the step itself. Configurations
take turns round by round, so load from other processes hits them alike; medians are reported.

`--profile` prints a cProfile of one trainer epoch (the standard pipeline), which is how the
host-side costs below were found.

Where the time goes (KD resnet32x4 -> resnet8x4, batch 64, 2 threads, CPU; see docs/speed.md for
the figures): the step is ~99% of a trainer epoch when nothing competes with it for the cores.
With DataLoader worker processes (the old default, 2), the workers decode and augment each image
with PIL (10-18 ms of CPU per 64-image batch) *while* the step runs: on a 2-core machine they take
cores from the step's OpenMP threads, which then spin at their barriers, so the step itself ran
slower inside the trainer than alone (1.08-1.17x). `data.num_workers: auto` (the default) is now 0
on the CPU: decoding in the main process between steps costs those 10-18 ms serially, about 1-2% of
an 840 ms step, and the trainer runs at 0.99-1.00x its step. The evaluation (64 images), the
checkpoint (written atomically with fsync) and the metrics line cost a few tens of ms per epoch,
under 1% of a 48-step epoch. `--workers N` measures an explicit worker count.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.callbacks import Callback  # noqa: E402
from kdlab.engine.checkpoint import Checkpoint  # noqa: E402
from kdlab.engine.step import TrainStep  # noqa: E402
from kdlab.engine.trainer import Trainer  # noqa: E402
from kdlab.models import create_model  # noqa: E402
from tests.fakedata import write_cifar100  # noqa: E402  (the official archive format)

EPOCH = 50  # past every method's loss warm-up, as in benchmarks/step_time.py


class EpochClock(Callback):
    """Wall time at the end of every epoch (after evaluation, checkpoint and logging)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_epoch_end(self, trainer, epoch, row) -> None:
        self.ends.append(time.perf_counter())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--methods", default="kd,dkd,reviewkd")
    p.add_argument("--pipelines", default="standard,gpu", help="standard (DataLoader) and/or gpu (in-memory, batched)")
    p.add_argument("--train", type=int, default=3072, help="training images (default 3072: 48 steps of 64)")
    p.add_argument("--val", type=int, default=64, help="evaluation images per epoch (default 64)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config default)")
    p.add_argument("--epochs", type=int, default=3, help="trainer epochs per round; the first is not timed")
    p.add_argument("--steps", type=int, default=6, help="timed steps of the step alone per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="cProfile one epoch of the first method, standard pipeline")
    return p.parse_args(argv)


def make_setup(args, folder: Path) -> tuple[Path, Path]:
    data = folder / "data"
    write_cifar100(data, args.train, args.val)
    torch.manual_seed(0)
    teacher = folder / "teacher.pt"
    Checkpoint.for_model(create_model(args.teacher, num_classes=100), args.teacher, 100).save(teacher)
    return data, teacher


def config(args, folder: Path, data: Path, teacher: Path, method: str, pipeline: str, name: str):
    raw = {
        "name": name, "output_dir": str(folder / "runs"),
        "model": {"name": args.student},
        "teacher": {"name": args.teacher, "checkpoint": str(teacher)},
        "method": {"name": method},
        "data": {"name": "cifar100", "root": str(data), "batch_size": args.batch, "pipeline": pipeline},
        "optim": {"lr": 0.01},
        "schedule": {"name": "constant"},
        "train": {"epochs": args.epochs, "device": "cpu", "progress": False},
    }
    if args.workers is not None:
        raw["data"]["num_workers"] = args.workers
    return load_config(data=raw)


def time_trainer(cfg) -> tuple[float, Trainer]:
    """Seconds per step over the epochs after the first."""
    clock = EpochClock()
    trainer = Trainer(cfg, overwrite=True, callbacks=[clock])
    trainer.fit()
    steps = trainer.steps_per_epoch * (len(clock.ends) - 1)
    return (clock.ends[-1] - clock.ends[0]) / steps, trainer


def time_step(trainer: Trainer, steps: int) -> float:
    """Median seconds of the trainer's own step, built afresh, on one of its batches."""
    step = TrainStep.for_distiller(trainer.distiller, trainer.cfg.optim, trainer.device, trainer.cfg.train.amp)
    trainer.train_loader.sampler.set_epoch(1)
    raw = next(iter(trainer.train_loader))
    batch = trainer.task.to_batch(raw, trainer.device)
    trainer.distiller.train()
    step(batch, EPOCH)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(batch, EPOCH)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    pipelines = args.pipelines.split(",")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kdlab-throughput-") as tmp:
        folder = Path(tmp)
        data, teacher = make_setup(args, folder)
        if args.profile:
            cfg = config(args, folder, data, teacher, methods[0], "standard", "profile")
            prof = cProfile.Profile()
            prof.enable()
            Trainer(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}),
                    overwrite=True).fit()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
        results: dict[tuple[str, str], dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for method in methods:
                for pipeline in pipelines:
                    cfg = config(args, folder, data, teacher, method, pipeline, f"{method}_{pipeline}")
                    per_step, trainer = time_trainer(cfg)
                    alone = time_step(trainer, args.steps)
                    entry = results.setdefault((method, pipeline), {"trainer": [], "step": [], "ratio": []})
                    entry["trainer"].append(per_step)
                    entry["step"].append(alone)
                    entry["ratio"].append(per_step / alone)
                    print(f"  round {r + 1}: {method} {pipeline}: trainer {per_step * 1000:.0f} ms/step, "
                          f"step alone {alone * 1000:.0f} ms", file=sys.stderr)
    cmd = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"`{cmd}`\n")
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.train} training / {args.val} evaluation "
          f"images (CIFAR-100 shapes), CPU, {args.threads} threads, torch {torch.__version__}; medians of "
          f"{args.rounds} rounds (epochs 2-{args.epochs} of each trainer run); 1-min load {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")
    print("| method | pipeline | trainer ms/step | trainer images/s | step alone ms | step images/s | trainer / step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (method, pipeline), e in results.items():
        t, s = statistics.median(e["trainer"]), statistics.median(e["step"])
        print(f"| {method} | {pipeline} | {t * 1000:.0f} | {args.batch / t:.0f} | {s * 1000:.0f} | {args.batch / s:.0f} | "
              f"{statistics.median(e['ratio']):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
