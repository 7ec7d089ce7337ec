"""Step time of ReviewKD against KD and against the floor (student step + teacher forward).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reviewkd_step.py            # CPU, 2 threads
    .venv/bin/python benchmarks/reviewkd_step.py --device cuda --steps 50

One "step" is what the trainer does per batch, without data loading: `kdlab.engine.step.TrainStep`,
the trainer's own step object (forward, loss terms, non-finite guard, backward, fused SGD update). Timed on one fixed random batch (default resnet32x4 -> resnet8x4, 100 classes,
batch 64, 32x32), median over `--steps` steps after `--warmup` untimed ones; the four
workloads take turns, one step each per round, so load changes hit them alike:

    student step      the `vanilla` method: student forward + CE + backward + update (no teacher)
    teacher forward   the teacher's forward without gradients (eval mode)
    floor             student step + teacher forward: the least any distillation step costs
    KD step           kdlab's `kd` method (teacher forward inside the step)
    ReviewKD step     kdlab's `reviewkd` method (teacher features, ABFs, HCL, ABF update)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlab.schema.experiment import OptimConfig  # noqa: E402
from kdlab.engine.step import TrainStep  # noqa: E402
from kdlab.methods import method_class  # noqa: E402
from kdlab.methods.base import Batch  # noqa: E402
from kdlab.models import create_model  # noqa: E402


def interleaved_medians(fns: dict[str, Callable[[], None]], steps: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median ms per call of each function. The functions take turns (one call each per
    round), so a change in machine load affects all of them alike and the ratios stay fair."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for key, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--literal", action="store_true",
                   help="also time ReviewKD with the fusion computed literally (upsample y, concatenate, "
                        "conv), as in the reference code, to measure kdlab's fused formulation")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = torch.randint(0, args.classes, (args.batch,), device=device)
    teacher = create_model(args.teacher, args.classes).to(device).eval().requires_grad_(False)

    def fresh_student() -> torch.nn.Module:
        torch.manual_seed(1)
        return create_model(args.student, args.classes).to(device).train()

    optim = OptimConfig(lr=0.01, nesterov=True)  # the ReviewKD recipe's SGD
    batch = Batch(images, targets, torch.arange(args.batch, device=device))

    @torch.no_grad()
    def teacher_forward() -> None:
        teacher(images)

    def distiller_step(name: str, **method) -> tuple[Callable[[], None], torch.nn.Module]:
        cls = method_class(name)
        d = cls(fresh_student(), teacher if cls.requires_teacher else None, cls.Config(**method), input_size=(3, args.size, args.size),
                num_classes=args.classes).to(device).train()
        train_step = TrainStep.for_distiller(d, optim, device)

        def step() -> None:
            train_step(batch, 100)

        return step, d

    student_step, _ = distiller_step("vanilla")
    kd_step, _ = distiller_step("kd")
    rkd_step, rkd = distiller_step("reviewkd", weight=5.0)
    fns = {"student step": student_step, "teacher forward": teacher_forward, "KD step": kd_step,
           "ReviewKD step": rkd_step}
    if args.literal:
        from kdlab.methods.reviewkd import ABF, resize_map

        def literal_fuse(abf: ABF, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            y = resize_map(y, x.shape[-2:])
            a = abf.att_conv(torch.cat([x, y], dim=1))
            return x * a[:, 0:1] + y * a[:, 1:2]

        literal_step, literal = distiller_step("reviewkd", weight=5.0)
        for abf in literal.abfs:
            abf.fuse = literal_fuse.__get__(abf)  # this instance only
        fns["ReviewKD step, literal fusion"] = literal_step
    results = interleaved_medians(fns, args.steps, args.warmup, device)
    results["floor (student step + teacher forward)"] = results["student step"] + results["teacher forward"]

    abf_params = sum(p.numel() for p in rkd.abfs.parameters())
    student_params = sum(p.numel() for p in rkd.student.parameters())
    print(f"{args.teacher} -> {args.student}, {args.classes} classes, batch {args.batch}, "
          f"{args.size}x{args.size}, {device}"
          + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
          + f", median of {args.steps} steps after {args.warmup} warm-up")
    print(f"ABF parameters {abf_params:,} (student {student_params:,}); mid width {rkd.mid_channels}")
    keys = ["student step", "teacher forward", "floor (student step + teacher forward)", "KD step", "ReviewKD step"]
    for key in keys + [k for k in results if k not in keys]:
        print(f"  {key:<40s} {results[key]:9.1f} ms")
    print(f"  {'ReviewKD / KD':<40s} {results['ReviewKD step'] / results['KD step']:9.2f}x")
    print(f"  {'ReviewKD / floor':<40s} {results['ReviewKD step'] / results['floor (student step + teacher forward)']:9.2f}x")
    print(f"  {'KD / floor':<40s} {results['KD step'] / results['floor (student step + teacher forward)']:9.2f}x")
    if args.literal:
        print(f"  {'ReviewKD literal fusion / KD':<40s} {results['ReviewKD step, literal fusion'] / results['KD step']:9.2f}x")


if __name__ == "__main__":
    main()
