"""Detectors from torchvision: Faster R-CNN, Mask R-CNN and RetinaNet with an FPN on a
ResNet-18/50/101 or MobileNetV2 backbone, and what distillation needs to see inside them.

Names (`model.name` in a config, with the `det:` prefix): `det:<family>_<backbone>_fpn`, for
example `det:fasterrcnn_resnet18_fpn`, `det:maskrcnn_resnet101_fpn`,
`det:retinanet_resnet50_fpn`, `det:fasterrcnn_mobilenet_v2_fpn` (torchvision's own naming).

`num_classes` is kdlab's: the number of object classes C. The torchvision detector is built
with C + 1 outputs, index 0 being the background, as torchvision's detectors expect.

Backbones and FPNs come from torchvision's builders (`resnet_fpn_backbone`,
`BackboneWithFPN`). Faster/Mask R-CNN read P2-P5 plus a max-pooled P6 (five 256-channel
maps, Detectron2's layout); RetinaNet reads P3-P5 plus P6/P7 (from P5 as torchvision's
RetinaNet, or from C5 as Detectron2's: `p6p7_from`). The ROI poolers, the box losses' betas and
the proposal counts are settings, torchvision's by default, Detectron2's in `configs/coco/`.
The MobileNetV2 FPN taps the last block of each stride (24, 32, 96
and 320 channels at strides 4, 8, 16, 32), as the ReviewKD/DKD authors' MobileNetV2
backbone does; torchvision's own `mobilenet_backbone` taps the first block of each stride
instead, so it is not used here.

Weights come only from local files (nothing is downloaded):

- `backbone_weights`: a torchvision ImageNet classification state dict of the backbone
  (`resnet50-*.pth`, `mobilenet_v2-*.pth`); its classifier is ignored;
- `weights` (the config's `model.weights` / `teacher.weights`): a whole torchvision detector
  state dict of exactly this architecture and class count (for example torchvision's COCO
  `fasterrcnn_resnet50_fpn` weights, with `detection.labels: category_id`, 91 outputs);
- a `kdlab train` checkpoint (`model.checkpoint` / `teacher.checkpoint`), handled by the
  engine like any other model.

Detectron2 checkpoints (the authors' teachers) do not load and kdlab ships no converter: the
networks differ, not only the key names (MSRA ResNets put the stride in the 1x1 convolution,
the input is BGR with caffe normalisation, the background class is last and box regression
is class-agnostic-per-class in another order, ROIAlign is `aligned=True`), so a renamed
state dict would not compute the same detector. Train the teacher with kdlab (the teacher
configs in `configs/coco/`) or start from torchvision's COCO weights.

`train_forward` runs torchvision's own training forward (so every loss is torchvision's) and
exposes, through temporary hooks, what the distillation methods read: the FPN outputs, the
batched input tensor, the ROI head's sampled training proposals, their matched classes and
the ROI box classifier's logits. `roi_class_logits` runs a (teacher's) ROI box head on given
proposals and FPN features.
"""
from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdlab.errors import CheckpointError, ConfigError
from kdlab.models.registry import register_prefix
from kdlab.models.weights import format_key_problems, read_state_dict
from kdlab.registry import closest

FAMILIES = ("fasterrcnn", "maskrcnn", "retinanet")
BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")
NORMS = ("frozen_bn", "bn")
PREFIX = "det"

_NAME = re.compile(r"^(?P<family>[a-z]+)_(?P<backbone>resnet\d+|mobilenet_v2)_fpn$")

#: MobileNetV2 `features` indices ending the stride-4/8/16/32 stages (24, 32, 96, 320 channels).
_MV2_TAPS = {3: 24, 6: 32, 13: 96, 17: 320}
#: MobileNetV2 `features` indices opening each of its 5 freezable stages (stem + 16-ch block first).
_MV2_STAGE_STARTS = (0, 2, 4, 7, 14)
#: Channels of each backbone's deepest stage (C5), which Detectron2's RetinaNet P6 reads.
C5_CHANNELS = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048, "mobilenet_v2": 320}
#: `model.kwargs` that are kdlab's own (the rest are torchvision's detector arguments).
KDLAB_OPTIONS = ("norm", "trainable_layers", "backbone_weights", "anchor_sizes", "representation_size",
                 "image_mean", "image_std", "fast_roi_align", "roi_aligned", "roi_sampling_ratio",
                 "rpn_smooth_l1_beta", "box_smooth_l1_beta", "p6p7_from")
#: The weight files `build_detector` reads (a checkpoint replaces what they give).
WEIGHT_FILES = ("weights", "backbone_weights")


@dataclass(frozen=True)
class DetectorSpec:
    """A parsed detector name."""

    family: str
    backbone: str

    @property
    def name(self) -> str:
        return f"{self.family}_{self.backbone}_fpn"

    @property
    def two_stage(self) -> bool:
        """Has an RPN and an ROI box classifier (Faster and Mask R-CNN)."""
        return self.family != "retinanet"

    @property
    def has_masks(self) -> bool:
        return self.family == "maskrcnn"


def detector_names() -> list[str]:
    """Every detector name (without the `det:` prefix)."""
    return [f"{f}_{b}_fpn" for f in FAMILIES for b in BACKBONES]


def parse_detector_name(name: str) -> DetectorSpec:
    """`fasterrcnn_resnet18_fpn` (with or without `det:`) -> DetectorSpec, or a ConfigError
    listing the valid names."""
    bare = name[len(PREFIX) + 1:] if name.startswith(PREFIX + ":") else name
    m = _NAME.match(bare)
    if m and m["family"] in FAMILIES and m["backbone"] in BACKBONES:
        return DetectorSpec(m["family"], m["backbone"])
    names = detector_names()
    hint = closest(bare, names)
    raise ConfigError(
        f"unknown detector {name!r}" + (f"; did you mean '{PREFIX}:{hint}'?" if hint else "")
        + f" Detector names are {PREFIX}:<family>_<backbone>_fpn with family one of {', '.join(FAMILIES)} "
        f"and backbone one of {', '.join(BACKBONES)}"
    )


def spec_of(model: nn.Module) -> DetectorSpec:
    """The spec a detector was built from (`build_detector` records it)."""
    spec = getattr(model, "kdlab_spec", None)
    if not isinstance(spec, DetectorSpec):
        raise ConfigError(
            f"{type(model).__name__} is not a kdlab detector; build detectors with a det:<name> model name"
        )
    return spec


# ---------------------------------------------------------------------------------------- building
def default_trainable_layers(spec: DetectorSpec, pretrained: bool) -> int:
    """Backbone stages trained when `trainable_layers` is not set: 3 for a pretrained ResNet
    (Detectron2's FREEZE_AT 2), else 5 (from scratch, and the authors' MobileNetV2, FREEZE_AT 0)."""
    return 3 if pretrained and spec.backbone != "mobilenet_v2" else 5


def checkpoint_options(name: str, options: dict[str, Any], weights: str | None = None) -> dict[str, Any]:
    """The `build_detector` options that rebuild, for a checkpoint holding every weight, the
    detector `options` (plus `weights`, the config's `model.weights`) built: the weight files are
    not read again, and the backbone stages they froze stay frozen (`trainable_layers` is fixed
    from them before they are dropped)."""
    spec = parse_detector_name(name)
    pretrained = bool(weights or any(options.get(k) for k in WEIGHT_FILES))
    kept = {k: v for k, v in options.items() if k not in WEIGHT_FILES}
    if kept.get("trainable_layers") is None:
        kept["trainable_layers"] = default_trainable_layers(spec, pretrained)
    return kept


def _check_head_options(spec: DetectorSpec, roi_aligned: bool, roi_sampling_ratio: int,
                        rpn_beta: float | None, box_beta: float | None, p6p7_from: str) -> None:
    if not spec.two_stage and (roi_aligned or roi_sampling_ratio != 2):
        raise ConfigError("model.kwargs.roi_aligned/roi_sampling_ratio set the R-CNN ROI poolers; RetinaNet has none")
    if roi_sampling_ratio < 0:
        raise ConfigError(f"model.kwargs.roi_sampling_ratio must be >= 0 (0: adaptive, Detectron2's), "
                          f"got {roi_sampling_ratio}")
    if not spec.two_stage and rpn_beta is not None:
        raise ConfigError("model.kwargs.rpn_smooth_l1_beta sets the R-CNN RPN's box loss; RetinaNet has no RPN "
                          "(its head's is box_smooth_l1_beta)")
    for key, beta in (("rpn_smooth_l1_beta", rpn_beta), ("box_smooth_l1_beta", box_beta)):
        if beta is not None and beta < 0:
            raise ConfigError(f"model.kwargs.{key} must be >= 0 (0 is L1), got {beta}")
    if p6p7_from not in ("p5", "c5"):
        raise ConfigError(f"model.kwargs.p6p7_from must be p5 (torchvision) or c5 (Detectron2), got {p6p7_from!r}")
    if spec.two_stage and p6p7_from != "p5":
        raise ConfigError("model.kwargs.p6p7_from sets RetinaNet's P6/P7; an R-CNN's P6 is max-pooled P5 "
                          "(in torchvision and Detectron2 alike)")


def _norm_layer(norm: str) -> Callable[..., nn.Module]:
    from torchvision.ops import FrozenBatchNorm2d  # lazy: detection-only

    if norm not in NORMS:
        raise ConfigError(f"model.kwargs.norm={norm!r} is not one of {', '.join(NORMS)}")
    return FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d


def _load_backbone_state(module: nn.Module, path: str, label: str, ignore_prefix: str) -> None:
    """Strictly load an ImageNet classification state dict into `module`, ignoring its
    classifier (`ignore_prefix`) and batch-norm counters a frozen batch norm does not keep."""
    state = read_state_dict(path)
    if all(k.startswith("net.") for k in state):
        # A `kdlab train` checkpoint of the torchvision classifier (`tv:resnet18`, ...): its
        # model state is torchvision's, prefixed by `net.` (TorchvisionClassifier).
        state = {k[len("net."):]: v for k, v in state.items()}
    own = module.state_dict()
    state = {k: v for k, v in state.items()
             if not k.startswith(ignore_prefix) and not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state and not k.startswith(ignore_prefix)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"model.kwargs.backbone_weights {path!r} does not fit the {label} backbone: "
            f"{format_key_problems(missing, unexpected, shapes)}. It must be torchvision's ImageNet state dict "
            f"of exactly that network (torchvision.models.{label}().state_dict())"
        )
    module.load_state_dict(state, strict=False)


def _p6p7(spec: DetectorSpec, source: str) -> nn.Module:
    """RetinaNet's P6/P7 block. torchvision's `LastLevelP6P7` reads P5 when its input width is
    the FPN's (256) and C5 otherwise, so the width chooses the source."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # lazy: detection-only

    return LastLevelP6P7(C5_CHANNELS[spec.backbone] if source == "c5" else 256, 256)


def _resnet_fpn(spec: DetectorSpec, norm_layer, trainable_layers: int, weights: str | None,
                p6p7_from: str) -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # lazy: detection-only

    retina = spec.family == "retinanet"
    backbone = resnet_fpn_backbone(
        backbone_name=spec.backbone, weights=None, norm_layer=norm_layer, trainable_layers=trainable_layers,
        returned_layers=[2, 3, 4] if retina else None, extra_blocks=_p6p7(spec, p6p7_from) if retina else None,
    )
    if weights:
        # IntermediateLayerGetter keeps the ResNet's own module names, minus the classifier.
        _load_backbone_state(backbone.body, weights, spec.backbone, ignore_prefix="fc.")
    return backbone


def _mobilenet_v2_fpn(spec: DetectorSpec, norm_layer, trainable_layers: int, weights: str | None,
                      p6p7_from: str) -> nn.Module:
    from torchvision.models import mobilenet_v2  # lazy: detection-only
    from torchvision.models.detection.backbone_utils import BackboneWithFPN  # lazy: detection-only
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # lazy: detection-only

    net = mobilenet_v2(weights=None, norm_layer=norm_layer)
    if weights:
        _load_backbone_state(net, weights, "mobilenet_v2", ignore_prefix="classifier.")
    features = net.features
    # Freeze the first (5 - trainable_layers) stages, as trainable_layers does for ResNets.
    if trainable_layers == 0:
        frozen_until = len(features)
    else:
        frozen_until = _MV2_STAGE_STARTS[5 - trainable_layers] if trainable_layers < 5 else 0
    for i, block in enumerate(features):
        if i < frozen_until:
            block.requires_grad_(False)
    taps = dict(_MV2_TAPS)
    extra: nn.Module = LastLevelMaxPool()
    if spec.family == "retinanet":
        taps.pop(3)  # P3-P5 (+ P6, P7)
        extra = _p6p7(spec, p6p7_from)
    return BackboneWithFPN(
        features, return_layers={str(i): str(k) for k, i in enumerate(taps)},
        in_channels_list=list(taps.values()), out_channels=256, extra_blocks=extra,
    )


def _detector_class(family: str) -> type[nn.Module]:
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet  # lazy: detection-only

    return {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet}[family]


def _tunable_options(cls: type[nn.Module]) -> list[str]:
    """The constructor keywords of a torchvision detector a config may set (RPN/ROI/NMS sizes)."""
    skip = {"self", "backbone", "num_classes", "kwargs", "min_size", "max_size", "image_mean", "image_std",
            "rpn_anchor_generator", "anchor_generator", "box_head", "box_predictor"}
    params = inspect.signature(cls.__init__).parameters
    return sorted(k for k, p in params.items() if k not in skip and p.kind is p.POSITIONAL_OR_KEYWORD)


def _anchor_generator(family: str, sizes: list[int]):
    from torchvision.models.detection.anchor_utils import AnchorGenerator  # lazy: detection-only

    if len(sizes) != 5:
        raise ConfigError(f"model.kwargs.anchor_sizes needs 5 sizes, one per FPN level, got {sizes}")
    if family == "retinanet":  # torchvision's RetinaNet: three octave scales per level
        per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
    else:
        per_level = tuple((s,) for s in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * 5)


def build_detector(
    name: str,
    num_classes: int,
    *,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    skip_train_resize: bool = False,
    norm: str = "frozen_bn",
    trainable_layers: int | None = None,
    backbone_weights: str | None = None,
    weights: str | None = None,
    anchor_sizes: list[int] | None = None,
    representation_size: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    fast_roi_align: bool = True,
    roi_aligned: bool = False,
    roi_sampling_ratio: int = 2,
    rpn_smooth_l1_beta: float | None = None,
    box_smooth_l1_beta: float | None = None,
    p6p7_from: str = "p5",
    **options: Any,
) -> nn.Module:
    """A torchvision detector (see the module docstring).

    num_classes: object classes C (the detector gets C + 1 outputs, background first).
    min_size / max_size: the detector's own resize of every input (shorter side, longer-side
        cap); with `skip_train_resize` training inputs are used at the size the data pipeline
        gave them (multi-scale training happens in the data transforms, as in torchvision's
        detection references), and only evaluation inputs are resized.
    norm: `frozen_bn` (Detectron2 and torchvision with pretrained backbones) or `bn` (batch
        statistics; for backbones trained from scratch).
    trainable_layers: backbone stages trained, 0-5; default 3 for a pretrained ResNet
        (Detectron2's FREEZE_AT 2) and 5 (everything) otherwise and for MobileNetV2 (the
        authors' FREEZE_AT 0).
    anchor_sizes: 5 base anchor sizes, one per FPN level (default 32..512; smaller for tiny
        images).
    representation_size: width of the R-CNN box head's two fully connected layers (default
        1024, torchvision's and Detectron2's); smaller makes CPU-sized experiments affordable.
    fast_roi_align: pool R-CNN ROIs on the CPU with `kdlab.models.roi_align` (the same numbers as
        torchvision's ROIAlign, about 8x faster with its backward); other devices are unaffected.
    roi_aligned, roi_sampling_ratio: the R-CNN box and mask poolers' ROIAlign: torchvision's
        `aligned=False` with 2 samples per bin side by default; Detectron2's ROIAlignV2 (the
        authors') is `aligned=True` with 0, adaptive (ceil(ROI side / bins) samples per ROI).
    rpn_smooth_l1_beta, box_smooth_l1_beta: smooth-L1 beta of the RPN's and of the final box
        regression (R-CNN ROI head, RetinaNet head); 0 is L1. None keeps torchvision's: 1/9 for
        both R-CNN heads, L1 for RetinaNet; Detectron2's are 0, 0 and 0.1.
    p6p7_from: RetinaNet's P6/P7 source, `p5` (torchvision's v1 RetinaNet, whose COCO weights
        load) or `c5` (Detectron2's, the authors').
    options: torchvision's own detector settings (`rpn_batch_size_per_image`,
        `box_batch_size_per_image`, `box_detections_per_img`, ...).
    """
    spec = parse_detector_name(name)
    if num_classes < 1:
        raise ConfigError(f"a detector needs at least one object class, got num_classes={num_classes}")
    cls = _detector_class(spec.family)
    allowed = _tunable_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = closest(unknown[0], allowed + list(KDLAB_OPTIONS))
        raise ConfigError(
            f"model.kwargs: unknown option(s) {unknown} for {spec.name}" + (f"; did you mean {hint!r}?" if hint else "")
            + f" Detector options: {', '.join(KDLAB_OPTIONS)}, {', '.join(allowed)}"
        )
    if trainable_layers is None:
        trainable_layers = default_trainable_layers(spec, pretrained=bool(backbone_weights or weights))
    if not 0 <= trainable_layers <= 5:
        raise ConfigError(f"model.kwargs.trainable_layers must be 0..5, got {trainable_layers}")
    _check_head_options(spec, roi_aligned, roi_sampling_ratio, rpn_smooth_l1_beta, box_smooth_l1_beta, p6p7_from)
    norm_layer = _norm_layer(norm)
    build = _mobilenet_v2_fpn if spec.backbone == "mobilenet_v2" else _resnet_fpn
    backbone = build(spec, norm_layer, trainable_layers, backbone_weights, p6p7_from)
    kwargs: dict[str, Any] = dict(options)
    if anchor_sizes is not None:
        kwargs["anchor_generator" if spec.family == "retinanet" else "rpn_anchor_generator"] = \
            _anchor_generator(spec.family, list(anchor_sizes))
    if representation_size is not None:
        if not spec.two_stage:
            raise ConfigError("model.kwargs.representation_size sets the R-CNN box head; RetinaNet has none")
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # lazy: detection-only

        resolution = 7  # torchvision's box ROI pooling output (7 x 7)
        kwargs["box_head"] = TwoMLPHead(backbone.out_channels * resolution**2, representation_size)
        kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes + 1)
        if spec.has_masks:  # torchvision builds it from num_classes, which it must not get now
            from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor  # lazy: detection-only

            kwargs.setdefault("mask_predictor", MaskRCNNPredictor(256, 256, num_classes + 1))
    if image_mean is not None:
        kwargs["image_mean"] = list(image_mean)
    if image_std is not None:
        kwargs["image_std"] = list(image_std)
    sizes = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
    # torchvision wants num_classes only when it builds the predictor itself.
    outputs = None if "box_predictor" in kwargs else num_classes + 1
    model = cls(backbone, num_classes=outputs, min_size=sizes, max_size=max_size,
                _skip_resize=skip_train_resize, **kwargs)
    model.kdlab_spec = spec  # read by spec_of(); a plain attribute, not state
    if spec.two_stage and (fast_roi_align or roi_aligned or roi_sampling_ratio != 2):
        from kdlab.models.roi_align import set_roi_pooling  # lazy: imports torchvision.ops

        set_roi_pooling(model, aligned=roi_aligned, sampling_ratio=roi_sampling_ratio, sparse_cpu=fast_roi_align)
    from kdlab.models.box_losses import set_box_losses  # lazy: imports torchvision's detection heads

    set_box_losses(model, rpn_beta=rpn_smooth_l1_beta, box_beta=box_smooth_l1_beta)
    if weights:
        _load_detector_state(model, weights, spec.name, num_classes)
    return model


def _load_detector_state(model: nn.Module, path: str, label: str, num_classes: int) -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        hint = ""
        if shapes and all("cls" in s or "bbox_pred" in s or "mask_fcn_logits" in s for s in shapes):
            hint = (f" Only the class-dependent layers differ: the file was trained for another number of classes "
                    f"than {num_classes} + background (torchvision's COCO weights have 91 outputs: use "
                    "detection.labels=category_id with COCO)")
        raise CheckpointError(
            f"weights {path!r} do not fit detector {label!r}: {format_key_problems(missing, unexpected, shapes)}."
            + (hint or " The file must be a torchvision state dict of exactly this detector (a Detectron2 "
               "checkpoint does not load: see docs/detection.md)")
        )
    model.load_state_dict(state, strict=False)


def _create(rest: str, num_classes: int = 1, **kwargs: Any) -> nn.Module:
    return build_detector(rest, num_classes, **kwargs)


register_prefix(PREFIX, _create)


# ---------------------------------------------------------------------------------- introspection
def num_object_classes(model: nn.Module) -> int:
    """C, the object classes a kdlab detector predicts (its outputs minus the background)."""
    if spec_of(model).two_stage:
        return int(model.roi_heads.box_predictor.cls_score.out_features) - 1
    return int(model.head.classification_head.num_classes) - 1


@torch.no_grad()
def fpn_shapes(model: nn.Module, size: int = 128) -> list[tuple[int, int, int]]:
    """(C, H, W) of every FPN output for a `size` x `size` input, shallow to deep."""
    backbone = model.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters())
        out = backbone(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        backbone.train(was_training)
    return [tuple(int(s) for s in t.shape[1:]) for t in out.values()]  # type: ignore[misc]


# ---------------------------------------------------------------------------------- training pass
@dataclass
class DetectorPass:
    """What one training forward of a detector computed and distillation reads.

    losses: torchvision's loss dict (`loss_classifier`, `loss_box_reg`, `loss_objectness`,
        `loss_rpn_box_reg`, `loss_mask`; RetinaNet: `classification`, `bbox_regression`).
    inputs: the batched, normalised, padded input tensor the backbone saw.
    features: the FPN outputs, shallow to deep (P2-P6, or P3-P7 for RetinaNet).
    image_sizes: each image's (H, W) inside `inputs`.
    proposals: the ROI head's sampled training proposals per image (two-stage only).
    proposal_labels: their matched classes, 0 = background, concatenated over images.
    class_logits: the ROI box classifier's (R, C + 1) logits for those proposals.
    """

    losses: dict[str, Tensor]
    inputs: Tensor
    features: "OrderedDict[str, Tensor]"
    image_sizes: list[tuple[int, int]]
    proposals: list[Tensor] | None = None
    proposal_labels: Tensor | None = None
    class_logits: Tensor | None = None


def train_forward(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> DetectorPass:
    """torchvision's training forward of `model` (in train mode) with its internals exposed.

    Temporary hooks record the backbone's input and output, the arguments of the ROI heads
    (the resized targets and image sizes), the proposals the box ROI pooler receives (the
    sampled training proposals: in training it runs once, on them) and the box predictor's
    output (its logits for exactly those proposals). The proposals' matched classes are
    recomputed with the ROI heads' own matcher, which labels each proposal independently of
    the others and so gives the labels torchvision's classification loss used.
    """
    seen: dict[str, Any] = {}

    def keep(key: str, pick: Callable[[Any, Any], Any], first: bool = False):
        def hook(module, args, output=None):
            if not (first and key in seen):
                seen[key] = pick(args, output)
        return hook

    handles = [
        model.backbone.register_forward_pre_hook(keep("inputs", lambda a, o: a[0])),
        model.backbone.register_forward_hook(keep("features", lambda a, o: o)),
    ]
    two_stage = hasattr(model, "roi_heads")
    if two_stage:
        heads = model.roi_heads
        handles += [
            heads.register_forward_pre_hook(keep("heads_args", lambda a, o: a)),
            heads.box_roi_pool.register_forward_pre_hook(keep("proposals", lambda a, o: a[1], first=True)),
            heads.box_predictor.register_forward_hook(keep("predictor", lambda a, o: o, first=True)),
        ]
    else:  # RetinaNet: image sizes from its anchor generator's input
        handles.append(model.anchor_generator.register_forward_pre_hook(keep("image_list", lambda a, o: a[0])))
    try:
        losses = model(images, targets)
    finally:
        for h in handles:
            h.remove()
    features = seen["features"]
    if two_stage:
        _, _, image_sizes, sized_targets = seen["heads_args"]
        proposals = seen["proposals"]
        class_logits = seen["predictor"][0]
        _, labels = heads.assign_targets_to_proposals(
            proposals, [t["boxes"] for t in sized_targets], [t["labels"] for t in sized_targets]
        )
        return DetectorPass(losses, seen["inputs"], features, list(image_sizes), proposals, torch.cat(labels),
                            class_logits)
    return DetectorPass(losses, seen["inputs"], features, list(seen["image_list"].image_sizes))


def roi_class_logits(model: nn.Module, features: "OrderedDict[str, Tensor]", proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> Tensor:
    """`model`'s ROI box classifier logits (R, C + 1) for `proposals`, pooled from `features`
    (its own FPN outputs): its box ROI pooler, box head and the predictor's class scores."""
    heads = model.roi_heads
    pooled = heads.box_roi_pool(features, proposals, image_sizes)
    logits, _ = heads.box_predictor(heads.box_head(pooled))
    return logits


__all__ = [
    "BACKBONES", "C5_CHANNELS", "DetectorPass", "DetectorSpec", "FAMILIES", "KDLAB_OPTIONS", "NORMS", "WEIGHT_FILES",
    "build_detector", "checkpoint_options", "default_trainable_layers", "detector_names",
    "fpn_shapes", "num_object_classes", "parse_detector_name", "roi_class_logits", "spec_of", "train_forward",
]
