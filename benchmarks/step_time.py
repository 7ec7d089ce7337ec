"""Step time of every distillation method against its floor, measured side by side.

    .venv/bin/python benchmarks/step_time.py --teacher resnet32x4 --student resnet8x4 \
        --batch 64 --device cpu --threads 2 --steps 16 --warmup 2 [--profile]

The floor of a distillation step is one student training step (forward, cross-entropy,
backward, SGD step) plus one teacher forward without gradients. This script times, on
random images (data loading is excluded from the step; `--profile` measures it apart):

- the student alone (the `vanilla` method), the teacher forward alone (eval, no grad);
- every registered method that trains a student (`kdlab.methods.list_methods()`, so methods
  added later are included), each step being `kdlab.engine.step.TrainStep`, the very object
  `kdlab train` runs per batch (forward under autocast, loss terms, the on-device non-finite
  guard, gradient scaler under fp16, backward, the recipes' fused SGD step);
- the logit-only methods (KD, DKD, generation) fed from a teacher-output cache
  (`kdlab.engine.teacher_cache.TeacherCache.lookup` on a memory-mapped fp16 file of random
  logits: the lookup is included, the teacher is not run).

Modes are interleaved: each round runs one step of every mode (`--rounds` groups more
steps per round), in a fresh order, after `--warmup` untimed steps per mode. The table
reports per mode the median ms over all timed steps, the 25-75th percentiles, images/s, and
ratios measured in the same run: `x floor` divides medians (method / (student + teacher));
`x floor, paired` and `x student alone, paired` are medians over rounds of the per-round
ratio, which stay put when other processes load a shared machine in bursts (the raw per-step
and per-round times go to `--json`). The output is a Markdown table to paste into the README.

Where the time goes (`--profile`; resnet32x4 -> resnet8x4, batch 64, 100 classes, CPU,
2 threads, fp32, quiet machine; the full tables are in docs/speed.md):

- KD and DKD (~780 ms per step): teacher forward 58-59%, student forward 14-15%, student
  backward 26-27%, SGD step 0.2%, the loss itself 0.8 ms (KD) / 1.4 ms (DKD), under 0.2%.
  The methods add nothing measurable to the floor (0.98x-1.01x over two runs, within the
  runs' spread); the only thing left to remove is the teacher forward, which the
  teacher-output cache does: a cached KD/DKD step costs 0.98x-1.01x a student-alone step.
- ReviewKD (~1,750 ms per step, 2.2x-2.4x the floor): the teacher forward is the same single
  no-grad pass (25%); the ABF fusion modules and HCL add 250 ms of forward (14%) and grow the
  backward from about 200 to 960 ms (54%): about 1,000 ms per step, three times the whole
  student step (320 ms). That is the method's own compute, not overhead.
- Data (not in the step): the standard pipeline (PIL pad/crop/flip, ToTensor, Normalize,
  collate) costs 10 ms per 64-image batch in one process (21 ms before `SeededDataset` stopped
  seeding CUDA/XPU/MTIA lazily per sample); the batched crop/flip/normalise of
  `data.pipeline: gpu` 1.0 ms on the same CPU, and it runs on the device on a GPU.

Only CPU figures have been measured so far: no GPU was available to this project's
speed work. `--device cuda` synchronises around each timed step and supports
`--amp bf16`, `--channels-last` and `--compile`; its results have not been measured yet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from kdlab.schema.experiment import OptimConfig  # noqa: E402
from kdlab.engine.step import TrainStep  # noqa: E402
from kdlab.methods import list_methods, method_class  # noqa: E402
from kdlab.methods.base import Batch, SetupContext  # noqa: E402
from kdlab.models import create_model  # noqa: E402

EPOCH = 50  # past every method's loss warm-up, so each step does its full work
OPTIM = OptimConfig(lr=0.01)  # the recipes' SGD (momentum 0.9, weight decay 5e-4), fused like the trainer's


@dataclass
class Mode:
    name: str
    kind: str  # "student" | "teacher" | "method" | "nonteacher" | "cache"
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)  # every timed step, seconds
    rounds: list[float] = field(default_factory=list)  # mean step of each interleaved round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", type=int, default=32, help="input side (default 32: CIFAR)")
    p.add_argument("--dataset-size", type=int, default=50000,
                   help="training-set size the methods are set up for (memory banks; default 50000: CIFAR)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per mode (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds the steps are split into (default: one step per mode per round)")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    p.add_argument("--no-cache", action="store_true", help="skip the teacher-output-cache modes")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each distiller (slow start)")
    p.add_argument("--profile", action="store_true", help="also break the KD/DKD/ReviewKD step down, and time data")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the raw per-step times")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up


class Bench:
    """Models, batch and optimiser settings shared by every mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(self.device)
        self.targets = torch.randint(0, args.classes, (args.batch,), generator=g).to(self.device)
        self.indices = torch.randperm(args.dataset_size, generator=g)[:args.batch].to(self.device)
        if args.channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.teacher = self._net(args.teacher).eval().requires_grad_(False)
        self._tmp = tempfile.TemporaryDirectory(prefix="kdlab-bench-")

    def _net(self, name: str) -> torch.nn.Module:
        net = create_model(name, num_classes=self.args.classes).to(self.device)
        return net.to(memory_format=torch.channels_last) if self.args.channels_last else net

    def autocast(self):
        if self.args.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.args.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def distiller(self, name: str):
        cls = method_class(name)
        d = cls(self._net(self.args.student), self.teacher if cls.requires_teacher else None, cls.Config(),
                input_size=(3, self.args.size, self.args.size), num_classes=self.args.classes)
        d = d.to(self.device).train()
        if self.args.channels_last:
            d = d.to(memory_format=torch.channels_last)
        # What the trainer hands every method before training (memory banks are sized here).
        # The labels of a stand-in training set, for methods that read them (CRD's negatives).
        labels = torch.randint(0, self.args.classes, (self.args.dataset_size,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        d.setup(SetupContext(train_set=range(self.args.dataset_size), num_train_samples=self.args.dataset_size,
                             num_classes=self.args.classes, train_targets=labels, data_cfg=None, seed=0,
                             device=self.device, run_dir=None))
        return d

    def batch(self) -> Batch:
        return Batch(self.images, self.targets, self.indices)

    def train_step(self, distiller, teacher_logits: Callable[[], torch.Tensor] | None = None) -> Callable[[], None]:
        """The trainer's own step (`TrainStep`), on this fixed batch."""
        step = TrainStep.for_distiller(distiller, OPTIM, self.device, self.args.amp, compile=self.args.compile)

        def run() -> None:
            batch = self.batch()
            if teacher_logits is not None:
                batch.teacher_logits = teacher_logits()
            step(batch, EPOCH)

        return run

    def teacher_step(self) -> Callable[[], None]:
        teacher = torch.compile(self.teacher) if self.args.compile else self.teacher

        def step() -> None:
            with torch.no_grad(), self.autocast():
                teacher(self.images)

        return step

    def cache_lookup(self) -> Callable[[], torch.Tensor]:
        """A lookup in a memory-mapped fp16 cache of random logits (2,048 images x 162 views)."""
        from kdlab.engine.teacher_cache import LOGITS_FILE, META_FILE, VERSION, FORMAT, TeacherCache

        n, v, c = 2048, 162, self.args.classes
        folder = Path(self._tmp.name) / "cache"
        folder.mkdir(exist_ok=True)
        mm = np.memmap(folder / LOGITS_FILE, dtype=np.float16, mode="w+", shape=(n, v, c))
        mm[:] = np.random.default_rng(0).normal(0, 3, size=(n, v, c)).astype(np.float16)
        mm.flush()
        (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "shape": [n, v, c]}))
        cache = TeacherCache(folder)
        if self.device.type == "cuda":
            cache.to_device(self.device)  # as the trainer does with data.pipeline=gpu
        g = torch.Generator().manual_seed(1)

        def lookup() -> torch.Tensor:
            idx = torch.randint(0, n, (self.args.batch,), generator=g)
            views = torch.randint(0, v, (self.args.batch,), generator=g)
            return cache.lookup(idx, views, self.device)

        return lookup


def step_or_failure(build: Callable[[], Callable[[], None]]) -> Callable[[], None]:
    """`build()`, or a step that raises what building raised: a method that cannot be set up
    in this bare loop (dkd_split's global ranking needs a dataset) is reported by `warm_up`
    as not timed, like one that fails to step."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - reported by warm_up
        error = exc  # `exc` is unbound once the except block ends

        def failed() -> None:
            raise error

        return failed


def build_modes(bench: Bench) -> list[Mode]:
    args = bench.args
    # Classification methods: the detection ones (det_*) train detectors, not these networks.
    wanted = args.methods.split(",") if args.methods else [
        m for m in list_methods() if m != "vanilla" and "classification" in method_class(m).tasks]
    modes = [Mode(f"student alone ({args.student})", "student", bench.train_step(bench.distiller("vanilla"))),
             Mode(f"teacher forward ({args.teacher}, no grad)", "teacher", bench.teacher_step())]
    cached: list[str] = []
    for name in wanted:
        cls = method_class(name)
        kind = "method" if cls.requires_teacher else "nonteacher"
        label = name if cls.requires_teacher else f"{name} (no teacher)"
        modes.append(Mode(label, kind, step_or_failure(lambda n=name: bench.train_step(bench.distiller(n)))))
        if cls.requires_teacher and not cls.needs_teacher_features and not args.no_cache:
            cached.append(name)
    if cached:
        lookup = bench.cache_lookup()
        for name in cached:
            modes.append(Mode(f"{name} from teacher cache", "cache",
                              step_or_failure(lambda n=name: bench.train_step(bench.distiller(n), lookup))))
    return modes


# ----------------------------------------------------------------------------- timing


def warm_up(bench: Bench, modes: list[Mode]) -> tuple[list[Mode], list[str]]:
    """Run each mode's warm-up steps; a mode that fails (e.g. a method whose default config
    needs more than this loop gives it) is dropped and reported, not fatal."""
    kept, skipped = [], []
    for mode in modes:
        try:
            for _ in range(max(1, bench.args.warmup)):
                mode.step()
            kept.append(mode)
        except Exception as exc:  # noqa: BLE001 - report any method's failure and go on
            if mode.kind in ("student", "teacher"):
                raise
            skipped.append(f"{mode.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            print(f"  skipped {skipped[-1]}", file=sys.stderr)
    bench.sync()
    return kept, skipped


def run_interleaved(bench: Bench, modes: list[Mode]) -> None:
    args = bench.args
    rounds = args.rounds or args.steps
    per_round = max(1, -(-args.steps // rounds))
    order = random.Random(0)
    for r in range(rounds):
        # A fresh order each round: a burst of load from other processes that starts or ends
        # mid-round does not always hit the same modes.
        for mode in order.sample(modes, len(modes)):
            start = len(mode.times)
            for _ in range(per_round):
                bench.sync()
                t0 = time.perf_counter()
                mode.step()
                bench.sync()
                mode.times.append(time.perf_counter() - t0)
            mode.rounds.append(statistics.mean(mode.times[start:]))
        print(f"  round {r + 1}/{rounds} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr)


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def quartiles_ms(times: list[float]) -> tuple[float, float]:
    q = np.percentile(np.asarray(times) * 1000.0, [25, 75])
    return float(q[0]), float(q[1])


def paired_ratio(num: Mode, *den: Mode) -> float:
    """Median over rounds of num / sum(den), each round's steps taken side by side.

    Load from other processes comes in bursts of seconds to minutes that slow every mode of
    the rounds they hit alike, so per-round ratios are far steadier than ratios of medians
    when the machine is shared (on a quiet machine the two agree)."""
    return statistics.median(n / sum(d) for n, *d in zip(num.rounds, *(m.rounds for m in den)))


def results_table(bench: Bench, modes: list[Mode]) -> list[str]:
    batch = bench.args.batch
    student_mode = next(m for m in modes if m.kind == "student")
    teacher_mode = next(m for m in modes if m.kind == "teacher")
    student, teacher = median_ms(student_mode.times), median_ms(teacher_mode.times)
    floor = student + teacher
    lines = ["| step | ms/step (median) | p25-p75 ms | images/s | x floor | x floor, paired | x student alone, paired |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        ms = median_ms(m.times)
        lo, hi = quartiles_ms(m.times)
        x_floor = x_paired = x_student = ""
        if m.kind == "method":
            x_floor, x_paired = f"{ms / floor:.3f}", f"{paired_ratio(m, student_mode, teacher_mode):.3f}"
        if m.kind in ("method", "nonteacher", "cache"):
            x_student = f"{paired_ratio(m, student_mode):.3f}"
        cells = [m.name, f"{ms:.1f}", f"{lo:.1f}-{hi:.1f}", f"{batch / ms * 1000:.0f}", x_floor, x_paired, x_student]
        lines.append("| " + " | ".join(cells) + " |")
        if m.kind == "teacher":
            cells = ["**floor** = student step + teacher forward", f"{floor:.1f}", "", f"{batch / floor * 1000:.0f}",
                     "1.000", "1.000", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- profile


class SectionTimer:
    """Forward hooks that time each call of a module (synchronising on CUDA)."""

    def __init__(self, module: torch.nn.Module, bench: Bench) -> None:
        self.total, self._start, self.bench = 0.0, 0.0, bench
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, *_):
        self.bench.sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self.bench.sync()
        self.total += time.perf_counter() - self._start


def profile_method(bench: Bench, name: str, steps: int) -> dict[str, float]:
    """ms of teacher forward, student forward, loss and extras, backward and optimizer step in
    the fastest of `steps` runs of the trainer's own `TrainStep`: hooks time the forward
    passes and the optimizer step, and backward is the rest of the step. Other processes'
    load only ever adds time, so the fastest step is the least disturbed one, and its parts
    add up to its total."""
    cls = method_class(name)
    d = bench.distiller(name)
    step = TrainStep.for_distiller(d, OPTIM, bench.device, bench.args.amp)
    teacher_t = SectionTimer(bench.teacher, bench) if cls.requires_teacher else None
    student_t = SectionTimer(d.student, bench)
    forward_t = SectionTimer(d, bench)
    opt_time = {"t": 0.0}
    plain_step = step.optimizer.step

    def timed_step(*a, **k):
        bench.sync()
        t0 = time.perf_counter()
        out = plain_step(*a, **k)
        bench.sync()
        opt_time["t"] += time.perf_counter() - t0
        return out

    step.optimizer.step = timed_step  # this instance only
    rows: dict[str, list[float]] = {k: [] for k in ("teacher forward", "student forward", "loss and extras",
                                                    "backward", "optimizer step", "total")}
    for i in range(steps + bench.args.warmup):
        for timer in (teacher_t, student_t, forward_t):
            if timer:
                timer.total = 0.0
        opt_time["t"] = 0.0
        bench.sync()
        t0 = time.perf_counter()
        step(bench.batch(), EPOCH)
        bench.sync()
        total = time.perf_counter() - t0
        if i < bench.args.warmup:
            continue
        tt = teacher_t.total if teacher_t else 0.0
        rows["teacher forward"].append(tt)
        rows["student forward"].append(student_t.total)
        rows["loss and extras"].append(forward_t.total - tt - student_t.total)
        rows["optimizer step"].append(opt_time["t"])
        rows["backward"].append(total - forward_t.total - opt_time["t"])
        rows["total"].append(total)
    for timer in (teacher_t, student_t, forward_t):
        if timer:
            timer.remove()  # the teacher is shared with the next method's profile
    best = int(np.argmin(rows["total"]))
    return {k: 1000.0 * v[best] for k, v in rows.items()}


def data_times(bench: Bench, batches: int = 8) -> dict[str, float]:
    """ms per batch of the standard pipeline (one process) and of the batched GPU pipeline."""
    from torch.utils.data import DataLoader

    from kdlab.data.cifar import CIFARArrays
    from kdlab.data.gpu_pipeline import GpuTrainLoader
    from kdlab.data.transforms import CIFAR100_MEAN, CIFAR100_STD, train_transform
    from kdlab.data.views import describe_transform
    from kdlab.engine.build import train_loader
    from kdlab.schema.experiment import DataConfig

    n = bench.args.batch * batches
    pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    targets = list(np.arange(n) % bench.args.classes)
    tf = train_transform("cifar", "standard", CIFAR100_MEAN, CIFAR100_STD, 32)
    ds = CIFARArrays(pixels, targets, [str(i) for i in range(bench.args.classes)], tf)
    loader: DataLoader = train_loader(ds, DataConfig(name="cifar100", batch_size=bench.args.batch, num_workers=0), 0, "cpu")
    loader.sampler.set_epoch(1)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    standard = (time.perf_counter() - t0) / len(loader) * 1000.0
    spec = describe_transform(tf, 32)
    gpu = GpuTrainLoader(torch.from_numpy(pixels).to(bench.device), torch.tensor(targets).to(bench.device), spec,
                         bench.args.batch, 0, channels_last=bench.args.channels_last)
    gpu.sampler.set_epoch(1)
    list(gpu)  # warm-up
    bench.sync()
    t0 = time.perf_counter()
    for _ in gpu:
        pass
    bench.sync()
    batched = (time.perf_counter() - t0) / len(gpu) * 1000.0
    return {"standard pipeline (DataLoader, 1 process)": standard, f"data.pipeline=gpu (on {bench.device.type})": batched}


def profile_tables(bench: Bench, steps: int, timed: list[str]) -> list[str]:
    names = [n for n in ("kd", "dkd", "reviewkd") if n in timed]
    cols = ["teacher forward", "student forward", "loss and extras", "backward", "optimizer step", "total"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name in names:
        prof = profile_method(bench, name, steps)
        total = prof["total"]
        cells = [f"{prof[c]:.1f} ({100 * prof[c] / total:.0f}%)" if c != "total" else f"{total:.1f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| data, per batch of %d | ms |" % bench.args.batch, "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in data_times(bench).items()]
    return lines


# ----------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def report(args: argparse.Namespace, argv: list[str] | None, bench: Bench, load_before: tuple) -> None:
    modes = build_modes(bench)
    print(f"timing {len(modes)} modes: {args.warmup} warm-up + {args.steps} steps each, "
          f"{args.rounds or args.steps} interleaved rounds", file=sys.stderr)
    modes, skipped = warm_up(bench, modes)
    run_interleaved(bench, modes)
    load_after = os.getloadavg()
    cmd = "python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = (torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda"
              else f"CPU ({machine()}), {torch.get_num_threads()} threads")
    print(f"`{cmd}`\n")
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.classes} classes, {args.size}x{args.size}, "
          f"{device}, amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}, torch "
          f"{torch.__version__}; median of {len(modes[0].times)} steps per mode after {args.warmup} warm-up; "
          f"1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("\n".join(results_table(bench, modes)))
    for line in skipped:
        print(f"\nnot timed: {line}")
    if args.profile:
        print("\nWhere the time goes (ms in the fastest of the profiled steps, share of that step):\n")
        print("\n".join(profile_tables(bench, max(3, args.steps // 2), [m.name for m in modes])))
    if args.json:
        Path(args.json).write_text(json.dumps({m.name: {"times": m.times, "rounds": m.rounds} for m in modes}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    bench = Bench(args)
    try:
        report(args, argv, bench, load_before)
    finally:
        bench._tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
