"""How big a run folder is, per `train.save`, for the CIFAR-100 pair resnet32x4 -> resnet8x4.

    .venv/bin/python benchmarks/run_folder_size.py

Trains the real configs (`configs/cifar100/teachers/resnet32x4.yaml`, then
`configs/cifar100/dkd/resnet32x4_resnet8x4.yaml` from that teacher) for one epoch on a generated
CIFAR-100 in the official archive format (`--train` images), with the default `train.save: last`,
and prints every file's size and each run folder's total. A checkpoint's size does not depend
on the data or the epoch count (weights, SGD momentum buffers, a few small records), so these
are the sizes of a full 240-epoch run; `metrics.jsonl` and `tb/` grow by about 1 kB an epoch.
`train.save: best` keeps only `best.pt` of the checkpoints, `none` none of them.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.trainer import Trainer  # noqa: E402
from tests.fakedata import write_cifar100  # noqa: E402  (the official archive format)


def folder_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes per top-level entry of a run folder (a sub-folder counts all its files)."""
    sizes = {}
    for entry in sorted(run_dir.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name + ("" if entry.is_file() else "/")] = sum(p.stat().st_size for p in files)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=128, help="generated training images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100(tmp, n_train=args.train, n_test=64)
        common = [f"data.root={tmp}", f"output_dir={tmp}/runs", "train.epochs=1", "train.device=cpu",
                  "train.progress=false"]
        teacher = load_config(ROOT / "configs/cifar100/teachers/resnet32x4.yaml", common)
        Trainer(teacher).fit()
        student = load_config(ROOT / "configs/cifar100/dkd/resnet32x4_resnet8x4.yaml",
                              common + [f"teacher.checkpoint={tmp}/runs/{teacher.name}/last.pt"])
        Trainer(student).fit()
        for cfg in (teacher, student):
            sizes = folder_sizes(Path(tmp) / "runs" / cfg.name)
            print(f"{cfg.name} ({cfg.model.name}), train.save=last: {sum(sizes.values()) / 1e6:.1f} MB")
            for name, size in sizes.items():
                print(f"  {name:<16} {size / 1e6:8.2f} MB" if size >= 1e5 else f"  {name:<16} {size / 1e3:8.1f} kB")


if __name__ == "__main__":
    main()
