"""kdlab's sparse ROIAlign (kdlab/models/roi_align.py) computes torchvision's MultiScaleRoIAlign:
the same pooled values and the same feature gradients, on random, degenerate and out-of-image
boxes, for the box (7x7) and mask (14x14) poolers."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import MultiScaleRoIAlign

from kdlab.models.detection import build_detector
from kdlab.models.roi_align import FastMultiScaleRoIAlign, multilevel_roi_align

NAMES = ["0", "1", "2", "3"]
IMAGE = (64, 80)


def fpn_maps(batch: int, channels: int, seed: int) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((n, torch.randn(batch, channels, IMAGE[0] // 2 ** (i + 2), IMAGE[1] // 2 ** (i + 2),
                                       generator=g, dtype=torch.float64).requires_grad_())
                       for i, n in enumerate(NAMES))


def random_boxes(batch: int, per_image: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(per_image, 2, generator=g, dtype=torch.float64) * torch.tensor([IMAGE[1], IMAGE[0]]) * 1.2 - 6
        wh = torch.rand(per_image, 2, generator=g, dtype=torch.float64) ** 2 * 70
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def pooled_and_grads(pool, maps, boxes, weights):
    out = pool(maps, boxes, [IMAGE] * len(boxes))
    grads = torch.autograd.grad((out * weights).sum(), list(maps.values()), allow_unused=True)
    return out, [torch.zeros_like(m) if g is None else g for g, m in zip(grads, maps.values())]


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), per_image=st.integers(1, 12), seed=st.integers(0, 10_000),
       size=st.sampled_from([7, 14]))
def test_sparse_roi_align_equals_torchvisions_values_and_gradients(batch, per_image, seed, size):
    maps = fpn_maps(batch, 5, seed)
    boxes = random_boxes(batch, per_image, seed + 1)
    reference = MultiScaleRoIAlign(NAMES, size, 2)
    fast = FastMultiScaleRoIAlign(NAMES, size, 2)
    weights = torch.randn(batch * per_image, 5, size, size, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    ref_out, ref_grads = pooled_and_grads(reference, maps, boxes, weights)
    out, grads = pooled_and_grads(fast, maps, boxes, weights)
    # In float64 both are exact up to summation order.
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_boxes_at_the_borders_and_outside_the_image_match_too():
    maps = fpn_maps(2, 3, 0)
    edge = torch.tensor([[0.0, 0.0, 80.0, 64.0], [79.0, 63.0, 80.0, 64.0], [-30.0, -30.0, -10.0, -10.0],
                         [70.0, 50.0, 200.0, 300.0], [10.0, 10.0, 10.0, 10.0], [5.5, 5.5, 6.0, 40.0]],
                        dtype=torch.float64)
    boxes = [edge, edge.flip(0)]
    weights = torch.randn(12, 3, 7, 7, dtype=torch.float64)
    ref = pooled_and_grads(MultiScaleRoIAlign(NAMES, 7, 2), maps, boxes, weights)
    got = pooled_and_grads(FastMultiScaleRoIAlign(NAMES, 7, 2), maps, boxes, weights)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_no_boxes_and_an_adaptive_sampling_ratio():
    maps = fpn_maps(2, 3, 1)
    empty = [torch.zeros(0, 4, dtype=torch.float64)] * 2
    assert FastMultiScaleRoIAlign(NAMES, 7, 2)(maps, empty, [IMAGE] * 2).shape == (0, 3, 7, 7)
    # sampling_ratio 0 (adaptive) is the sparse path too (tests/test_detectron2_settings.py)...
    boxes = random_boxes(2, 4, 3)
    torch.testing.assert_close(FastMultiScaleRoIAlign(NAMES, 7, 0)(maps, boxes, [IMAGE] * 2),
                               MultiScaleRoIAlign(NAMES, 7, 0)(maps, boxes, [IMAGE] * 2), rtol=1e-10, atol=1e-10)
    # ...and a negative ratio is refused rather than computing something else.
    with pytest.raises(ValueError, match="sampling_ratio"):
        multilevel_roi_align(list(maps.values()), torch.zeros(1, 5), torch.zeros(1), [0.25] * 4, (7, 7), -1)


def test_under_bf16_autocast_the_pooled_features_are_finite_and_keep_their_dtype():
    maps = OrderedDict((k, v.detach().to(torch.bfloat16)) for k, v in fpn_maps(1, 4, 2).items())
    boxes = [b.to(torch.bfloat16) for b in random_boxes(1, 5, 4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FastMultiScaleRoIAlign(NAMES, 7, 2)(maps, boxes, [IMAGE])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_float32_features_agree_with_torchvision_to_float32_rounding():
    maps = OrderedDict((k, v.detach().float().requires_grad_()) for k, v in fpn_maps(2, 6, 5).items())
    boxes = [b.float() for b in random_boxes(2, 20, 6)]
    weights = torch.randn(40, 6, 7, 7)
    ref = pooled_and_grads(MultiScaleRoIAlign(NAMES, 7, 2), maps, boxes, weights)
    got = pooled_and_grads(FastMultiScaleRoIAlign(NAMES, 7, 2), maps, boxes, weights)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["fasterrcnn", "maskrcnn"])
def test_r_cnn_detectors_pool_with_it_on_the_cpu_and_can_opt_out(family):
    kwargs = {"norm": "bn", "representation_size": 32, "anchor_sizes": [8, 16, 32, 64, 128]}
    fast = build_detector(f"{family}_resnet18_fpn", 3, **kwargs)
    plain = build_detector(f"{family}_resnet18_fpn", 3, fast_roi_align=False, **kwargs)
    pools = ["box_roi_pool"] + (["mask_roi_pool"] if family == "maskrcnn" else [])
    for attr in pools:
        assert type(getattr(fast.roi_heads, attr)) is FastMultiScaleRoIAlign
        assert type(getattr(plain.roi_heads, attr)) is MultiScaleRoIAlign
    # No parameters: the two load each other's state dicts.
    plain.load_state_dict(fast.state_dict())
