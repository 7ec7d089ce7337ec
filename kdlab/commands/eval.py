"""`kdlab eval CHECKPOINT`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdlab.errors import CheckpointError

HELP = "evaluate a checkpoint on its validation set (its task's metrics: top-1/top-5 and loss, COCO AP, ...)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=HELP, description=HELP + ". The dataset comes from the config "
                       "stored in the checkpoint; override any data key, e.g. data.root=/other/path.")
    p.add_argument("checkpoint", help="a .pt file written by 'kdlab train', or a run folder (its best.pt, "
                   "else its last.pt; the JSON output names the file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)


def run_checkpoint(path: str) -> str:
    """`path`, or for a run folder the checkpoint to evaluate in it: best.pt, else last.pt."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    from kdlab.engine.run_folder import RunFolder  # lazy: keeps `kdlab --help` fast

    for which in ("best", "last"):
        candidate = RunFolder(folder).checkpoint(which)
        if candidate.is_file():
            return str(candidate)
    raise CheckpointError(f"{path!r} is a folder with no checkpoint in it (no best.pt, no last.pt); pass a "
                          "checkpoint file, or a run folder written by 'kdlab train' with train.save=best or last")


def metrics_report(metrics: dict[str, float], **about: object) -> dict[str, object]:
    """The JSON `kdlab eval` prints: `about`, the metrics, and `undefined`, the metrics without a
    value (an AP with no ground-truth object of that size), which are `null`: JSON has no NaN,
    and 0 would claim a measurement."""
    undefined = [k for k, v in metrics.items() if v != v]  # NaN is the one value unequal to itself
    return {**about, **{k: (None if k in undefined else v) for k, v in metrics.items()}, "undefined": undefined}


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `kdlab --help` fast (torch, pydantic and the rest load only when the command runs)
    from kdlab.config import apply_overrides, load_config
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.device import resolve_device
    from kdlab.engine.distributed import DistInfo
    from kdlab.engine.tasks import task_for

    args.checkpoint = run_checkpoint(args.checkpoint)
    ckpt = Checkpoint.load(args.checkpoint)
    if not ckpt.config:
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} records no config, so kdlab eval cannot tell which dataset to "
            "evaluate it on; evaluate a checkpoint written by 'kdlab train' (best.pt, last.pt)")
    # Evaluating needs the student and the data only: the method that trained it (perhaps a
    # plugin no longer installed) and its teacher are neither validated nor built.
    raw = apply_overrides(ckpt.config, args.overrides)
    cfg = load_config(data={**raw, "method": {"name": "vanilla"}, "teacher": None}, plugins_required=False)
    # The evaluated network is the checkpoint's, built the way its task builds a student (a
    # detector at the run's test size, say); no teacher is needed to evaluate it.
    model_cfg = cfg.model.model_copy(update={"name": ckpt.model.name, "checkpoint": args.checkpoint, "weights": None})
    cfg = cfg.model_copy(update={"model": model_cfg, "teacher": None})
    task = task_for(cfg)
    data = task.build_data(cfg)
    device = resolve_device(args.device)
    model, _ = task.build_networks(cfg, data)
    loader = task.eval_loader(data, cfg, batch_size=None, device=device, dist=DistInfo())
    metrics = task.evaluate(model.to(device), loader, data, cfg, device)
    print(json.dumps(metrics_report(metrics, checkpoint=args.checkpoint, model=cfg.model.name, epoch=ckpt.epoch),
                     allow_nan=False))
    return 0
