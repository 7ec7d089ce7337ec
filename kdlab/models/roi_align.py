"""ROIAlign over FPN levels as one sparse matrix product: torchvision's `MultiScaleRoIAlign`,
about 8x faster on the CPU (forward plus backward), same numbers; and Detectron2's ROIAlignV2
(`aligned=True`, adaptive sampling) on every device.

Why: torchvision's CPU `roi_align` backward scatters every sample into the feature gradient in
one serial loop; on kdlab's CPU-sized detectors it was 47% of a Faster R-CNN training step
(`benchmarks/detection_step.py`). ROIAlign is linear in the features: every output bin is a
fixed weighted sum of at most 4 x (samples per bin) feature positions (bilinear weights of the
sampling grid, averaged). Written as a sparse matrix S (one row per output bin, one column per
position of every level's flattened map), pooling is `S @ F` and its gradient `S^T @ G`, both
multithreaded library kernels, and all levels are pooled by one product instead of one call each.

The sampling follows torchvision's kernel exactly: bin grid in the ROI scaled to the level
(shifted by half a cell with `aligned=True`; with `aligned=False` a ROI is at least one cell each
way), samples outside [-1, size] contribute nothing, coordinates clamped at 0 and at size - 1, a
fixed number of samples per bin side or, with `sampling_ratio` 0, ceil(ROI side / bins) per ROI.
`tests/test_roi_align.py` and `tests/test_detectron2_settings.py` compare values and gradients
with torchvision's `roi_align` on random, degenerate and out-of-image boxes. torchvision's own
`MultiScaleRoIAlign` has no `aligned` option, so off the CPU (and with `sparse_cpu=False`) the
levels are pooled by torchvision's `roi_align`, one call per level, with it.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops._utils import convert_boxes_to_roi_format
from torchvision.ops.poolers import _filter_input, _setup_scales


def _axis_samples(start: Tensor, length: Tensor, bins: int, ratio: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Along one axis: the two neighbouring positions of every sample and their bilinear weights,
    each (R, bins, ratio, 2), zero weight for samples outside [-1, size]."""
    step = length / bins
    dtype = start.dtype
    grid = (start.view(-1, 1, 1)
            + torch.arange(bins, dtype=dtype).view(1, bins, 1) * step.view(-1, 1, 1)
            + (torch.arange(ratio, dtype=dtype).view(1, 1, ratio) + 0.5) * (step / ratio).view(-1, 1, 1))
    size = size.view(-1, 1, 1)
    valid = (grid >= -1.0) & (grid <= size)
    grid = grid.clamp(min=0)
    low = grid.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(grid), grid - low)
    weights = torch.stack([1 - frac, frac], -1) * valid.unsqueeze(-1)
    return torch.stack([low, high], -1), weights


def _grid_sizes(roi_h: Tensor, roi_w: Tensor, output_size: tuple[int, int], sampling_ratio: int
                ) -> tuple[Tensor, Tensor]:
    """Samples per bin along y and x for every ROI: the fixed ratio, or torchvision's adaptive
    ceil(ROI side / bins) (0 or less for an empty or inverted aligned ROI: no sample at all)."""
    if sampling_ratio > 0:
        fixed = torch.full(roi_h.shape, sampling_ratio, dtype=torch.long)
        return fixed, fixed
    return (roi_h / output_size[0]).ceil().long(), (roi_w / output_size[1]).ceil().long()


def multilevel_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                         output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> Tensor:
    """ROIAlign of every ROI on its own level, as one sparse product (module docstring).

    features: the levels' maps, each (B, C, H_l, W_l); rois: (R, 5) rows of (image index, x1, y1,
    x2, y2) in image coordinates; levels: (R,) the level of each ROI; scales: each level's
    feature/image size ratio; sampling_ratio: samples per bin side, 0 for adaptive. Returns
    (R, C, *output_size), like `torchvision.ops.roi_align` with the same `sampling_ratio` and
    `aligned` on each ROI's level.
    """
    if sampling_ratio < 0:
        raise ValueError(f"multilevel_roi_align needs sampling_ratio >= 0 (0: adaptive), got {sampling_ratio}")
    ph, pw = output_size
    num, channels = rois.shape[0], features[0].shape[1]
    dtype = features[0].dtype
    # The sparse kernels take float32 and float64; half-precision features are pooled in float32.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    heights = torch.tensor([f.shape[2] for f in features])
    widths = torch.tensor([f.shape[3] for f in features])
    sizes = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in features])
    offsets = torch.cumsum(sizes, 0) - sizes
    levels = levels.long().cpu()
    rois = rois.detach().to(compute).cpu()
    scale = torch.tensor(scales, dtype=compute)[levels]
    # Computed in the kernel's order (start and end shifted, then subtracted): the adaptive
    # grid's ceil() must see the very same ROI sides torchvision's does.
    shift = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - shift, rois[:, 2] * scale - shift
    roi_w, roi_h = (rois[:, 3] * scale - shift) - x1, (rois[:, 4] * scale - shift) - y1
    if not aligned:  # a ROI is at least one feature cell each way
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    grid_h, grid_w = _grid_sizes(roi_h, roi_w, output_size, sampling_ratio)
    rows, cols, vals = [], [], []
    # One vectorised pass per distinct (samples along y, samples along x); a fixed ratio is one pass.
    pairs = torch.stack([grid_h, grid_w], 1)
    for gh, gw in torch.unique(pairs[(grid_h > 0) & (grid_w > 0)], dim=0).tolist():
        idx = torch.where((grid_h == gh) & (grid_w == gw))[0]
        n, lv = idx.numel(), levels[idx]
        h, w = heights[lv], widths[lv]
        ys, wy = _axis_samples(y1[idx], roi_h[idx], ph, gh, h)  # (n, ph, gh, 2)
        xs, wx = _axis_samples(x1[idx], roi_w[idx], pw, gw, w)  # (n, pw, gw, 2)
        base = (offsets[lv] + rois[idx, 0].long() * h * w).view(n, 1, 1, 1, 1, 1, 1)
        c = base + ys.view(n, ph, 1, gh, 2, 1, 1) * w.view(n, 1, 1, 1, 1, 1, 1) + xs.view(n, 1, pw, 1, 1, gw, 2)
        vals.append((wy.view(n, ph, 1, gh, 2, 1, 1) * wx.view(n, 1, pw, 1, 1, gw, 2) / (gh * gw)).reshape(-1))
        bins = (idx.view(n, 1, 1) * (ph * pw) + torch.arange(ph * pw).view(1, ph, pw))
        rows.append(bins.view(n, ph, pw, 1, 1, 1, 1).expand_as(c).reshape(-1))
        cols.append(c.reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(cols)]) if rows else torch.zeros(2, 0, dtype=torch.long)
    values = torch.cat(vals) if vals else torch.zeros(0, dtype=compute)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_coo_tensor(indices, values, (num * ph * pw, int(sizes.sum())),
                                         check_invariants=False).coalesce().to_sparse_csr()
    # Positions as rows, channels as columns: every level flattened and stacked.
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])
    with torch.autocast("cpu", enabled=False):
        pooled = matrix @ flat.to(compute)
    return pooled.to(dtype).view(num, ph, pw, channels).permute(0, 3, 1, 2)


def per_level_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                        output_size: tuple[int, int], sampling_ratio: int, aligned: bool = False) -> Tensor:
    """The same pooling by torchvision's `roi_align`, one call per level (its own
    `MultiScaleRoIAlign` loop, with `aligned`): the path on GPUs."""
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], *output_size))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        if idx.numel():
            pooled = roi_align(feature, rois[idx], output_size=output_size, spatial_scale=scale,
                               sampling_ratio=sampling_ratio, aligned=aligned)
            result[idx] = pooled.to(result.dtype)
    return result


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """`torchvision.ops.MultiScaleRoIAlign` with Detectron2's `aligned` option and the sparse CPU
    path (module docstring; `sparse_cpu=False` keeps torchvision's per-level kernel everywhere).
    The same settings otherwise and no parameters, so checkpoints are unchanged."""

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *, aligned: bool = False,
                 sparse_cpu: bool = True, canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)
        self.aligned = aligned
        self.sparse_cpu = sparse_cpu

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = convert_boxes_to_roi_format(boxes)  # (R, 5): image index, then the box
        if rois.shape[0] == 0:
            return features[0].new_zeros((0, features[0].shape[1], *self.output_size))
        levels = self.map_levels(boxes)
        pool = multilevel_roi_align if self.sparse_cpu and features[0].device.type == "cpu" else per_level_roi_align
        return pool(features, rois, levels, self.scales, tuple(self.output_size), self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, aligned={self.aligned}, sparse_cpu={self.sparse_cpu}"


def set_roi_pooling(model: torch.nn.Module, *, aligned: bool, sampling_ratio: int, sparse_cpu: bool) -> None:
    """Give an R-CNN's box (and mask) poolers these settings, in place: torchvision's own
    `MultiScaleRoIAlign` where it computes them (`aligned=False` without the sparse path),
    `FastMultiScaleRoIAlign` otherwise."""
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        return
    for attr in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(heads, attr, None)
        if not isinstance(pool, MultiScaleRoIAlign):
            continue
        common = dict(canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
        if aligned or sparse_cpu:
            new = FastMultiScaleRoIAlign(pool.featmap_names, pool.output_size, sampling_ratio, aligned=aligned,
                                         sparse_cpu=sparse_cpu, **common)
        else:
            new = MultiScaleRoIAlign(pool.featmap_names, pool.output_size, sampling_ratio, **common)
        setattr(heads, attr, new)


__all__ = ["FastMultiScaleRoIAlign", "multilevel_roi_align", "per_level_roi_align", "set_roi_pooling"]
