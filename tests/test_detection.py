"""Detection data, batching, evaluation and detectors (issue 13): the generated shapes set,
COCO-format reading and its errors, aspect-ratio grouped batches, COCO AP against
pycocotools and by hand, and the torchvision detectors with local weights."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdlab.schema.detection import ShapesConfig
from kdlab.data.coco import CocoSplit, detection_transforms, read_annotations
from kdlab.data.coco_eval import coco_metrics, detections_to_coco
from kdlab.data.grouped import GroupedBatchSampler
from kdlab.data.shapes import CLASSES, generate_shape_classes, generate_shapes
from kdlab.errors import CheckpointError, ConfigError, DataError
from kdlab.models.detection import build_detector, fpn_shapes, num_object_classes, parse_detector_name

from detkit import TINY_SHAPES, tiny_kwargs, tiny_shapes


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes") / "set")


# ------------------------------------------------------------------------------ generated set
def test_generated_set_is_valid_coco_with_masks_matching_boxes(shapes_root):
    from pycocotools import mask as mask_util

    doc = read_annotations(shapes_root / "annotations" / "instances_train.json", masks=True, what="x")
    assert len(doc["images"]) == TINY_SHAPES.num_train
    assert [c["name"] for c in doc["categories"]] == list(CLASSES)
    assert doc["annotations"], "the generated set has objects"
    sizes = {(im["height"], im["width"]) for im in doc["images"]}
    assert sizes <= {(48, 64), (64, 48)}
    for ann in doc["annotations"]:
        rle = ann["segmentation"]
        assert np.allclose(mask_util.toBbox(rle), ann["bbox"])  # the box is the mask's extent
        assert mask_util.area(rle) == ann["area"] > 0
        assert TINY_SHAPES.min_object * 0.5 <= max(ann["bbox"][2:]) <= TINY_SHAPES.max_object


def test_generated_set_is_deterministic_and_reused(tmp_path, shapes_root):
    again = tiny_shapes(tmp_path / "again")
    for name in ("instances_train.json", "instances_val.json"):
        assert (again / "annotations" / name).read_text() == (shapes_root / "annotations" / name).read_text()
    assert (again / "train" / "000001.png").read_bytes() == (shapes_root / "train" / "000001.png").read_bytes()
    stamp = (again / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert tiny_shapes(again) == again  # same settings: reused, not rewritten
    assert (again / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other settings"):
        generate_shapes(again, TINY_SHAPES.model_copy(update={"seed": 1}))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        generate_shapes(tmp_path / "busy", TINY_SHAPES)


def test_shape_classes_are_an_image_folder_of_one_labelled_object_each(tmp_path):
    from PIL import Image

    root = generate_shape_classes(tmp_path / "classes", num_train=40, num_val=10, size=32, seed=3)
    files = {split: sorted((root / split).rglob("*.png")) for split in ("train", "val")}
    assert (len(files["train"]), len(files["val"])) == (40, 10)
    assert {p.parent.name for p in files["train"]} <= set(CLASSES)
    assert len({p.parent.name for p in files["train"]}) >= 3  # classes are drawn at random
    for path in files["train"][:5]:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (32, 32, 3)
        # One object of a colour far from the background: the image is not one flat colour.
        assert pixels.reshape(-1, 3).std(axis=0).max() > 20
    stamp = files["train"][0].stat().st_mtime_ns
    assert generate_shape_classes(root, num_train=40, num_val=10, size=32, seed=3) == root  # reused
    assert files["train"][0].stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other settings"):
        generate_shape_classes(root, num_train=40, num_val=10, size=32, seed=4)


def test_shapes_settings_are_validated():
    with pytest.raises(ValueError, match="does not fit"):
        ShapesConfig(height=48, width=64, max_object=60)
    with pytest.raises(ValueError, match="larger than"):
        ShapesConfig(min_object=30, max_object=20)


# ------------------------------------------------------------------------------ COCO reading
def test_training_split_items_carry_resized_flipped_boxes_and_masks(shapes_root):
    split = CocoSplit(shapes_root / "train", shapes_root / "annotations" / "instances_train.json", train=True,
                      masks=True, transforms=detection_transforms(True, sizes=[40, 56], max_size=200, hflip=0.5))
    assert split.num_classes == 5 and split.class_names == list(CLASSES)
    torch.manual_seed(0)
    for i in range(len(split)):
        image, target = split[i]
        assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
        h, w = image.shape[1:]
        assert min(h, w) in (40, 56)
        boxes, masks = target["boxes"], target["masks"]
        assert boxes.shape[0] == masks.shape[0] == target["labels"].shape[0] > 0
        assert masks.shape[1:] == (h, w)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((target["labels"] >= 1) & (target["labels"] <= 5)).all()
        # Each mask lies inside its (resized, possibly flipped) box, give or take a pixel.
        for box, mask in zip(boxes, masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1.5 and xs.max() <= box[2] + 0.5
            assert ys.min() >= box[1] - 1.5 and ys.max() <= box[3] + 0.5


def _coco_doc(categories=(3, 7)):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
              {"id": 3, "file_name": "c.png", "height": 20, "width": 20}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": categories[1], "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": categories[0], "bbox": [15, 5, 5, 5], "area": 25, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": categories[0], "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
    ]
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in categories]}


def _write_coco(folder, doc):
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for im in doc["images"]:
        Image.new("RGB", (im["width"], im["height"])).save(folder / "img" / im["file_name"])
    (folder / "ann.json").write_text(json.dumps(doc))
    return folder / "img", folder / "ann.json"


def test_crowd_and_empty_images_are_left_out_of_training_and_labels_map(tmp_path):
    images, ann = _write_coco(tmp_path, _coco_doc())
    train = CocoSplit(images, ann, train=True, transforms=detection_transforms(False))
    # Image 2 holds only a crowd region and image 3 nothing: Detectron2 skips both.
    assert train.ids == [1]
    _, target = train[0]
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]  # xywh -> xyxy, crowd box dropped
    assert target["labels"].tolist() == [2]  # category 7 is the second category: label 2
    assert train.label_to_category == [0, 3, 7] and train.num_classes == 2
    raw = CocoSplit(images, ann, train=True, labels="category_id", transforms=detection_transforms(False))
    assert raw[0][1]["labels"].tolist() == [7] and raw.num_classes == 7 and raw.label_to_category[7] == 7
    val = CocoSplit(images, ann, train=False, transforms=detection_transforms(False))
    assert val.ids == [1, 2, 3]  # evaluation scores every image
    assert val[2][1] == {"image_id": 3}
    assert val.aspect_ratios == [1.5, 20 / 30, 1.0]


def test_a_bad_annotation_file_is_one_clear_error(tmp_path):
    images, ann = _write_coco(tmp_path, _coco_doc())
    ann.write_text(ann.read_text()[:-20])  # truncated
    with pytest.raises(DataError, match=r"is not valid JSON \(.* at line 1, column \d+\); fix or replace"):
        CocoSplit(images, ann, train=True)
    ann.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(DataError, match="is not a COCO instances file: it has no 'annotations' list"):
        CocoSplit(images, ann, train=True)
    doc = _coco_doc()
    doc["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="annotation 1 has category 99, which is not in 'categories'"):
        CocoSplit(images, ann, train=True)
    doc = _coco_doc()
    del doc["annotations"][0]["bbox"]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="annotation #0 lacks 'bbox'"):
        CocoSplit(images, ann, train=True)
    with pytest.raises(DataError, match="does not exist; set detection.train_annotations"):
        CocoSplit(images, tmp_path / "nope.json", train=True, what=("detection.train_images",
                                                                    "detection.train_annotations"))


def test_an_image_missing_from_disk_is_one_clear_error(tmp_path):
    images, ann = _write_coco(tmp_path, _coco_doc())
    (images / "b.png").unlink()
    with pytest.raises(DataError, match=r"1 of the 3 images listed in .*ann.json' are missing from .*img' "
                                        r"\('b.png'\); put them there"):
        CocoSplit(images, ann, train=False)
    with pytest.raises(DataError, match="image folder .* does not exist"):
        CocoSplit(tmp_path / "elsewhere", ann, train=False)


def test_mask_r_cnn_needs_segmentations(tmp_path):
    images, ann = _write_coco(tmp_path, _coco_doc())
    with pytest.raises(DataError, match="lacks 'segmentation' \\(Mask R-CNN needs masks\\)"):
        CocoSplit(images, ann, train=True, masks=True)


# ------------------------------------------------------------------------------ grouped batches
def _keys(batches):
    return [k for b in batches for k in b]


@pytest.mark.parametrize("n,batch", [(23, 4), (16, 4), (5, 8)])
def test_grouped_batches_are_pure_cover_the_epoch_and_resume_exactly(n, batch):
    ratios = [1.5 if i % 3 else 0.75 for i in range(n)]
    sampler = GroupedBatchSampler(ratios, batch, seed=3)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(n / batch)
    assert sorted(i for _, i in _keys(batches)) == list(range(n))  # every image once
    assert all(e == 2 for e, _ in _keys(batches))
    # Only the epoch's last batch (what is left of both orientations, when it fits in one) mixes.
    mixed = [k for k, b in enumerate(batches) if len({ratios[i] >= 1 for _, i in b}) > 1]
    assert mixed in ([], [len(batches) - 1])
    assert sum(len(b) < batch for b in batches) <= 2
    for k in range(len(batches)):  # resuming after k batches yields exactly the rest
        sampler.set_epoch(2, k * batch)
        assert list(sampler) == batches[k:] and len(sampler) == len(batches) - k
    sampler.set_epoch(2)
    assert list(sampler) == batches  # a function of (seed, epoch)
    sampler.set_epoch(3)
    assert list(sampler) != batches


def test_grouped_batches_shard_ranks_with_equal_batch_counts():
    ratios = [0.5 if i % 4 == 0 else 2.0 for i in range(30)]
    ranks = [GroupedBatchSampler(ratios, 4, seed=0, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 4  # ceil(15 / 4): no rank waits
    seen = [set(i for _, i in _keys(p)) for p in parts]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(30))


# ------------------------------------------------------------------------------ COCO AP
def _eval_gt(tmp_path):
    from pycocotools import mask as mask_util

    def rect_rle(h, w, x, y, bw, bh):
        m = np.zeros((h, w), dtype=np.uint8)
        m[y:y + bh, x:x + bw] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        return {"size": rle["size"], "counts": rle["counts"].decode()}

    images = [{"id": 1, "file_name": "1.png", "height": 100, "width": 100},
              {"id": 2, "file_name": "2.png", "height": 100, "width": 100}]
    boxes = [(1, 3, [10, 10, 40, 40]), (1, 7, [60, 60, 30, 30]), (2, 3, [0, 0, 20, 20])]
    anns = [{"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0,
             "segmentation": rect_rle(100, 100, *b)} for k, (im, c, b) in enumerate(boxes)]
    doc = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    return path


def _detector_outputs():
    # Image 1: an exact box of category 3 (label 1) and a category-7 box shifted 6 pixels
    # (IoU 24*30 / (2*900 - 24*30) = 2/3); image 2: nothing found.
    masks = torch.zeros(2, 1, 100, 100)
    masks[0, 0, 10:50, 10:50] = 0.9
    masks[1, 0, 60:90, 66:96] = 0.8
    out1 = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [66.0, 60.0, 96.0, 90.0]]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]), "masks": masks}
    out2 = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, 1, 100, 100)}
    return [out1, out2]


def test_coco_ap_matches_pycocotools_and_hand_computed_values(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib, io

    gt_path = _eval_gt(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
    records = detections_to_coco(_detector_outputs(), [1, 2], [0, 3, 7], masks=True)
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in records] == [
        (1, 3, [10.0, 10.0, 40.0, 40.0], pytest.approx(0.9)), (1, 7, [66.0, 60.0, 30.0, 30.0], pytest.approx(0.8))]
    metrics = coco_metrics(coco, records, ("bbox", "segm"))

    # Directly with pycocotools, from a results file written by hand.
    hand = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 7, "bbox": [66, 60, 30, 30], "score": 0.8}]
    (tmp_path / "dt.json").write_text(json.dumps(hand))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    direct = [v * 100 if v >= 0 else math.nan for v in ev.stats[:6]]
    ours = [metrics[f"bbox_{k}"] for k in ("ap", "ap50", "ap75", "aps", "apm", "apl")]
    np.testing.assert_allclose(ours, direct, rtol=0, atol=1e-9)

    # By hand (101-point interpolated precision). Category 3: 2 objects, 1 found at every
    # IoU -> AP 51/101. Category 7: found at IoU 2/3, i.e. at thresholds .50-.65 (4 of 10).
    half = 51 / 101
    assert metrics["bbox_ap"] == pytest.approx(100 * (10 * half + 4) / 20)
    assert metrics["bbox_ap50"] == pytest.approx(100 * (half + 1) / 2)
    assert metrics["bbox_ap75"] == pytest.approx(100 * half / 2)
    # Small (< 32^2): category 3's small object is missed (0); category 7's 30x30 object is
    # found at 4 thresholds (0.4). Medium: category 3's 40x40 object found everywhere; the
    # 7 has no medium object. Large: no object at all (NaN, COCOeval's -1).
    assert metrics["bbox_aps"] == pytest.approx(100 * 0.2)
    assert metrics["bbox_apm"] == pytest.approx(100.0)
    assert math.isnan(metrics["bbox_apl"])
    # The masks are the boxes' rectangles, so mask AP equals box AP here.
    for k in ("ap", "ap50", "ap75", "aps", "apm"):
        assert metrics[f"segm_{k}"] == pytest.approx(metrics[f"bbox_{k}"])


def test_coco_ap_without_detections_is_zero_where_there_are_objects_and_undefined_where_none(tmp_path):
    from pycocotools.coco import COCO
    import contextlib, io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(_eval_gt(tmp_path)))
    for iou_type in ("bbox", "segm"):
        metrics = coco_metrics(coco, [], (iou_type,))
        # small and medium objects exist and none is found: 0; there is no large object: undefined
        assert {k: metrics[f"{iou_type}_{k}"] for k in ("ap", "ap50", "ap75", "aps", "apm")} == dict.fromkeys(
            ("ap", "ap50", "ap75", "aps", "apm"), 0.0)
        assert math.isnan(metrics[f"{iou_type}_apl"])


# ------------------------------------------------------------------------------ detectors
def test_detector_names_parse_with_suggestions():
    spec = parse_detector_name("det:maskrcnn_mobilenet_v2_fpn")
    assert (spec.family, spec.backbone, spec.two_stage, spec.has_masks) == ("maskrcnn", "mobilenet_v2", True, True)
    assert not parse_detector_name("retinanet_resnet50_fpn").two_stage
    with pytest.raises(ConfigError, match="did you mean 'det:fasterrcnn_resnet18_fpn'"):
        parse_detector_name("det:fasterrcnn_resnet18")
    with pytest.raises(ConfigError, match="backbone one of resnet18, resnet50, resnet101, mobilenet_v2"):
        parse_detector_name("det:fasterrcnn_vgg16_fpn")


@pytest.mark.parametrize("name,levels", [
    ("fasterrcnn_resnet18_fpn", [16, 8, 4, 2, 1]),
    ("fasterrcnn_resnet50_fpn", [16, 8, 4, 2, 1]),
    ("fasterrcnn_mobilenet_v2_fpn", [16, 8, 4, 2, 1]),
    ("retinanet_resnet101_fpn", [8, 4, 2, 1, 1]),
])
def test_detectors_have_five_256_channel_fpn_levels(name, levels):
    model = build_detector(name, 3, **tiny_kwargs(name.split("_")[0]))
    shapes = fpn_shapes(model, size=64)
    assert [c for c, _, _ in shapes] == [256] * 5
    assert [w for _, _, w in shapes] == levels  # P2-P6 (strides 4-64), RetinaNet P3-P7
    assert num_object_classes(model) == 3


def test_mobilenet_v2_fpn_taps_the_last_block_of_each_stride():
    model = build_detector("fasterrcnn_mobilenet_v2_fpn", 2, **tiny_kwargs("fasterrcnn"))
    body = model.backbone.body
    assert dict(body.return_layers) == {"3": "0", "6": "1", "13": "2", "17": "3"}
    assert [b.in_channels for b in model.backbone.fpn.inner_blocks.modules() if isinstance(b, torch.nn.Conv2d)] \
        == [24, 32, 96, 320]


def test_backbone_and_detector_weights_load_only_from_fitting_local_files(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = build_detector("fasterrcnn_resnet18_fpn", 3, backbone_weights=str(tmp_path / "r18.pth"))
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(body.bn1.running_var, ref.bn1.running_var)  # frozen batch norm, ImageNet statistics
    # Pretrained ResNets train their last three stages (Detectron2's FREEZE_AT 2).
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad
    with pytest.raises(CheckpointError, match="does not fit the resnet50 backbone"):
        build_detector("fasterrcnn_resnet50_fpn", 3, backbone_weights=str(tmp_path / "r18.pth"))

    torch.save(model.state_dict(), tmp_path / "det.pth")
    again = build_detector("fasterrcnn_resnet18_fpn", 3, weights=str(tmp_path / "det.pth"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(CheckpointError, match="Only the class-dependent layers differ"):
        build_detector("fasterrcnn_resnet18_fpn", 5, weights=str(tmp_path / "det.pth"))


def test_a_kdlab_checkpoint_of_the_torchvision_classifier_is_a_backbone_file(tmp_path):
    """`kdlab train` a `tv:resnet18` / `tv:mobilenet_v2` classifier, then detect from its
    backbone (the detection demo's pretraining): the checkpoint's `net.`-prefixed state loads."""
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.models import create_model

    for name, body_of in (("resnet18", lambda m: m.backbone.body.layer3[0].conv1.weight),
                          ("mobilenet_v2", lambda m: m.backbone.body["13"].conv[0][0].weight)):
        classifier = create_model(f"tv:{name}", num_classes=5)
        Checkpoint.for_model(classifier, f"tv:{name}", 5).save(tmp_path / f"{name}.pt")
        model = build_detector(f"fasterrcnn_{name}_fpn", 3, norm="bn", backbone_weights=str(tmp_path / f"{name}.pt"))
        source = dict(classifier.named_parameters())
        want = source["net.layer3.0.conv1.weight" if name == "resnet18" else "net.features.13.conv.0.0.weight"]
        assert torch.equal(body_of(model), want)
    with pytest.raises(CheckpointError, match="does not fit the mobilenet_v2 backbone"):
        build_detector("fasterrcnn_mobilenet_v2_fpn", 3, norm="bn", backbone_weights=str(tmp_path / "resnet18.pt"))
    # torchvision's own MobileNetV2 file (its 1000-way classifier is ignored; it used to be
    # reported missing, so no MobileNetV2 ImageNet file loaded).
    import torchvision

    ref = torchvision.models.mobilenet_v2(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mv2.pth")
    model = build_detector("fasterrcnn_mobilenet_v2_fpn", 3, norm="bn", backbone_weights=str(tmp_path / "mv2.pth"))
    assert torch.equal(model.backbone.body["13"].conv[0][0].weight, ref.features[13].conv[0][0].weight)


def test_unknown_detector_options_are_named():
    with pytest.raises(ConfigError, match="unknown option.*'box_batch_size'.*did you mean 'box_batch_size_per_image'"):
        build_detector("fasterrcnn_resnet18_fpn", 3, box_batch_size=8)
    with pytest.raises(ConfigError, match="trainable_layers must be 0..5"):
        build_detector("fasterrcnn_resnet18_fpn", 3, trainable_layers=7)
