"""Detectron2's behaviour as settings of kdlab's torchvision detectors (docs/detection.md), each
against a literal computation: aligned, adaptively sampled ROIAlign against torchvision's
`roi_align(aligned=True, sampling_ratio=0)`; the box losses against the L1 and smooth-L1
formulas; proposal counts, detections per image and the P6/P7 source reaching torchvision's
modules; no weight decay on normalisation layers; a `model.checkpoint` student keeping its
frozen stages; and the COCO configs carrying the authors' values."""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.detection.retinanet import RetinaNetRegressionHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from kdlab.config import load_config
from kdlab.schema.experiment import ModelConfig, OptimConfig
from kdlab.engine.optim import build_optimizer
from kdlab.errors import ConfigError
from kdlab.models.box_losses import SmoothL1RetinaNetRegressionHead, SmoothL1RoIHeads, SmoothL1RPN, roi_box_loss
from kdlab.models.detection import build_detector, checkpoint_options
from kdlab.models.roi_align import FastMultiScaleRoIAlign, multilevel_roi_align, per_level_roi_align
from test_roi_align import IMAGE, NAMES, fpn_maps

SCALES = [2.0 ** -(i + 2) for i in range(4)]
#: CPU-sized detectors that keep the 64 x 80 test images at their size.
SMALL = {"norm": "bn", "representation_size": 32, "anchor_sizes": [8, 16, 32, 64, 128], "min_size": 64, "max_size": 80}
SMALL_RETINA = {"anchor_sizes": [8, 16, 32, 64, 128], "min_size": 64, "max_size": 80}
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ ROIAlign
def random_boxes(batch: int, per_image: int, seed: int) -> list[torch.Tensor]:
    """Boxes of every size, partly outside the image, some long and thin (many samples per bin)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(per_image, 2, generator=g, dtype=torch.float64) * torch.tensor([IMAGE[1], IMAGE[0]]) * 1.2 - 6
        wh = torch.rand(per_image, 2, generator=g, dtype=torch.float64) ** 2 * torch.tensor([110.0, 90.0])
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def torchvision_pooling(maps, boxes, size, ratio):
    """The literal computation: torchvision's level of each box (its LevelMapper, canonical 224 at
    level 4, levels 2-5), then `torchvision.ops.roi_align(aligned=True)` on that level."""
    levels = LevelMapper(2, 5)(boxes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype), b], 1) for i, b in enumerate(boxes)])
    out = []
    for r in range(len(rois)):
        feature = list(maps.values())[int(levels[r])]
        out.append(roi_align(feature, rois[r:r + 1], size, spatial_scale=SCALES[int(levels[r])],
                             sampling_ratio=ratio, aligned=True))
    return torch.cat(out)


def values_and_grads(pool, maps, boxes, weights):
    out = pool(maps, boxes)
    grads = torch.autograd.grad((out * weights).sum(), list(maps.values()), allow_unused=True)
    return out, [torch.zeros_like(m) if g is None else g for g, m in zip(grads, maps.values())]


def assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), per_image=st.integers(1, 10), seed=st.integers(0, 10_000),
       size=st.sampled_from([7, 14]), ratio=st.sampled_from([0, 0, 2]))
def test_aligned_roi_align_equals_torchvisions_kernel_in_values_and_gradients(batch, per_image, seed, size, ratio):
    maps = fpn_maps(batch, 4, seed)
    boxes = random_boxes(batch, per_image, seed + 1)
    weights = torch.randn(batch * per_image, 4, size, size, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    ref = values_and_grads(lambda m, b: torchvision_pooling(m, b, size, ratio), maps, boxes, weights)
    for sparse in (True, False):  # the CPU's sparse product and the per-level path GPUs take
        pool = FastMultiScaleRoIAlign(NAMES, size, ratio, aligned=True, sparse_cpu=sparse)
        assert_same(values_and_grads(lambda m, b: pool(m, b, [IMAGE] * batch), maps, boxes, weights), ref)


def test_adaptive_sampling_covers_degenerate_inverted_and_outside_boxes():
    """On explicit levels, one ROI at a time against torchvision's kernel: boxes of zero width or
    height (aligned: no sample, zero), inverted ones, boxes outside or across the image, and boxes
    long enough to need dozens of samples per bin along one side only."""
    maps = fpn_maps(2, 3, 7)
    features = list(maps.values())
    boxes = torch.tensor([[0.0, 0.0, 80.0, 64.0], [79.0, 63.0, 80.0, 64.0], [-30.0, -30.0, -10.0, -10.0],
                          [70.0, 50.0, 200.0, 300.0], [10.0, 10.0, 10.0, 10.0], [5.5, 5.5, 6.0, 40.0],
                          [30.0, 20.0, 10.0, 5.0], [0.0, 30.0, 80.0, 30.5], [2.0, 0.0, 3.0, 64.0],
                          [-5.0, 12.3, 85.2, 13.1], [1.0, 1.0, 1.2, 1.2]], dtype=torch.float64)
    rois = torch.cat([torch.tensor([[0.0], [1.0]], dtype=torch.float64).repeat(len(boxes), 1),
                      boxes.repeat_interleave(2, 0)], 1)
    levels = torch.arange(len(rois)) % 4
    weights = torch.randn(len(rois), 3, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def reference(m, _):
        return torch.cat([roi_align(features[int(lv)], rois[r:r + 1], 7, spatial_scale=SCALES[int(lv)],
                                    sampling_ratio=0, aligned=True) for r, lv in enumerate(levels)])

    ref = values_and_grads(reference, maps, None, weights)
    assert (ref[0][8:10] == 0).all() and (ref[0][12:14] == 0).all()  # zero-size and inverted boxes: nothing
    for pool in (multilevel_roi_align, per_level_roi_align):
        got = values_and_grads(lambda m, _: pool(features, rois, levels, SCALES, (7, 7), 0, aligned=True),
                               maps, None, weights)
        assert_same(got, ref)


def test_aligned_pooling_in_float32_and_under_bf16_autocast():
    maps = OrderedDict((k, v.detach().float()) for k, v in fpn_maps(2, 5, 3).items())
    boxes = [b.float() for b in random_boxes(2, 15, 4)]
    got = FastMultiScaleRoIAlign(NAMES, 7, 0, aligned=True)(maps, boxes, [IMAGE] * 2)
    ref = FastMultiScaleRoIAlign(NAMES, 7, 0, aligned=True, sparse_cpu=False)(maps, boxes, [IMAGE] * 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    half = OrderedDict((k, v.to(torch.bfloat16)) for k, v in maps.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FastMultiScaleRoIAlign(NAMES, 7, 0, aligned=True)(half, [b.to(torch.bfloat16) for b in boxes],
                                                                [IMAGE] * 2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_detectors_pool_as_configured_and_retinanet_refuses_roi_options():
    mask = build_detector("maskrcnn_resnet18_fpn", 3, roi_aligned=True, roi_sampling_ratio=0, **SMALL)
    plain = build_detector("maskrcnn_resnet18_fpn", 3, roi_aligned=True, roi_sampling_ratio=0, fast_roi_align=False,
                           **SMALL)
    for model, sparse in ((mask, True), (plain, False)):
        for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            assert type(pool) is FastMultiScaleRoIAlign
            assert (pool.aligned, pool.sampling_ratio, pool.sparse_cpu) == (True, 0, sparse)
    default = build_detector("fasterrcnn_resnet18_fpn", 3, fast_roi_align=False, **SMALL).roi_heads.box_roi_pool
    assert type(default) is MultiScaleRoIAlign and default.sampling_ratio == 2  # torchvision's own
    with pytest.raises(ConfigError, match="RetinaNet has none"):
        build_detector("retinanet_resnet18_fpn", 3, roi_aligned=True)
    with pytest.raises(ConfigError, match="roi_sampling_ratio must be >= 0"):
        build_detector("fasterrcnn_resnet18_fpn", 3, roi_sampling_ratio=-1)


# ------------------------------------------------------------------------------ box losses
@functools.cache
def _rpn(beta: float) -> RegionProposalNetwork:
    return build_detector("fasterrcnn_resnet18_fpn", 3, rpn_smooth_l1_beta=beta, **SMALL).rpn


@functools.cache
def _retinanet_head(beta: float) -> RetinaNetRegressionHead:
    return build_detector("retinanet_resnet18_fpn", 3, box_smooth_l1_beta=beta, **SMALL_RETINA).head.regression_head


def smooth_l1(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The formula, element-wise: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta; |x| at beta 0."""
    a = x.abs()
    return a if beta == 0 else torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.0, 1 / 9, 0.1, 1.0]))
def test_rpn_box_loss_is_the_smooth_l1_formula_over_the_sampled_anchors(seed, beta):
    g = torch.Generator().manual_seed(seed)
    # Fewer than 256 labelled anchors and 128 positives per image: the sampler keeps them all.
    labels = [torch.randint(-1, 2, (60,), generator=g).double() for _ in range(2)]
    targets = [torch.randn(60, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    deltas = torch.randn(120, 4, generator=g, dtype=torch.float64)
    objectness = torch.randn(120, 1, generator=g, dtype=torch.float64)
    rpn = _rpn(beta)
    assert type(rpn) is SmoothL1RPN
    obj_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    y, t = torch.cat(labels), torch.cat(targets)
    pos, sampled = y == 1, y >= 0
    expected_box = smooth_l1(deltas[pos] - t[pos], beta).sum() / sampled.sum()
    p = torch.sigmoid(objectness.flatten()[sampled])
    expected_obj = -(y[sampled] * p.log() + (1 - y[sampled]) * (1 - p).log()).mean()
    torch.testing.assert_close(box_loss, expected_box, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(obj_loss, expected_obj, rtol=1e-12, atol=1e-12)
    # torchvision's own loss is the same computation at its beta of 1/9.
    if beta == 1 / 9:
        torch.manual_seed(0)
        theirs = RegionProposalNetwork.compute_loss(rpn, objectness, deltas, labels, targets)
        torch.testing.assert_close(torch.stack(theirs), torch.stack([obj_loss, box_loss]), rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.0, 1 / 9, 0.5]))
def test_roi_box_loss_is_the_formula_on_each_foreground_proposals_class(seed, beta):
    g = torch.Generator().manual_seed(seed)
    n, classes = 40, 5
    labels = torch.randint(0, classes + 1, (n,), generator=g)
    regression = torch.randn(n, 4 * (classes + 1), generator=g, dtype=torch.float64)
    targets = torch.randn(n, 4, generator=g, dtype=torch.float64)
    expected = sum(smooth_l1(regression[i, 4 * labels[i]:4 * labels[i] + 4] - targets[i], beta).sum()
                   for i in range(n) if labels[i] > 0) / n
    torch.testing.assert_close(roi_box_loss(regression, labels, targets, beta), torch.as_tensor(expected),
                               rtol=1e-12, atol=1e-12)


def _images_and_targets(masks: bool = False):
    images = [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = []
    for _ in images:
        t = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [40.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([1, 2])}
        if masks:
            t["masks"] = torch.zeros(2, 64, 80, dtype=torch.uint8)
            t["masks"][:, 10:30, 10:30] = 1
        targets.append(t)
    return images, targets


def _seeded_losses(model, masks=False):
    torch.manual_seed(0)
    return model(*_images_and_targets(masks))


def _floats(losses: dict) -> dict:
    return {k: v.item() for k, v in losses.items()}


def test_the_detectors_roi_box_loss_is_l1_on_their_sampled_proposals_the_rest_unchanged():
    ref = build_detector("maskrcnn_resnet18_fpn", 3, **SMALL)
    l1 = build_detector("maskrcnn_resnet18_fpn", 3, box_smooth_l1_beta=0.0, **SMALL)
    same = build_detector("maskrcnn_resnet18_fpn", 3, box_smooth_l1_beta=1 / 9, **SMALL)
    l1.load_state_dict(ref.state_dict()), same.load_state_dict(ref.state_dict())
    assert type(ref.roi_heads) is RoIHeads and type(l1.roi_heads) is SmoothL1RoIHeads
    for m in (ref, l1, same):
        m.train()
    seen = {}
    sample = l1.roi_heads.select_training_samples

    def keep_samples(proposals, targets):
        seen["sampled"] = sample(proposals, targets)
        return seen["sampled"]

    l1.roi_heads.select_training_samples = keep_samples
    l1.roi_heads.box_predictor.register_forward_hook(lambda m, a, out: seen.__setitem__("regression", out[1]))
    base, ours, again = _seeded_losses(ref, True), _seeded_losses(l1, True), _seeded_losses(same, True)
    assert _floats(again) == _floats(base)  # beta 1/9: torchvision's fastrcnn_loss exactly
    assert {k: v for k, v in _floats(ours).items() if k != "loss_box_reg"} == \
        {k: v for k, v in _floats(base).items() if k != "loss_box_reg"}
    _, _, labels, targets = seen["sampled"]
    labels, targets = torch.cat(labels), torch.cat(targets)
    per_class = seen["regression"].reshape(len(labels), -1, 4)
    fg = torch.where(labels > 0)[0]
    expected = (per_class[fg, labels[fg]] - targets[fg]).abs().sum() / len(labels)
    assert ours["loss_box_reg"].item() == pytest.approx(expected.item(), rel=1e-6)
    ours["loss_box_reg"].backward()  # the replaced loss still trains the box predictor
    assert l1.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def encode(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box-regression targets with weights (1, 1, 1, 1), written out (Girshick et al., R-CNN)."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], 1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.0, 0.1, 1.0]))
def test_retinanet_box_loss_is_smooth_l1_per_foreground_anchor_averaged_over_images(seed, beta):
    g = torch.Generator().manual_seed(seed)
    head = _retinanet_head(beta)
    assert type(head) is SmoothL1RetinaNetRegressionHead
    targets, anchors, matched, regression = [], [], [], []
    for _ in range(3):
        xy = torch.rand(30, 2, generator=g, dtype=torch.float64) * 50
        anchors.append(torch.cat([xy, xy + 4 + torch.rand(30, 2, generator=g, dtype=torch.float64) * 30], 1))
        gxy = torch.rand(4, 2, generator=g, dtype=torch.float64) * 50
        targets.append({"boxes": torch.cat([gxy, gxy + 4 + torch.rand(4, 2, generator=g, dtype=torch.float64) * 30],
                                           1)})
        matched.append(torch.randint(-2, 4, (30,), generator=g))
        regression.append(torch.randn(30, 4, generator=g, dtype=torch.float64))
    matched[2] = torch.full((30,), -1)  # an image without a foreground anchor counts, with 0
    loss = head.compute_loss(targets, {"bbox_regression": torch.stack(regression)}, anchors, matched)
    per_image = []
    for t, a, m, r in zip(targets, anchors, matched, regression):
        fg = m >= 0
        diff = r[fg] - encode(t["boxes"][m[fg]], a[fg])
        per_image.append(smooth_l1(diff, beta).sum() / max(1, int(fg.sum())))
    torch.testing.assert_close(loss, sum(per_image) / 3, rtol=1e-10, atol=1e-12)
    if beta == 0.0:  # torchvision's own head is L1
        theirs = RetinaNetRegressionHead.compute_loss(head, targets, {"bbox_regression": torch.stack(regression)},
                                                      anchors, matched)
        torch.testing.assert_close(loss, theirs, rtol=1e-12, atol=1e-12)


def test_box_loss_options_are_checked():
    with pytest.raises(ConfigError, match="RetinaNet has no RPN"):
        build_detector("retinanet_resnet18_fpn", 3, rpn_smooth_l1_beta=0.0)
    with pytest.raises(ConfigError, match="box_smooth_l1_beta must be >= 0"):
        build_detector("fasterrcnn_resnet18_fpn", 3, box_smooth_l1_beta=-0.1)
    untouched = build_detector("fasterrcnn_resnet18_fpn", 3, **SMALL)
    assert type(untouched.rpn) is RegionProposalNetwork and type(untouched.roi_heads) is RoIHeads


# ------------------------------------------------------------------------------ counts and P6/P7
def test_proposal_counts_and_detections_per_image_reach_torchvisions_modules():
    model = build_detector("fasterrcnn_resnet18_fpn", 3, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=40,
                           rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=7, box_detections_per_img=3,
                           box_score_thresh=0.0, **SMALL)
    assert model.rpn._pre_nms_top_n == {"training": 300, "testing": 200}
    assert model.rpn._post_nms_top_n == {"training": 40, "testing": 7}
    assert model.roi_heads.detections_per_img == 3
    counts = []
    model.roi_heads.register_forward_pre_hook(lambda m, args: counts.append([len(p) for p in args[1]]))
    model.eval()
    with torch.no_grad():
        out = model(_images_and_targets()[0])
    assert max(counts[-1]) <= 7 and all(len(o["boxes"]) <= 3 for o in out)
    model.train()
    _seeded_losses(model)
    assert max(counts[-1]) <= 40 and max(counts[-1]) > 7
    retina = build_detector("retinanet_resnet18_fpn", 3, detections_per_img=4, topk_candidates=50, score_thresh=0.0,
                            **SMALL_RETINA)
    assert (retina.detections_per_img, retina.topk_candidates) == (4, 50)
    retina.eval()
    with torch.no_grad():
        assert [len(o["boxes"]) for o in retina(_images_and_targets()[0])] == [4, 4]


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_retinanet_p6_reads_c5_or_p5_as_configured(backbone):
    x = torch.rand(1, 3, 64, 64)
    for source in ("c5", "p5"):
        fpn = build_detector(f"retinanet_{backbone}_fpn", 3, p6p7_from=source).backbone.eval()
        with torch.no_grad():
            c5 = list(fpn.body(x).values())[-1]
            out = list(fpn(x).values())  # P3, P4, P5, P6, P7
            extra = fpn.fpn.extra_blocks
            torch.testing.assert_close(out[3], extra.p6(c5 if source == "c5" else out[2]))
            torch.testing.assert_close(out[4], extra.p7(F.relu(out[3])))
    with pytest.raises(ConfigError, match="max-pooled P5"):
        build_detector("fasterrcnn_resnet18_fpn", 3, p6p7_from="c5")


# ------------------------------------------------------------------------------ norm weight decay
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.frozen = nn.BatchNorm2d(4).requires_grad_(False)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def test_norm_weight_decay_puts_exactly_the_norm_layers_parameters_in_a_group_of_that_decay():
    net = Net()
    norm = [net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias, net.block[1].weight, net.block[1].bias]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = build_optimizer(params, OptimConfig(lr=0.1, weight_decay=0.01, norm_weight_decay=0.0), net)
    assert opt.defaults["fused"]  # the fused step, with both groups
    (other, norms) = opt.param_groups
    assert [id(p) for p in norms["params"]] == [id(p) for p in norm] and norms["weight_decay"] == 0.0
    assert {id(p) for p in other["params"]} == {id(p) for p in params} - {id(p) for p in norm}
    assert other["weight_decay"] == 0.01
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # with zero gradients only the decay moves a parameter: p - lr * wd * p
    for p, b in zip(params, before):
        decay = 0.0 if any(p is q for q in norm) else 0.01
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * decay))
    single = build_optimizer(params, OptimConfig(weight_decay=0.01), net)
    assert len(single.param_groups) == 1 and single.defaults["fused"]
    with pytest.raises(ValueError, match="needs the model"):
        build_optimizer(params, OptimConfig(weight_decay=0.01, norm_weight_decay=0.0))


def test_the_detection_distillers_optimizer_spares_the_abf_batch_norms():
    from kdlab.engine.step import TrainStep
    from kdlab.methods import method_class

    student = build_detector("fasterrcnn_resnet18_fpn", 3, **{**SMALL, "norm": "frozen_bn"})
    teacher = build_detector("fasterrcnn_resnet18_fpn", 3, **{**SMALL, "norm": "frozen_bn"})
    cls = method_class("det_reviewkd")
    distiller = cls(student, teacher, cls.Config())
    step = TrainStep.for_distiller(distiller, OptimConfig(lr=0.01, weight_decay=1e-4, norm_weight_decay=0.0),
                                   torch.device("cpu"))
    bn = [p for m in distiller.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn and [id(p) for p in step.optimizer.param_groups[1]["params"]] == [id(p) for p in bn]
    assert not any(p is q for p in step.optimizer.param_groups[0]["params"] for q in bn)


# ------------------------------------------------------------------------------ checkpoints
def test_a_student_from_a_checkpoint_keeps_the_stages_its_weight_files_froze(tmp_path):
    from torchvision.models import resnet18

    from kdlab.schema.detection import DetectionConfig
    from kdlab.engine.checkpoint import Checkpoint
    from kdlab.engine.tasks.detection import DetectionTask

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)
    kwargs = {"representation_size": 32, "norm": "frozen_bn", "backbone_weights": str(weights)}
    model = build_detector("fasterrcnn_resnet18_fpn", 3, **kwargs)
    Checkpoint.for_model(model, "det:fasterrcnn_resnet18_fpn", 3, kwargs).save(tmp_path / "last.pt")
    weights.unlink()  # not read again: the checkpoint holds every weight
    mcfg = ModelConfig(name="det:fasterrcnn_resnet18_fpn", checkpoint=str(tmp_path / "last.pt"), kwargs=kwargs)
    rebuilt = DetectionTask()._network(mcfg, "model", 3, DetectionConfig())
    trainable = {n.split(".")[0] for n, p in rebuilt.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # Detectron2's FREEZE_AT 2, as when it was built
    assert checkpoint_options("det:fasterrcnn_mobilenet_v2_fpn", {"backbone_weights": "x"}) == {"trainable_layers": 5}
    assert checkpoint_options("det:fasterrcnn_resnet50_fpn", {}, weights="w.pth") == {"trainable_layers": 3}
    assert checkpoint_options("det:fasterrcnn_resnet50_fpn", {"trainable_layers": 1, "weights": "w"}) == \
        {"trainable_layers": 1}


# ------------------------------------------------------------------------------ the COCO configs
RCNN = {"roi_aligned": True, "roi_sampling_ratio": 0, "rpn_smooth_l1_beta": 0.0, "box_smooth_l1_beta": 0.0,
        "rpn_pre_nms_top_n_train": 2000, "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_test": 1000, "rpn_nms_thresh": 0.7, "rpn_fg_iou_thresh": 0.7, "rpn_bg_iou_thresh": 0.3,
        "rpn_batch_size_per_image": 256, "rpn_positive_fraction": 0.5, "box_batch_size_per_image": 512,
        "box_positive_fraction": 0.25, "box_fg_iou_thresh": 0.5, "box_bg_iou_thresh": 0.5, "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5, "box_detections_per_img": 100}
RETINANET = {"p6p7_from": "c5", "box_smooth_l1_beta": 0.1, "detections_per_img": 100, "topk_candidates": 1000,
             "score_thresh": 0.05, "nms_thresh": 0.5, "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4}
#: ReviewKD's per-pair loss weights (mdistiller detection/configs, ReviewKD Detection/configs).
REVIEWKD_WEIGHTS = {("fasterrcnn", "resnet101", "resnet18"): 1.2, ("fasterrcnn", "resnet101", "resnet50"): 1.0,
                    ("fasterrcnn", "resnet50", "mobilenet_v2"): 2.0, ("maskrcnn", "resnet101", "resnet18"): 1.5,
                    ("maskrcnn", "resnet101", "resnet50"): 0.8, ("maskrcnn", "resnet50", "mobilenet_v2"): 1.0,
                    ("retinanet", "resnet101", "resnet50"): 1.0}


def test_the_coco_configs_carry_the_authors_values():
    configs = sorted(p for p in (ROOT / "configs" / "coco").glob("*/*.yaml") if p.parent.name != "_base")
    assert len(configs) == 28
    for path in configs:
        cfg = load_config(path)
        family, backbone = cfg.model.name.split(":")[1].split("_", 1)
        teacher = path.parent.name == "teachers"
        retina = family == "retinanet"
        # Detectron2's 3x recipe for the teachers (RetinaNet at half the rate); the students' 180k at batch 8.
        assert cfg.data.batch_size == (16 if teacher else 8), path
        assert cfg.optim.lr == (0.02 if teacher else 0.01) / (2 if retina else 1), path
        assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 1e-4), path
        assert cfg.optim.norm_weight_decay == 0.0 and not cfg.optim.nesterov, path
        assert cfg.train.iterations == (270000 if teacher else 180000), path
        assert cfg.schedule.milestones == ([210000, 250000] if teacher else [120000, 160000]), path
        assert (cfg.schedule.unit, cfg.schedule.gamma, cfg.schedule.warmup_iterations,
                cfg.schedule.warmup_start_factor) == ("iteration", 0.1, 1000, 0.001), path
        det = cfg.detection
        assert (det.train_sizes, det.test_size, det.max_size, det.hflip) == \
            ([640, 672, 704, 736, 768, 800], 800, 1333, 0.5), path
        kwargs = cfg.model.kwargs
        assert {k: kwargs[k] for k in (RETINANET if retina else RCNN)} == (RETINANET if retina else RCNN), path
        assert kwargs["norm"] == "frozen_bn" and kwargs["backbone_weights"].startswith("pretrained/"), path
        if cfg.teacher is not None:  # the final checkpoint of the teacher config of that name
            teacher_cfg = load_config(path.parents[1] / "teachers" / f"{cfg.teacher.name.split(':')[1]}.yaml")
            assert cfg.teacher.checkpoint == f"runs/{teacher_cfg.name}/last.pt", path
        method = cfg.method.name
        if "dkd" in method:
            assert (cfg.method.alpha, cfg.method.beta, cfg.method.temperature) == (1.0, 0.25, 1.0), path
        if "reviewkd" in method:
            t = cfg.teacher.name.split(":")[1].split("_")[1]
            assert cfg.method.weight == REVIEWKD_WEIGHTS[(family, t, backbone.removesuffix("_fpn"))], path
            assert cfg.method.mid_channels == 256, path


@pytest.mark.parametrize("config", ["students/fasterrcnn_mobilenet_v2_fpn.yaml",
                                    "students/retinanet_resnet50_fpn.yaml"])
def test_a_coco_configs_detector_has_the_authors_settings(config):
    cfg = load_config(ROOT / "configs" / "coco" / config)
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "backbone_weights"}
    model = build_detector(cfg.model.name.split(":")[1], 80, **kwargs)
    if "retinanet" in config:
        assert model.detections_per_img == 100 and model.head.regression_head.smooth_l1_beta == 0.1
        assert model.backbone.fpn.extra_blocks.p6.in_channels == 2048  # C5
        return
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn.smooth_l1_beta == 0.0 and model.roi_heads.smooth_l1_beta == 0.0
    pool = model.roi_heads.box_roi_pool
    assert pool.aligned and pool.sampling_ratio == 0 and model.roi_heads.detections_per_img == 100
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # the authors' MV2: FREEZE_AT 0
    assert math.isclose(model.roi_heads.fg_bg_sampler.positive_fraction, 0.25)
