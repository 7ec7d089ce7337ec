"""How much the teacher-output cache's fp16 rounding changes the distillation losses.

The cache (`kdlab cache-teacher`) stores the teacher's logits rounded to float16. This script
measures what that rounding does to the losses a student trains on: for every batch of the
training set (the batch size of the teacher's config), the KD loss at T = 4 and T = 1 and the
DKD loss (alpha 1, beta 8, T 4) from the fp16-rounded teacher logits against the same losses
from the float32 logits, all computed in float64 so that only the rounding differs. It reports
the median and largest relative loss error over batches, and the relative error of the loss
gradient with respect to the student's logits (what training actually uses).

    python benchmarks/cache_fp16_error.py TEACHER.pt STUDENT.pt [STUDENT2.pt ...]

The teacher and students are kdlab checkpoints trained on the same dataset (their config
names it); the images are the un-augmented training set. docs/speed.md quotes the figures
for the digits demo teacher.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from kdlab.config import load_config
from kdlab.data import build_datasets
from kdlab.engine.build import eval_loader
from kdlab.engine.checkpoint import build_model_from_checkpoint
from kdlab.losses import dkd_loss, kd_loss

LOSSES = {
    "KD, T = 4": lambda s, t, y: kd_loss(s, t, 4.0),
    "KD, T = 1": lambda s, t, y: kd_loss(s, t, 1.0),
    "DKD (1, 8, T = 4)": lambda s, t, y: dkd_loss(s, t, y, 1.0, 8.0, 4.0),
}


@torch.no_grad()
def all_logits(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out, targets = [], []
    for images, y in loader:
        out.append(model(images).float())
        targets.append(y)
    return torch.cat(out), torch.cat(targets)


def errors(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, batch: int, loss) -> dict[str, list]:
    """Per-batch relative loss and gradient errors of fp16-rounded vs float32 teacher logits."""
    rel_loss, rel_grad = [], []
    rounded = teacher.half().double()
    for start in range(0, len(student), batch):
        s = student[start:start + batch].double().requires_grad_(True)
        y = targets[start:start + batch]
        exact = loss(s, teacher[start:start + batch].double(), y)
        (g_exact,) = torch.autograd.grad(exact, s)
        approx = loss(s, rounded[start:start + batch], y)
        (g_approx,) = torch.autograd.grad(approx, s)
        rel_loss.append(abs(float(approx.detach() - exact.detach())) / abs(float(exact.detach())))
        rel_grad.append(float((g_approx - g_exact).norm() / g_exact.norm()))
    return {"loss": rel_loss, "grad": rel_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("students", nargs="+")
    args = parser.parse_args()
    teacher, ckpt = build_model_from_checkpoint(args.teacher)
    cfg = load_config(data=ckpt.config)
    data = build_datasets(cfg.data.model_copy(update={"augment": "none", "train_subset": None}))
    loader = eval_loader(data.train, cfg.data, "cpu")
    t, y = all_logits(teacher, loader)
    rounding = (t.half().float() - t).abs()
    print(f"teacher {ckpt.model.name}: {len(t)} training images, |z| max {float(t.abs().max()):.2f}, "
          f"per-image logit std (mean) {float(t.std(1).mean()):.2f}, fp16 rounding of z: max {float(rounding.max()):.2e}, "
          f"mean {float(rounding.mean()):.2e}")
    print(f"batches of {cfg.data.batch_size}; relative errors, median / max over batches\n")
    print("| student | loss | loss error | gradient error |")
    print("|---|---|---|---|")
    for path in args.students:
        student, s_ckpt = build_model_from_checkpoint(path)
        s, _ = all_logits(student, loader)
        label = f"{s_ckpt.model.name}, epoch {s_ckpt.epoch}"
        for name, loss in LOSSES.items():
            e = errors(s, t, y, cfg.data.batch_size, loss)
            print(f"| {label} | {name} | {statistics.median(e['loss']):.1e} / {max(e['loss']):.1e} "
                  f"| {statistics.median(e['grad']):.1e} / {max(e['grad']):.1e} |")


if __name__ == "__main__":
    main()
