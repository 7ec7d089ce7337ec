"""Why a batch-norm-heavy model can evaluate at chance on tiny data (docs/own-model.md).

    .venv/bin/python benchmarks/small_data_batchnorm.py

Trains `tv:mobilenet_v3_small` and the zoo's `resnet8x4` from scratch on a generated 4-class
ImageFolder of 32-pixel images (`--train` images per class, batch 16, `--epochs` epochs: a few
dozen steps), then evaluates each trained model twice with the same weights: with the running
batch-norm statistics training left (what `val/top1` reports), and with statistics re-estimated
as a plain average over the training set. A gap between the two is the running statistics
lagging behind the weights, not a model that failed to learn.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.trainer import Trainer  # noqa: E402
from tests.fakedata import write_imagefolder  # noqa: E402


@torch.no_grad()
def top1(model: torch.nn.Module, loader) -> float:
    model.eval()
    right = seen = 0
    for images, targets, *_ in loader:
        right += int((model(images).argmax(1) == targets).sum())
        seen += len(targets)
    return 100.0 * right / seen


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, loader, passes: int = 3) -> None:
    """Running statistics as the cumulative average over `passes` of the training set."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for _ in range(passes):
        for images, *_ in loader:
            model(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=32, help="training images per class")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_imagefolder(tmp, 4, args.train, size=32, splits=("train",), seed=0)
        write_imagefolder(tmp, 4, 16, size=32, splits=("val",), seed=1)
        print("| model | steps | batch-norm layers | train top-1 | val top-1 | val top-1, statistics re-estimated |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in ("tv:mobilenet_v3_small", "resnet8x4"):
            cfg = load_config(data={
                "name": name.replace(":", "_"), "output_dir": f"{tmp}/runs", "model": {"name": name},
                "data": {"name": "imagefolder", "root": tmp, "transform": "cifar", "image_size": 32,
                         "batch_size": 16},
                "optim": {"lr": 0.05}, "schedule": {"name": "constant"},
                "train": {"epochs": args.epochs, "progress": False, "tensorboard": False, "save": "none",
                          "device": "cpu"}})
            trainer = Trainer(cfg)
            result = trainer.fit()
            model = trainer.distiller.student
            layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
            before = top1(model, trainer.val_loader)
            reestimate_batchnorm(model, trainer.train_loader)
            after = top1(model, trainer.val_loader)
            steps = trainer.steps_per_epoch * args.epochs
            print(f"| {name} | {steps} | {layers} | {result.history[-1]['train/top1']:.1f} | {before:.1f} | "
                  f"{after:.1f} |")


if __name__ == "__main__":
    main()
