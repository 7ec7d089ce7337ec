"""Detection distillation (issue 13): every method trains a step on every detector family on
tiny generated data, the ROI-logit terms equal kdlab's KD/DKD losses on the very logits the
detectors produce, teacher/student mismatches are clear errors, and the engine trains and
evaluates a detector end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.config import load_config, validate_config
from kdlab.engine.distributed import DistInfo
from kdlab.engine.tasks.detection import DetectionTask
from kdlab.errors import CheckpointError, ConfigError
from kdlab.losses import dkd_loss, kd_loss
from kdlab.methods import method_class
from kdlab.methods.base import Batch
from kdlab.models.detection import build_detector, roi_class_logits, train_forward

from detkit import model_kwargs, tiny_config, tiny_kwargs, tiny_shapes, toy_batch

FAMILIES = ("fasterrcnn", "maskrcnn", "retinanet")
METHODS = ("det_vanilla", "det_kd", "det_dkd", "det_reviewkd", "det_reviewkd_dkd")
ROI_METHODS = ("det_kd", "det_dkd", "det_reviewkd_dkd")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("shapes") / "set")


@pytest.fixture(scope="module")
def batches(shapes_root, tmp_path_factory):
    """One real training batch per family (masks only for Mask R-CNN), through the task's
    own data pipeline: generated set -> COCO loader -> grouped sampler -> to_batch."""
    task = DetectionTask()
    out = {}
    for family in FAMILIES:
        cfg = validate_config(tiny_config(tmp_path_factory.mktemp("runs"), shapes_root,
                                          model={"name": f"det:{family}_mobilenet_v2_fpn"}))
        data = task.build_data(cfg)
        loader = task.train_loader(data, cfg, batch_size=2, device=torch.device("cpu"), dist=DistInfo())
        loader.sampler.set_epoch(1)
        out[family] = task.to_batch(next(iter(loader)), torch.device("cpu"))
    return out


def _pair(family: str, classes: int = 5):
    torch.manual_seed(0)
    student = build_detector(f"{family}_mobilenet_v2_fpn", classes, **tiny_kwargs(family))
    teacher = build_detector(f"{family}_resnet18_fpn", classes, **tiny_kwargs(family))
    return student, teacher


CASES = [(f, m) for f in FAMILIES for m in METHODS if not (f == "retinanet" and m in ROI_METHODS)]


@pytest.mark.parametrize("family,method", CASES)
def test_every_method_trains_a_step_on_every_detector_family(family, method, batches):
    batch = batches[family]
    assert isinstance(batch.images, list) and batch.targets[0]["boxes"].dtype == torch.float32
    assert ("masks" in batch.targets[0]) == (family == "maskrcnn")
    student, teacher = _pair(family)
    cls = method_class(method)
    distiller = cls(student, teacher if cls.requires_teacher else None, cls.Config(), num_classes=5)
    distiller.train()
    before = {k: v.clone() for k, v in distiller.state_dict().items()}
    opt = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01, momentum=0.9)
    out = distiller(batch, 1)
    own = {"fasterrcnn": {"classifier", "box_reg", "objectness", "rpn_box_reg"},
           "maskrcnn": {"classifier", "box_reg", "objectness", "rpn_box_reg", "mask"},
           "retinanet": {"classification", "bbox_regression"}}[family]
    extra = {"det_vanilla": set(), "det_kd": {"kd"}, "det_dkd": {"tckd", "nckd"}, "det_reviewkd": {"reviewkd"},
             "det_reviewkd_dkd": {"tckd", "nckd", "reviewkd"}}[method]
    assert set(out.losses) == own | extra and out.logits is None
    loss = sum(out.losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = distiller.state_dict()
    assert not torch.equal(after["student.backbone.fpn.layer_blocks.0.0.weight"],
                           before["student.backbone.fpn.layer_blocks.0.0.weight"])
    teacher_keys = [k for k in after if k.startswith("teacher.")]
    assert all(torch.equal(after[k], before[k]) for k in teacher_keys)  # frozen, batch norm included
    if cls.requires_teacher:
        assert not distiller.teacher.training and teacher_keys
    if "reviewkd" in method:
        assert set(distiller.extra_state_dict()) and all(k.startswith("abfs.") for k in distiller.extra_state_dict())


def test_roi_kd_and_dkd_equal_the_classification_losses_on_the_detectors_logits():
    """The ROI terms are kd_loss / dkd_loss of the student's sampled-proposal logits and the
    teacher's ROI head on those same proposals, pooled from the teacher's own features;
    the targets are the proposals' matched classes, background included."""
    images, targets = toy_batch()
    student, teacher = _pair("fasterrcnn", classes=3)
    for method, cfg in (("det_dkd", {"alpha": 1.0, "beta": 0.25, "temperature": 1.0}),
                        ("det_kd", {"temperature": 2.0, "weight": 0.7})):
        cls = method_class(method)
        distiller = cls(student, teacher, cls.Config(**cfg))
        distiller.train()
        torch.manual_seed(7)  # the ROI sampler draws proposals at random: same draws twice
        out = distiller(Batch(images, targets), 1)
        torch.manual_seed(7)
        ref = train_forward(student, images, targets)
        with torch.no_grad():
            t_logits = roi_class_logits(teacher, teacher.backbone(ref.inputs), ref.proposals, ref.image_sizes)
        labels = ref.proposal_labels
        assert labels.min() == 0 and labels.max() > 0  # background and objects both present
        # The recomputed matches are the labels torchvision's own classification loss used.
        assert torch.nn.functional.cross_entropy(ref.class_logits, labels).item() == \
            pytest.approx(out.losses["classifier"].item(), rel=1e-6)
        assert ref.class_logits.shape == t_logits.shape == (labels.numel(), 4)  # C + 1 = 3 + background
        if method == "det_dkd":
            expected = dkd_loss(ref.class_logits, t_logits, labels, alpha=1.0, beta=0.25, temperature=1.0)
            got = out.losses["tckd"] + out.losses["nckd"]
        else:
            expected = 0.7 * kd_loss(ref.class_logits, t_logits, temperature=2.0)
            got = out.losses["kd"]
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert got.item() > 0


def test_reviewkd_fuses_the_fpn_levels_deepest_first():
    student, teacher = _pair("fasterrcnn")
    d = method_class("det_reviewkd")(student, teacher, method_class("det_reviewkd").Config(weight=1.2))
    assert d.level_names == ["p6", "p5", "p4", "p3", "p2"]
    assert d.abfs[0].att_conv is None and all(a.att_conv is not None for a in d.abfs[1:])
    images, targets = toy_batch()
    out = d(Batch(images, targets), 1)
    per_level = [out.stats[f"hcl_{n}"] for n in d.level_names]
    assert out.losses["reviewkd"].item() == pytest.approx(1.2 * sum(v.item() for v in per_level), rel=1e-6)


def test_retinanet_has_no_roi_logits_and_families_do_not_mix():
    student, teacher = _pair("retinanet")
    with pytest.raises(ConfigError, match="which RetinaNet does not have .*use det_reviewkd"):
        method_class("det_dkd")(student, teacher, method_class("det_dkd").Config())
    rcnn = build_detector("fasterrcnn_resnet18_fpn", 5, **tiny_kwargs("fasterrcnn"))
    with pytest.raises(ConfigError, match="compares FPN outputs level by level"):
        method_class("det_reviewkd")(student, rcnn, method_class("det_reviewkd").Config())


def test_a_teacher_with_another_class_count_is_one_clear_error(tmp_path, shapes_root):
    student, _ = _pair("fasterrcnn", classes=5)
    _, teacher = _pair("fasterrcnn", classes=3)
    with pytest.raises(ConfigError, match=r"the teacher \(fasterrcnn_resnet18_fpn\) predicts 3 object classes but "
                                          r"the student \(fasterrcnn_mobilenet_v2_fpn\) 5"):
        method_class("det_dkd")(student, teacher, method_class("det_dkd").Config())
    # Through the config: a teacher checkpoint trained on 3 classes, a 5-class dataset.
    from kdlab.engine.checkpoint import Checkpoint

    ckpt = tmp_path / "teacher.pt"
    Checkpoint.for_model(teacher, "det:fasterrcnn_resnet18_fpn", 3, model_kwargs("fasterrcnn")).save(ckpt)
    cfg = validate_config(tiny_config(tmp_path, shapes_root, method={"name": "det_dkd"},
                                      teacher={"name": "det:fasterrcnn_resnet18_fpn", "checkpoint": str(ckpt)}))
    task = DetectionTask()
    data = task.build_data(cfg)
    with pytest.raises(CheckpointError, match="detects 3 object classes but the dataset has 5; teacher and student "
                                              "must share the categories"):
        task.build_networks(cfg, data)


def test_detection_configs_are_refused_where_they_do_not_fit(tmp_path, shapes_root):
    with pytest.raises(ConfigError, match="only read with task: detection"):
        validate_config({"model": {"name": "resnet8"}, "detection": {"test_size": 64}})
    cfg = validate_config(tiny_config(tmp_path, shapes_root, data={"name": "digits"}))
    with pytest.raises(ConfigError, match="set data.name to one of coco, shapes"):
        DetectionTask().build_data(cfg)
    cfg = validate_config(tiny_config(tmp_path, shapes_root, model={"name": "resnet8"}))
    with pytest.raises(ConfigError, match="set model.name to a det:<detector> name"):
        DetectionTask().build_data(cfg)
    from kdlab.engine.trainer import Trainer

    with pytest.raises(ConfigError, match="method 'det_vanilla' supports \\['detection'\\], not task 'classification'"):
        Trainer(validate_config({"model": {"name": "resnet8"}, "method": {"name": "det_vanilla"},
                                 "data": {"name": "digits", "num_workers": 0}, "output_dir": str(tmp_path),
                                 "train": {"device": "cpu", "progress": False, "tensorboard": False}})).fit()


def test_engine_trains_a_teacher_then_distils_and_reports_coco_ap(tmp_path, shapes_root):
    from kdlab.engine.trainer import Trainer

    teacher_cfg = validate_config(tiny_config(
        tmp_path, shapes_root, name="teacher",
        model={"name": "det:fasterrcnn_resnet18_fpn", "kwargs": model_kwargs("fasterrcnn")}))
    teacher = Trainer(teacher_cfg).fit()
    assert teacher.primary_metric == "bbox_ap" and 0.0 <= teacher.best["bbox_ap"] <= 100.0
    cfg = validate_config(tiny_config(
        tmp_path, shapes_root, name="student", method={"name": "det_reviewkd_dkd", "weight": 1.2},
        teacher={"name": "det:fasterrcnn_resnet18_fpn", "checkpoint": str(tmp_path / "teacher" / "best.pt")},
        schedule={"name": "multistep", "unit": "iteration", "milestones": [3], "warmup_iterations": 2},
        train={"iterations": 3}))
    result = Trainer(cfg).fit()
    run = Path(result.run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1  # 3 iterations < the 4 batches of an epoch: one (partial) epoch
    row = rows[0]
    for key in ("train/reviewkd", "train/tckd", "train/nckd", "train/classifier", "stat/hcl_p2", "val/bbox_ap",
                "val/bbox_ap50", "val/bbox_aps"):
        assert key in row, key
    saved = json.loads((run / "result.json").read_text())
    assert saved["primary_metric"] == "bbox_ap" and "bbox_ap" in saved["last"] and "bbox_ap" in saved["best"]
    assert (run / "best.pt").is_file()
    # `kdlab eval` of the student's last checkpoint scores it as the trainer did (COCO AP, no teacher).
    import contextlib
    import io

    from kdlab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run / "last.pt"), "--device", "cpu"]) == 0
    scored = json.loads(out.getvalue())
    assert scored["bbox_ap"] == pytest.approx(row["val/bbox_ap"]) and scored["model"] == "det:fasterrcnn_mobilenet_v2_fpn"


COCO_CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/coco/**/*.yaml"))


def test_coco_configs_follow_the_authors_recipes():
    configs = [p for p in COCO_CONFIGS if "_base" not in p.parts]
    assert len(configs) == 28  # 5 teachers, 7 students alone, 12 Faster R-CNN + 4 ReviewKD distillations
    weights = {("fasterrcnn", "resnet101", "resnet18"): 1.2, ("fasterrcnn", "resnet101", "resnet50"): 1.0,
               ("fasterrcnn", "resnet50", "mobilenet_v2"): 2.0, ("maskrcnn", "resnet101", "resnet18"): 1.5,
               ("maskrcnn", "resnet101", "resnet50"): 0.8, ("maskrcnn", "resnet50", "mobilenet_v2"): 1.0,
               ("retinanet", "resnet101", "resnet50"): 1.0}
    seen = set()
    for path in configs:
        cfg = load_config(path)
        family = cfg.model.name.split(":")[1].split("_")[0]
        assert cfg.task == "detection" and cfg.schedule.unit == "iteration", path
        assert cfg.schedule.warmup_iterations == 1000 and cfg.schedule.warmup_start_factor == 0.001, path
        if "teachers" in path.parts:  # Detectron2's 3x schedule, the papers' teachers
            assert cfg.train.iterations == 270000 and cfg.schedule.milestones == [210000, 250000], path
            assert cfg.data.batch_size == 16 and cfg.optim.lr == (0.01 if family == "retinanet" else 0.02), path
            continue
        assert cfg.train.iterations == 180000 and cfg.schedule.milestones == [120000, 160000], path
        assert cfg.data.batch_size == 8 and cfg.optim.weight_decay == 1e-4, path
        assert cfg.optim.lr == (0.005 if family == "retinanet" else 0.01), path
        if cfg.teacher is not None:  # the teacher config it names exists and trains that teacher
            teacher_cfg = load_config(path.parents[1] / "teachers" / f"{cfg.teacher.name.split(':')[1]}.yaml")
            assert cfg.teacher.checkpoint == f"runs/{teacher_cfg.name}/last.pt", path
        assert cfg.detection.train_sizes == [640, 672, 704, 736, 768, 800] and cfg.detection.test_size == 800
        method = cfg.method.name
        if method in ("det_dkd", "det_reviewkd_dkd"):
            assert (cfg.method.alpha, cfg.method.beta, cfg.method.temperature) == (1.0, 0.25, 1.0), path
        if "reviewkd" in method:
            t = cfg.teacher.name.split(":")[1].split("_")[1]
            s = cfg.model.name.split(":")[1].split("_", 1)[1].removesuffix("_fpn")
            assert cfg.method.weight == weights[(family, t, s)], path
            seen.add((family, t, s))
    assert seen == set(weights)  # every ReviewKD pair of the authors has a config


def test_shapes_configs_and_the_detection_demo_share_their_detector_settings(tmp_path):
    from kdlab.commands._demo_detection import DETECTOR_KWARGS, STEPS, demo_configs

    shapes = Path(__file__).resolve().parents[1] / "configs" / "shapes"
    detector = yaml.safe_load((shapes / "_base" / "detector.yaml").read_text())["model"]["kwargs"]
    assert detector == DETECTOR_KWARGS
    for name in ("teacher", "student_alone", "kd", "dkd", "reviewkd", "reviewkd_dkd"):
        cfg = load_config(shapes / f"{name}.yaml")
        assert cfg.task == "detection" and cfg.data.name == "shapes" and cfg.model.kwargs == detector
    raws = demo_configs(str(tmp_path), scale=0.5, device="cpu", progress=False)
    cfgs = [validate_config(r) for r in raws]
    assert [c.train.iterations for c in cfgs] == [round(step[-1] * 0.5) for step in STEPS]
    assert cfgs[0].train.iterations > cfgs[1].train.iterations  # the teacher trains longest
    assert all(c.teacher.checkpoint == str(tmp_path / cfgs[0].name / "best.pt") for c in cfgs[2:])
    student = load_config(shapes / "dkd.yaml")
    assert [c.optim.lr for c in cfgs] == [0.02] + [student.optim.lr] * 3 and student.optim.lr == 0.01


def test_a_distillation_step_under_bf16_autocast_is_finite(batches):
    student, teacher = _pair("maskrcnn")
    cls = method_class("det_reviewkd_dkd")
    distiller = cls(student, teacher, cls.Config())
    distiller.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distiller(batches["maskrcnn"], 1)
    loss = sum(out.losses.values())
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["tckd"].dtype == torch.float32  # the distillation terms are computed in float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in distiller.trainable_parameters() if p.grad is not None)
