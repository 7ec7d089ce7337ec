"""`kdlab eval CHECKPOINT`."""
from __future__ import annotations

import argparse
import json

from kdlab.errors import CheckpointError

HELP = "evaluate a checkpoint on its validation set (top-1, top-5, loss)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP + ". The dataset comes from the config "
                       "stored in the checkpoint; override any data key, e.g. data.root=/other/path.")
    p.add_argument("checkpoint", help="a .pt file written by 'kdlab train'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import load_config
    from kdlab.data import build_datasets
    from kdlab.engine.build import eval_loader
    from kdlab.engine.checkpoint import build_model_from_checkpoint
    from kdlab.engine.device import resolve_device
    from kdlab.engine.evaluate import evaluate

    model, ckpt = build_model_from_checkpoint(args.checkpoint)
    if not ckpt.config:
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} records no config, so kdlab eval cannot tell which dataset to "
            "evaluate it on; evaluate a checkpoint written by 'kdlab train' (best.pt, last.pt)")
    cfg = load_config(data=ckpt.config, overrides=args.overrides)
    data = build_datasets(cfg.data)
    device = resolve_device(args.device)
    metrics = evaluate(model.to(device), eval_loader(data.val, cfg.data, device.type), data.num_classes, device)
    print(json.dumps({"checkpoint": args.checkpoint, "model": cfg.model.name, "epoch": ckpt.epoch, **metrics}))
    return 0
