"""ReviewKD: CE + weight * warmup(epoch) * sum_j HCL(fused_j, F_t^j) (Chen, Liu, Zhao, Jia,
"Distilling Knowledge via Knowledge Review", CVPR 2021).

Levels, deepest first: the pooled vector as a 1x1 map, then the stages from deep to
shallow. Student levels are chosen by `student_features`: `raw` (default) the stage
outputs as the reference code's CIFAR models return them (`Features.raw_stages`: the raw
block outputs f_i of a WRN, post-activation elsewhere), `preact` the pre-activation ones
(the authors' ImageNet setting), `post` the post-activation ones; teacher levels are always
pre-activation. Attention-based fusion (ABF) modules walk the student levels deepest first;
each fuses its level with the fused output of the deeper one and maps it to the teacher's
channel count; HCL compares each output with the teacher level of the same depth.

Nothing is hard-coded per pair: channel counts come from one dummy forward of each model
at construction, spatial sizes are read from the actual tensors at every step (so any
input resolution works), and when the two models have different numbers of stages the
deepest `min(S, T)` stages of each are paired, deepest with deepest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator
from torch import Tensor, nn

from kdlab.schema.experiment import MethodConfig
from kdlab.errors import ConfigError, TrainingError
from kdlab.losses import cross_entropy, hcl_level_losses
from kdlab.methods import register_method
from kdlab.methods.base import Batch, Distiller, StepOutput, warmup_factor
from kdlab.models.features import Features, StageInfo, feature_info

log = logging.getLogger(__name__)

#: Cap of the automatic middle width (reference code: min(512, deepest student channels)).
MAX_MID_CHANNELS = 512


class ReviewKDConfig(MethodConfig):
    # Defaults: the method's own defaults in the authors' code; the per-pair loss weights
    # live in configs/cifar100/reviewkd/*.yaml.
    name: Literal["reviewkd"] = "reviewkd"
    ce_weight: NonNegativeFloat = 1.0
    weight: NonNegativeFloat = 1.0  # lambda, the weight of the summed HCL
    warmup_epochs: NonNegativeInt = 20  # linear ramp of the ReviewKD term (1 on ImageNet)
    mid_channels: PositiveInt | None = None  # ABF width; null: min(512, deepest student channels)
    # Which student stage outputs the fusion reads (STUDENT_STAGES); raw: the reference's choice
    # per family on CIFAR, preact: the authors' ImageNet setting, post: after the last activation.
    student_features: Literal["raw", "preact", "post"] = "raw"

    @model_validator(mode="before")
    @classmethod
    def _legacy_student_preact(cls, data: object) -> object:
        """Configs written before `student_features` said `student_preact: true/false`; it
        keeps its meaning (true: preact, false: post, kdlab's earlier default)."""
        if not (isinstance(data, dict) and "student_preact" in data):
            return data
        data = dict(data)
        legacy = data.pop("student_preact")
        if not isinstance(legacy, bool):
            raise ValueError(f"student_preact must be true or false, got {legacy!r}; better, replace it "
                             "with student_features: raw, preact or post")
        if "student_features" in data:
            raise ValueError("give student_features only (student_preact is its older form: "
                             "true = preact, false = post); remove student_preact")
        data["student_features"] = "preact" if legacy else "post"
        return data


#: `student_features` -> the `Features` (and `FeatureInfo`) list it names.
STUDENT_STAGES = {"raw": "raw_stages", "preact": "preact_stages", "post": "stages"}


def resize_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """`x` (N, C, H, W) at spatial `size`: nearest-neighbour when enlarging (the reference
    code's choice), adaptive average pooling when shrinking in both dimensions, so a
    smaller target summarises the whole map instead of sampling every k-th pixel."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(x, size)
    if size[0] % h == 0 and size[1] % w == 0:
        # Nearest by an integer factor repeats each pixel in a block; written as a broadcast
        # copy it is about 10x faster on the CPU than interpolate's kernel, the same values.
        sh, sw = size[0] // h, size[1] // w
        n, c = x.shape[:2]
        return x[:, :, :, None, :, None].expand(n, c, h, sh, w, sw).reshape(n, c, *size)
    return F.interpolate(x, size=size, mode="nearest")


def conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution as a batched matrix product. For the attention's 2 output channels
    this is much faster than the convolution kernels on CPU (forward and backward), which
    reorder the whole wide input for a tiny output."""
    n, c, h, w = x.shape
    out = torch.bmm(weight.flatten(1).expand(n, -1, -1), x.reshape(n, c, h * w))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(n, -1, h, w)


def conv1x1_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """`bn(conv(x))` for a bias-free 1x1 `conv`, in training mode computed as one batched
    matrix product with the batch norm folded into its weights: the output's batch mean and
    (biased) variance follow from the input's, W mu and diag(W Sigma W^T), with Sigma the
    c x c covariance of the (narrower) input. The wide output is then written once and never
    normalised in a second pass, forward or backward. Values, gradients and running
    statistics equal the two modules' (tests/test_reviewkd.py); the modules themselves run
    when this does not apply (evaluation, SyncBatchNorm under DDP, autocast, one value per
    channel)."""
    n, c, h, w = x.shape
    count = n * h * w
    if (not bn.training or type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or bn.affine is False
            or conv.bias is not None or count < 2 or torch.is_autocast_enabled(x.device.type)):
        return bn(conv(x))
    weight = conv.weight.flatten(1)  # (m, c)
    flat = x.reshape(n, c, h * w)
    mean_in = flat.mean((0, 2))
    centred = flat - mean_in[:, None]
    cov = torch.bmm(centred, centred.transpose(1, 2)).sum(0) / count
    mean_out = weight @ mean_in
    var_out = ((weight @ cov) * weight).sum(1)
    scale = bn.weight * torch.rsqrt(var_out + bn.eps)
    # bn(W x) = scale * (W x - W mu) + beta = (scale W) (x - mu) + beta
    out = torch.baddbmm(bn.bias[None, :, None], (weight * scale[:, None]).expand(n, -1, -1), centred)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean_out.detach().to(bn.running_mean.dtype), momentum)
        unbiased = var_out.detach() * (count / (count - 1))
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    return out.view(n, -1, h, w)


class ABF(nn.Module):
    """Attention-based fusion ("ABF", ReviewKD paper Sec. 3) of one level.

    x = BN(conv1x1(student level)) to `mid` channels; with a deeper residual y (resized to
    x's size), two spatial attention maps a = sigmoid(conv1x1([x, y])) weight the sum
    x * a_0 + y * a_1. The result, resized to the teacher level's size, is the residual
    for the next shallower level; BN(conv3x3(.)) of it, at the teacher's channel count,
    is compared with the teacher.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        )
        # The authors' initialisation of the two feature convs.
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = conv1x1_bn(x, self.conv1[0], self.conv1[1])
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            x = self.fuse(x, residual)
        x = resize_map(x, out_size)
        return self.conv2(x), x

    def fuse(self, x: Tensor, y: Tensor) -> Tensor:
        """x * a_0 + up(y) * a_1 with a = sigmoid(conv1x1(cat[x, up(y)]))."""
        (H, W), (h, w) = x.shape[-2:], y.shape[-2:]
        if H % h or W % w:  # not an integer enlargement (or a shrink): the literal way
            y = resize_map(y, (H, W))
            a = self.att_conv(torch.cat([x, y], dim=1))
            return x * a[:, 0:1] + y * a[:, 1:2]
        # Same result without materialising the concatenation: a 1x1 conv commutes with nearest
        # upsampling, so the attention logits are conv(x, W_x) + up(conv(y, W_y)); the weighted
        # sum and its gradients are `BlockFusion`'s.
        conv, mid = self.att_conv[0], x.shape[1]
        y_logits = conv1x1(y, conv.weight[:, mid:])
        logits = conv1x1(x, conv.weight[:, :mid], conv.bias) + resize_map(y_logits, (H, W))
        a = torch.sigmoid(logits)
        return BlockFusion.apply(x, y, a)


class BlockFusion(torch.autograd.Function):
    """x * a_0 + up(y) * a_1 for y smaller than x by an integer factor (nearest upsampling),
    with a backward of plain contiguous passes: the block sums of y's gradient are a sum
    pooling and the attention gradients channel sums, instead of the reductions over strided
    (n, c, h, s, w, s) views that autograd derives from a broadcast formulation (in the CPU
    profile of a resnet32x4 -> resnet8x4 step those two reductions took 48 ms; the pooling and
    channel sums take about 24 ms). Checked against the literal computation in
    tests/test_reviewkd.py."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        up = resize_map(y, x.shape[-2:])
        out = torch.mul(x, a[:, 0:1]).addcmul_(up, a[:, 1:2])
        ctx.save_for_backward(x, up, a)
        ctx.block = (x.shape[-2] // y.shape[-2], x.shape[-1] // y.shape[-1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, up, a = ctx.saved_tensors
        grad_x = grad_y = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * a[:, 0:1]
        if ctx.needs_input_grad[1]:
            grad_y = F.avg_pool2d(grad * a[:, 1:2], ctx.block, divisor_override=1)  # block sums
        if ctx.needs_input_grad[2]:
            grad_a = torch.cat([(grad * x).sum(1, keepdim=True), (grad * up).sum(1, keepdim=True)], 1)
        return grad_x, grad_y, grad_a


@dataclass(frozen=True)
class Level:
    """One compared level: indices into the stage lists (None: the pooled vector)."""

    student_stage: int | None
    teacher_stage: int | None
    student_channels: int
    teacher_channels: int
    student_hw: tuple[int, int]
    teacher_hw: tuple[int, int]

    @property
    def name(self) -> str:
        return "pool" if self.student_stage is None else f"s{self.student_stage + 1}_t{self.teacher_stage + 1}"


def _stage_shapes(model: nn.Module, role: str, input_size: tuple[int, ...], stages: str
                  ) -> tuple[tuple[StageInfo, ...], int]:
    """(the `stages` list's shapes, shallow to deep; pooled width) of `model` by
    `feature_info`, or a ConfigError saying why ReviewKD cannot use it."""
    try:
        info = feature_info(model, input_size)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"ReviewKD needs stage features, but the {role} cannot give them: {exc}") from None
    shapes = getattr(info, stages)
    if not shapes:
        raise ConfigError(f"ReviewKD cannot pair the {role} ({type(model).__name__}): it exposes no stage "
                          "features (Features.stages is empty)")
    return shapes, info.pooled_dim


def plan_levels(student: nn.Module, teacher: nn.Module, input_size: tuple[int, ...],
                student_features: str = "raw") -> list[Level]:
    """The compared levels, deepest first: pooled with pooled, then the deepest
    min(S, T) stages of each model paired deepest with deepest."""
    s_stages, s_pool = _stage_shapes(student, "student", input_size, STUDENT_STAGES[student_features])
    t_stages, t_pool = _stage_shapes(teacher, "teacher", input_size, "preact_stages")
    n = min(len(s_stages), len(t_stages))
    levels = [Level(None, None, s_pool, t_pool, (1, 1), (1, 1))]
    for k in range(1, n + 1):
        s, t = s_stages[len(s_stages) - k], t_stages[len(t_stages) - k]
        levels.append(Level(len(s_stages) - k, len(t_stages) - k, s.channels, t.channels,
                            (s.height, s.width), (t.height, t.width)))
    return levels


@register_method("reviewkd")
class ReviewKD(Distiller):
    """Knowledge review with attention-based fusion and the hierarchical context loss."""

    Config = ReviewKDConfig
    needs_teacher_features = True

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: MethodConfig, *,
                 input_size: tuple[int, int, int] = (3, 32, 32), num_classes: int | None = None) -> None:
        super().__init__(student, teacher, cfg, input_size=input_size, num_classes=num_classes)
        c: ReviewKDConfig = cfg  # type: ignore[assignment]
        self.levels = plan_levels(student, teacher, self.input_size, c.student_features)
        self.mid_channels = c.mid_channels or min(MAX_MID_CHANNELS, self.levels[0].student_channels)
        self.abfs = nn.ModuleList(
            ABF(lv.student_channels, self.mid_channels, lv.teacher_channels, fuse=i > 0)
            for i, lv in enumerate(self.levels)
        )
        log.info("ReviewKD levels (deepest first): %s", "; ".join(self.describe_levels()))

    def describe_levels(self) -> list[str]:
        """Human-readable pairing, deepest first (input size of the construction probe)."""
        def side(stage: int | None, ch: int, hw: tuple[int, int]) -> str:
            return f"{'pooled' if stage is None else f'stage {stage + 1}'} {ch}x{hw[0]}x{hw[1]}"
        return [f"student {side(lv.student_stage, lv.student_channels, lv.student_hw)} -> "
                f"teacher {side(lv.teacher_stage, lv.teacher_channels, lv.teacher_hw)}" for lv in self.levels]

    @staticmethod
    def _select(feats: Features, stages: list[Tensor], indices: list[int | None]) -> list[Tensor]:
        pooled = feats.pooled.flatten(1)[:, :, None, None]
        return [pooled if i is None else stages[i] for i in indices]

    def fuse(self, student_levels: list[Tensor], teacher_levels: list[Tensor]) -> list[Tensor]:
        """ABF outputs, deepest first, each at its teacher level's channels and size."""
        outs, residual = [], None
        for abf, x, t in zip(self.abfs, student_levels, teacher_levels):
            out, residual = abf(x, residual, t.shape[-2:])
            outs.append(out)
        return outs

    def _student_features(self, images: Tensor) -> tuple[Tensor, Features]:
        try:
            return self.student(images, features=True)
        except ValueError as exc:
            if images.shape[0] == 1 and "Expected more than 1 value per channel" in str(exc):
                raise TrainingError(
                    "a training batch of 1 sample reached a batch-norm layer of the student whose "
                    "map is 1x1, where batch statistics are undefined; use data.batch_size >= 2 "
                    "and a training-set size that does not leave a last batch of 1"
                ) from None
            raise

    def logit_losses(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor, warm: float
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Extra logit-distillation terms (none here; `reviewkd_dkd` adds DKD's)."""
        return {}, {}

    def forward_train(self, batch: Batch, epoch: int) -> StepOutput:
        images, targets = batch.images, batch.targets
        cfg: ReviewKDConfig = self.cfg  # type: ignore[assignment]
        t_logits, t_feats = self.teacher_forward(images, features=True)
        logits, s_feats = self._student_features(images)
        s_maps = getattr(s_feats, STUDENT_STAGES[cfg.student_features])
        s_levels = self._select(s_feats, s_maps, [lv.student_stage for lv in self.levels])
        t_levels = self._select(t_feats, t_feats.preact_stages, [lv.teacher_stage for lv in self.levels])
        # One sample: batch statistics of the 1x1 pooled level are undefined (batch-norm
        # raises), so the fusion modules use their running statistics for this step.
        single = self.training and images.shape[0] == 1
        if single:
            self.abfs.eval()
        try:
            fused = self.fuse(s_levels, t_levels)
        finally:
            if single:
                self.abfs.train()
        per_level = hcl_level_losses(fused, t_levels)
        warm = warmup_factor(epoch, cfg.warmup_epochs)
        losses = {
            "ce": cfg.ce_weight * cross_entropy(logits, targets),
            "reviewkd": cfg.weight * warm * torch.stack(per_level).sum(),
        }
        # Unweighted per-level HCL, to see which depth the student matches worst.
        stats = {f"hcl_{lv.name}": v.detach() for lv, v in zip(self.levels, per_level)}
        extra_losses, extra_stats = self.logit_losses(logits, t_logits, targets, warm)
        losses.update(extra_losses)
        stats.update(extra_stats)
        return StepOutput(logits, losses, stats)


__all__ = ["ABF", "Level", "ReviewKD", "ReviewKDConfig", "STUDENT_STAGES", "conv1x1_bn", "plan_levels", "resize_map"]
