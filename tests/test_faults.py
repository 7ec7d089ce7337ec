"""Faults a careless user meets (issue 21): damaged COCO annotations and image files, Ctrl-C
pressed twice, a disk that fills up mid-run, YAML that hides mistakes. Each is one clear
message (or a documented, logged drop) and loses nothing."""
from __future__ import annotations

import errno
import json
import logging
import math
import signal
import time
from pathlib import Path

import pytest
import torch

from kdlab.config import load_config
from kdlab.schema.experiment import MIN_TEMPERATURE
from kdlab.data.coco import CocoSplit, detection_transforms
from kdlab.engine.checkpoint import Checkpoint
from kdlab.engine.trainer import Trainer
from kdlab.errors import ConfigError, DataError, KDLabError

# ----------------------------------------------------------------------------- COCO annotations


def _doc(boxes=((2, 3, 10, 8), (1, 1, 5, 5)), image_ids=(1, 2)):
    """Two 30x20 images, one box each (the boxes and image ids are the test's to spoil)."""
    images = [{"id": i, "file_name": f"{n}.png", "height": 20, "width": 30} for n, i in enumerate(image_ids)]
    anns = [{"id": k + 1, "image_id": images[k % len(images)]["id"], "category_id": 1, "bbox": list(box),
             "area": 1.0, "iscrowd": 0} for k, box in enumerate(boxes)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def _write(folder: Path, doc: dict) -> tuple[Path, Path]:
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for im in doc["images"]:
        Image.new("RGB", (im["width"], im["height"])).save(folder / "img" / im["file_name"])
    ann = folder / "ann.json"
    ann.write_text(json.dumps(doc))  # NaN and Infinity are written as JSON's common extension
    return folder / "img", ann


def test_duplicate_image_ids_are_an_error_naming_the_id_and_both_files(tmp_path):
    images, ann = _write(tmp_path, _doc(image_ids=(7, 7)))
    for train in (True, False):
        with pytest.raises(DataError, match=r"image id 7 is used twice \('0.png' and '1.png'\).*give every image"):
            CocoSplit(images, ann, train=train)


@pytest.mark.parametrize("key,value,message", [
    ("id", 1, r"annotation id 1 is used twice \(images 1 and 2\); give every annotation its own id"),
    ("category_id", 5, r"annotation 2 has category 5, which is not in 'categories' \(image 2\)"),
])
def test_a_second_annotation_that_contradicts_the_file_is_an_error_naming_the_image(tmp_path, key, value, message):
    doc = _doc()
    doc["annotations"][1][key] = value
    images, ann = _write(tmp_path, doc)
    with pytest.raises(DataError, match=message):
        CocoSplit(images, ann, train=True)


BAD_BOXES = {
    "negative width": (5, 5, -3, 4),
    "zero height": (5, 5, 3, 0),
    "outside the image": (40, 2, 5, 5),  # the image is 30 wide
    "not finite": (math.nan, 2, 5, 5),
    "infinite": (2, 2, math.inf, 5),
}


@pytest.mark.parametrize("problem", sorted(BAD_BOXES))
def test_an_invalid_box_is_an_error_naming_the_image_with_invalid_boxes_error(tmp_path, problem):
    images, ann = _write(tmp_path, _doc(boxes=((2, 3, 10, 8), BAD_BOXES[problem])))
    for train in (True, False):
        with pytest.raises(DataError) as err:
            CocoSplit(images, ann, train=train, invalid_boxes="error")
        text = str(err.value)
        assert "annotation 2 (image 2, '1.png')" in text and "detection.invalid_boxes=drop" in text, text
        assert str(ann) in text


def test_invalid_boxes_are_dropped_with_a_logged_count_by_default(tmp_path, caplog):
    boxes = ((2, 3, 10, 8), (5, 5, 0, 4), (math.nan, 1, 2, 2), (2, 2, 4.5, 4))  # images 1, 2, 1, 2
    images, ann = _write(tmp_path, _doc(boxes=boxes))
    with caplog.at_level(logging.WARNING, logger="kdlab"):
        train = CocoSplit(images, ann, train=True, transforms=detection_transforms(False))
    assert "2 of the 4 boxes" in caplog.text and str(ann) in caplog.text
    assert "annotation 2 (image 2, '1.png')" in caplog.text
    assert train.ids == [1, 2]
    assert train[1][1]["boxes"].tolist() == [[2.0, 2.0, 6.5, 6.0]]
    # Evaluation scores against the same, cleaned annotations.
    val = CocoSplit(images, ann, train=False)
    assert sorted(a["id"] for a in val.coco.dataset["annotations"]) == [1, 4]


def test_a_training_image_left_without_boxes_is_skipped_and_counted(tmp_path, caplog):
    images, ann = _write(tmp_path, _doc(boxes=((2, 3, 10, 8), (5, 5, 0, 4))))
    with caplog.at_level(logging.WARNING, logger="kdlab"):
        train = CocoSplit(images, ann, train=True)
    assert train.ids == [1] and "1 of the 2 boxes" in caplog.text


def test_a_split_whose_every_box_is_invalid_is_an_error(tmp_path):
    images, ann = _write(tmp_path, _doc(boxes=((5, 5, 0, 4), (50, 50, 3, 3))))
    for train in (True, False):
        with pytest.raises(DataError, match="every one of the 2 boxes .* is invalid"):
            CocoSplit(images, ann, train=train)


def test_the_detection_config_chooses_what_invalid_boxes_do(tmp_path):
    from detkit import tiny_config

    from kdlab.engine.tasks.detection import DetectionTask

    images, ann = _write(tmp_path, _doc(boxes=((2, 3, 10, 8), (1, 1, 5, 5), (5, 5, 0, 4))))  # images 1, 2, 1
    paths = {"train_images": str(images), "train_annotations": str(ann), "val_images": str(images),
             "val_annotations": str(ann)}
    raw = tiny_config(tmp_path / "runs", tmp_path, data={"name": "coco"}, detection=paths)
    assert len(DetectionTask().build_data(load_config(data=raw)).train) == 2
    with pytest.raises(DataError, match="1 of the 3 boxes .* are invalid: annotation 3"):
        DetectionTask().build_data(load_config(data=raw, overrides=["detection.invalid_boxes=error"]))


def test_a_validation_split_without_annotations_is_an_error_before_training(tmp_path):
    doc = _doc()
    doc["annotations"] = []
    images, ann = _write(tmp_path, doc)
    with pytest.raises(DataError, match=r"has no annotations.*nothing to score"):
        CocoSplit(images, ann, train=False, what=("detection.val_images", "detection.val_annotations"))
    doc = _doc()
    doc["annotations"] = [{**a, "iscrowd": 1} for a in doc["annotations"]]
    images, ann = _write(tmp_path, doc)
    with pytest.raises(DataError, match="only crowd regions"):
        CocoSplit(images, ann, train=False)
    doc["images"], doc["annotations"] = [], []
    images, ann = _write(tmp_path, doc)
    with pytest.raises(DataError, match="lists no images"):
        CocoSplit(images, ann, train=False)


def test_integer_boxes_are_read_as_float(tmp_path):
    images, ann = _write(tmp_path, _doc())
    assert all(isinstance(v, int) for a in json.loads(ann.read_text())["annotations"] for v in a["bbox"])
    train = CocoSplit(images, ann, train=True, transforms=detection_transforms(True, sizes=(20,), max_size=40))
    boxes = train[0][1]["boxes"]
    assert boxes.dtype == torch.float32


def test_integer_boxes_train_a_detector_step(tmp_path):
    """Labelling tools export integer boxes; the detector trains on them (torchvision refuses
    integer target boxes)."""
    from detkit import tiny_config, tiny_shapes

    root = tiny_shapes(tmp_path / "shapes")
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}.json"
        doc = json.loads(path.read_text())
        for a in doc["annotations"]:
            a["bbox"] = [int(round(v)) for v in a["bbox"]]
        path.write_text(json.dumps(doc))
    raw = tiny_config(tmp_path / "runs", root, data={"name": "coco"},
                      detection={"train_images": "train", "train_annotations": "annotations/instances_train.json",
                                 "val_images": "val", "val_annotations": "annotations/instances_val.json"},
                      train={"iterations": 1})
    result = Trainer(load_config(data=raw)).fit()
    assert result.history[0]["train/loss"] > 0 and not math.isnan(result.best["bbox_ap"])


# ----------------------------------------------------------------------------- image files


def _imagefolder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(root / split / cls / "fine.jpg")
    return root


@pytest.mark.parametrize("content", [b"", b"this is not a JPEG"], ids=["empty", "not-an-image"])
def test_a_corrupt_image_in_an_imagefolder_is_one_message_naming_it(tmp_path, content):
    from kdlab.data import build_datasets
    from kdlab.schema.experiment import DataConfig

    root = _imagefolder(tmp_path)
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(content)
    bundle = build_datasets(DataConfig(name="imagefolder", root=str(root), transform="cifar", num_workers=0))
    index = [p for p, _ in bundle.train.samples].index(str(bad))
    with pytest.raises(DataError, match=rf"image file '{bad}' cannot be read as an image .*replace or delete it"):
        bundle.train[index]
    bundle.train[0]  # the others still load


def test_a_corrupt_image_read_in_a_loader_worker_is_the_same_one_message(tmp_path):
    from torch.utils.data import DataLoader

    from kdlab.data import build_datasets
    from kdlab.schema.experiment import DataConfig

    root = _imagefolder(tmp_path)
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"")
    bundle = build_datasets(DataConfig(name="imagefolder", root=str(root), transform="cifar", num_workers=0))
    with pytest.raises(DataError) as err:
        list(DataLoader(bundle.train, batch_size=4, num_workers=1))
    text = str(err.value)
    assert text.startswith(f"image file '{bad}' cannot be read") and "Traceback" not in text, text


def test_a_corrupt_coco_image_is_one_message_naming_it(tmp_path):
    images, ann = _write(tmp_path, _doc())
    (images / "1.png").write_bytes(b"\x89PNG broken")
    train = CocoSplit(images, ann, train=True)
    with pytest.raises(DataError, match=r"image file '.*1.png' cannot be read as an image"):
        train[1]


# ----------------------------------------------------------------------------- Ctrl-C twice


def test_the_gate_holds_ctrl_c_until_released_and_once_raised_holds_the_next():
    from kdlab.engine.interrupts import InterruptGate

    with InterruptGate(holding=False) as gate:
        gate.hold()
        signal.raise_signal(signal.SIGINT)  # mid-step: recorded only
        assert gate.pending
        with pytest.raises(KeyboardInterrupt):
            gate.release()
        signal.raise_signal(signal.SIGINT)  # during the save that follows: waits
        gate.pending = False
        gate.holding = False
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # between steps: at once
        signal.raise_signal(signal.SIGINT)  # and the next one waits for its save
        assert gate.pending
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_gate_leaves_ctrl_c_alone_outside_the_main_thread():
    import threading

    from kdlab.engine.interrupts import InterruptGate

    seen = []

    def run():
        try:
            with InterruptGate():  # Python installs signal handlers in the main thread only
                seen.append(signal.getsignal(signal.SIGINT))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            seen.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def _raw(make_config, name):
    return make_config(name=name, data={"batch_size": 64}, schedule={"name": "cosine"},
                       train={"epochs": 2, "deterministic": True})


def test_a_second_ctrl_c_during_the_interrupt_save_waits_for_the_save(make_config, tmp_path, monkeypatch):
    from kdlab.methods.vanilla import Vanilla

    original_forward, original_save = Vanilla.forward_train, Checkpoint.save
    calls = {"forward": 0}

    def forward(self, batch, epoch):
        calls["forward"] += 1
        if calls["forward"] == 6:  # epoch 2, batch 2 (4 batches per epoch)
            signal.raise_signal(signal.SIGINT)
        return original_forward(self, batch, epoch)

    def save(self, path):
        if self.partial is not None:  # the interrupt save: Ctrl-C again, impatiently
            signal.raise_signal(signal.SIGINT)
        original_save(self, path)

    monkeypatch.setattr(Vanilla, "forward_train", forward)
    monkeypatch.setattr(Checkpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(data=_raw(make_config, "cut"))).fit()
    saved = Checkpoint.load(tmp_path / "runs" / "cut" / "last.pt")
    assert saved.epoch == 1 and saved.partial is not None and saved.partial["batches"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_the_cli_says_interrupted_once_after_two_ctrl_c(make_config, tmp_path, monkeypatch, capsys):
    import yaml

    from kdlab.cli import main as cli_main
    from kdlab.methods.vanilla import Vanilla

    original_forward, original_save = Vanilla.forward_train, Checkpoint.save

    def forward(self, batch, epoch):
        signal.raise_signal(signal.SIGINT)
        return original_forward(self, batch, epoch)

    def save(self, path):
        signal.raise_signal(signal.SIGINT)
        original_save(self, path)

    monkeypatch.setattr(Vanilla, "forward_train", forward)
    monkeypatch.setattr(Checkpoint, "save", save)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_raw(make_config, "cli")))
    assert cli_main(["-q", "train", str(tmp_path / "c.yaml")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("interrupted") >= 1
    assert Checkpoint.load(tmp_path / "runs" / "cli" / "last.pt").partial["batches"] == 1


# ----------------------------------------------------------------------------- write failures


def _full_disk_on(monkeypatch, nth: int) -> dict:
    """torch.save inside checkpoint writes fails with ENOSPC from the `nth` call on."""
    import kdlab.engine.checkpoint as checkpoint

    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= nth:
            f.write(b"\0" * 100)  # part of the file reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    return calls


def test_a_full_disk_mid_run_is_one_message_keeps_the_last_checkpoint_and_resumes(make_config, tmp_path,
                                                                                  monkeypatch):
    ref = Trainer(load_config(data=_raw(make_config, "ref"))).fit()
    run = tmp_path / "runs" / "full"
    calls = _full_disk_on(monkeypatch, nth=3)  # epoch 1 writes best.pt and last.pt; epoch 2 fails
    with pytest.raises(KDLabError) as err:
        Trainer(load_config(data=_raw(make_config, "full"))).fit()
    monkeypatch.undo()
    text = str(err.value)
    assert calls["n"] == 3
    assert str(run) in text and "No space left on device" in text and "--resume" in text, text
    assert f"{run / 'last.pt'} (epoch 1) is intact" in text, text
    assert Checkpoint.load(run / "last.pt").epoch == 1
    assert not list(run.glob(".*.tmp"))
    resumed = Trainer(load_config(data=_raw(make_config, "full")), resume=True).fit()
    a, b = (Checkpoint.load(Path(r.run_dir) / "last.pt").model_state for r in (ref, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.best == ref.best


def test_an_unwritable_run_folder_mid_run_is_one_message_without_traceback(make_config, tmp_path, monkeypatch,
                                                                          capsys):
    import tempfile

    import yaml

    import kdlab.engine.checkpoint as checkpoint
    from kdlab.cli import main as cli_main

    real = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the folder was made read-only after epoch 1 (root ignores chmod)
            raise PermissionError(errno.EACCES, "Permission denied",
                                  str(Path(kwargs["dir"]) / f"{kwargs['prefix']}abc{kwargs['suffix']}"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", mkstemp)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_raw(make_config, "ro")))
    assert cli_main(["-q", "train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "ro"
    assert "Traceback" not in err and "Permission denied" in err and ".tmp" not in err, err
    assert str(run / "best.pt") in err or str(run / "last.pt") in err, err
    assert Checkpoint.load(run / "last.pt").epoch == 1


# ----------------------------------------------------------------------------- YAML


def test_duplicate_yaml_keys_are_an_error_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: resnet8}\ntrain:\n  epochs: 3\n  seed: 1\n\ntrain:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'train' appears twice in one mapping \(lines 2 and 6\)"):
        load_config(path)
    path.write_text("model: {name: resnet8}\ntrain:\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' appears twice .*\(lines 3 and 4\)"):
        load_config(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: resnet8}\ntrain:\n  <<: {epochs: 3, seed: 1}\n  epochs: 5\n")
    assert load_config(path).train.epochs == 5


def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx", "xxxxxxxxxx"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nmodel:\n  name: *a{levels - 1}\n"


def test_an_error_quotes_a_bounded_excerpt_of_a_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(_alias_bomb(4))  # 5,000 strings: below the expansion limit
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.name" in str(err.value) and len(str(err.value)) < 2000, len(str(err.value))


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(_alias_bomb(9))  # 500 million strings once expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases .* expand to more than"):
        load_config(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("base", ["5", "[null]", "[5]", "{a: b}", "[['x.yaml']]", "''", "[true]"])
def test_a_malformed_base_is_one_error(tmp_path, base):
    path = tmp_path / "c.yaml"
    path.write_text(f"base: {base}\nmodel: {{name: resnet8}}\n")
    with pytest.raises(ConfigError, match=r"'base' must be a file path or a list of file paths"):
        load_config(path)


def test_a_near_zero_temperature_is_refused_with_the_bound(make_config):
    expected = rf"method.temperature: .*finite and at least {MIN_TEMPERATURE}.*\(got '1e-9'\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(data=make_config(method={"name": "kd"}, teacher={"name": "resnet8", "checkpoint": "t.pt"}),
                    overrides=["method.temperature=1e-9"])


def _temperature_fields():
    from kdlab.methods import list_methods, method_config_class

    for name in list_methods():
        cls = method_config_class(name)
        for field in cls.model_fields:
            if "temperature" in field or field == "tau":
                yield name, cls, field


@pytest.mark.parametrize("name,cls,field", list(_temperature_fields()), ids=lambda v: getattr(v, "__name__", v))
def test_every_temperature_setting_has_the_lower_bound(name, cls, field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=f"finite and at least {MIN_TEMPERATURE}"):
        cls.model_validate({"name": name, field: MIN_TEMPERATURE / 10})
    assert getattr(cls.model_validate({"name": name, field: MIN_TEMPERATURE}), field) == MIN_TEMPERATURE
