"""`kdlab cache-teacher CONFIG [key=value ...]`: build the (fp16-rounded) teacher-output cache."""
from __future__ import annotations

import argparse
from pathlib import Path

from kdlab.commands._common import add_config_args
from kdlab.errors import ConfigError

HELP = "precompute the teacher's logits for every crop/flip view (train KD/DKD without the teacher)"
DESCRIPTION = """\
Run the config's frozen teacher once on every view of every training image (CIFAR:
32x32 crops of the 4-pixel zero-padded image times horizontal flips = 162 views) and store
the logits, rounded to float16 (losses move by about 1e-5 relative, see docs/speed.md), as a
memory-mapped file with the teacher checkpoint's SHA-256, the dataset and the augmentation.
Then train with teacher.cache=PATH: logit-only methods
(kd, dkd, generation) look up the logits of the view each sample drew instead of running
the teacher. A stale cache (another teacher checkpoint, dataset or augmentation) is refused.

Size: images x views x classes x 2 bytes (CIFAR-100: 50,000 x 162 x 100 x 2 = 1.6 GB).
Not for continuous augmentations (RandomResizedCrop, AutoAugment) or feature methods
(reviewkd). Uses train.device, train.amp and train.channels_last of the config.

examples:
  kdlab cache-teacher configs/cifar100/dkd/resnet32x4_resnet8x4.yaml data.root=/data \\
        teacher.cache=runs/cache/resnet32x4_c100
  kdlab train configs/cifar100/dkd/resnet32x4_resnet8x4.yaml data.root=/data \\
        teacher.cache=runs/cache/resnet32x4_c100
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache-teacher", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", metavar="PATH", default=None,
                   help="cache folder (default: teacher.cache, else <output_dir>/teacher_cache/<teacher>_<dataset>)")
    p.add_argument("--batch-size", type=int, default=1024, metavar="N", help="views per teacher forward (default 1024)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild an existing cache at that path (the old one is replaced once the new one is complete); "
                        "without it an existing cache is refused untouched")
    p.add_argument("--force", action="store_true", dest="overwrite", help=argparse.SUPPRESS)  # the old name
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import load_config
    from kdlab.engine.device import resolve_device
    from kdlab.engine.run_folder import claim_cache_folder
    from kdlab.engine.teacher_cache import build_cache

    cfg = load_config(args.config, args.overrides)
    if cfg.teacher is None:
        raise ConfigError("kdlab cache-teacher needs a config with a 'teacher:' section (name and checkpoint)")
    default = Path(cfg.output_dir) / "teacher_cache" / f"{cfg.teacher.name}_{cfg.data.name}"
    path = args.out or cfg.teacher.cache or str(default)
    claim_cache_folder(path, overwrite=args.overwrite, retry=f"kdlab cache-teacher {args.config}")
    out = build_cache(cfg, path, device=resolve_device(cfg.train.device), batch_size=args.batch_size,
                      overwrite=args.overwrite, progress=cfg.train.progress)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"teacher cache written: {out} ({size:.1f} MiB, fp16-rounded logits); train with teacher.cache={out}")
    return 0
