"""The ImageNet configs (configs/imagenet/**) run unchanged on an ImageNet-layout folder.

Each config is loaded as shipped; only what points at this machine is overridden: data.root
(a generated 3-class ImageFolder), the size of the run (2 training images, batch 2, one epoch,
CPU, no workers) and the teacher's weight file (a fresh torchvision state dict for 3 classes
in place of the ImageNet file the config names). Model names, methods, transforms (224x224
crops) and every hyperparameter stay as they are.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fakedata import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
#: the configs of the DKD and ReviewKD issues (teachers and KD baselines share their recipe)
CONFIGS = sorted(p for d in ("dkd", "reviewkd") for p in (REPO / "configs" / "imagenet" / d).glob("*.yaml"))


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    # wnid-like class folders, small JPEGs (the transforms resize them to 224 crops)
    return write_imagefolder(root, ["n01440764", "n01443537", "n01484850"], 1, size=(72, 64), ext="jpg")


def _weights_file(name: str, num_classes: int, folder: Path) -> str:
    """A local weight file as the library saves it (torchvision/timm key names)."""
    if name.startswith("tv:"):
        import torchvision

        state = torchvision.models.get_model(name[3:], num_classes=num_classes).state_dict()
    elif name.startswith("timm:"):
        import timm

        state = timm.create_model(name[5:], num_classes=num_classes).state_dict()
    else:
        from kdlab.models import create_model

        state = create_model(name, num_classes=num_classes).state_dict()
    path = folder / f"{name.replace(':', '_')}_{num_classes}.pth"
    torch.save(state, path)
    return str(path)


def _checkpoint_file(name: str, num_classes: int, kwargs: dict, folder: Path) -> str:
    """A kdlab checkpoint of a fresh model (what 'kdlab train' would have written)."""
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.models import create_model

    model = create_model(name, num_classes=num_classes, **kwargs)
    path = folder / f"{name.replace(':', '_')}_teacher.pt"
    Checkpoint.for_model(model, name, num_classes, kwargs).save(path)
    return str(path)


def _one_step(path: Path, root: Path, tmp_path: Path) -> None:
    from kdlab.config import load_config
    from kdlab.engine.trainer import Trainer

    shipped = load_config(path)
    assert shipped.data.name == "imagefolder" and (shipped.data.transform or "imagenet") == "imagenet"
    overrides = [
        f"data.root={root}", "data.train_subset=2", "data.batch_size=2", "data.eval_batch_size=3",
        "data.num_workers=0", "train.epochs=1", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", f"output_dir={tmp_path / 'runs'}",
    ]
    if shipped.model.weights:  # ImageNet weights (1000 classes) when the head is reset, else ours
        classes = 1000 if shipped.model.kwargs.get("reset_head") else 3
        overrides.append(f"model.weights={_weights_file(shipped.model.name, classes, tmp_path)}")
    teacher = shipped.teacher
    if teacher is not None and teacher.weights:
        overrides += [f"teacher.weights={_weights_file(teacher.name, 3, tmp_path)}", "teacher.checkpoint=null"]
    elif teacher is not None:
        overrides.append(f"teacher.checkpoint={_checkpoint_file(teacher.name, 3, teacher.kwargs, tmp_path)}")
    cfg = load_config(path, overrides)
    assert (cfg.model.name, cfg.method) == (shipped.model.name, shipped.method)  # unchanged
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert trainer.data.input_size == (3, 224, 224)
    row = result.history[-1]
    assert math.isfinite(row["train/loss"]) and math.isfinite(row["val/loss"])
    assert (Path(result.run_dir) / "last.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not CONFIGS, reason="no configs/imagenet/{dkd,reviewkd}/*.yaml in this checkout")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs" / "imagenet")))
def test_imagenet_config_trains_one_step_on_an_imagefolder(path, imagenet_root, tmp_path):
    _one_step(path, imagenet_root, tmp_path)


@pytest.mark.slow
def test_own_dataset_example_trains_one_step(imagenet_root, tmp_path):
    """The README's "Distill your own model" example: ImageNet-initialised tv: student with a
    reset head, distilled with DKD from a tv: teacher checkpoint."""
    _one_step(REPO / "configs" / "imagefolder" / "dkd_resnet50_mobilenet_v3.yaml", imagenet_root, tmp_path)
