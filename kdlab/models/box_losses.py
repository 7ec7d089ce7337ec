"""The box-regression losses of torchvision's detectors with Detectron2's smooth-L1 beta.

torchvision fixes the beta inside its code: smooth-L1 with beta 1/9 in the RPN
(`RegionProposalNetwork.compute_loss`) and in the R-CNN box head (`roi_heads.fastrcnn_loss`),
L1 in RetinaNet's head. Detectron2, and so the ReviewKD/DKD authors' detectors, use L1
(beta 0) for both R-CNN heads and smooth-L1 with beta 0.1 for RetinaNet. The three parts are
built inside torchvision's detector constructors, so `set_box_losses` gives the built parts a
subclass of their own class that changes only the box loss: same state, same state dict, same
everything else. Each loss keeps torchvision's normalisation (the sampled anchors, the sampled
proposals, each image's foreground anchors), which is Detectron2's except for RetinaNet
(docs/detection.md lists the differences).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetRegressionHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

#: torchvision's own betas (R-CNN: RPN and ROI head; RetinaNet's head is L1, beta 0).
TORCHVISION_RCNN_BETA = 1 / 9
TORCHVISION_RETINANET_BETA = 0.0


def roi_box_loss(box_regression: Tensor, labels: Tensor, regression_targets: Tensor, beta: float) -> Tensor:
    """The R-CNN box head's regression loss (`fastrcnn_loss`'s) with smooth-L1 `beta`: on each
    foreground proposal, the regression of its class; summed, over all sampled proposals.

    box_regression: (R, 4 (C + 1)); labels: (R,), 0 = background; regression_targets: (R, 4).
    """
    foreground = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(box_regression.shape[0], -1, 4)
    loss = F.smooth_l1_loss(per_class[foreground, labels[foreground]], regression_targets[foreground],
                            beta=beta, reduction="sum")
    return loss / labels.numel()


class SmoothL1RPN(RegionProposalNetwork):
    """torchvision's RPN with the box loss's smooth-L1 beta `smooth_l1_beta` (0: L1)."""

    smooth_l1_beta: float = TORCHVISION_RCNN_BETA

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        # torchvision's compute_loss, whose beta is a literal: the sampling draws the same numbers.
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(sampled_neg, dim=0))[0]], dim=0)
        labels_all, targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[positive], targets[positive], beta=self.smooth_l1_beta,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels_all[sampled])
        return objectness_loss, box_loss


class SmoothL1RoIHeads(RoIHeads):
    """torchvision's ROI heads with the box loss's smooth-L1 beta `smooth_l1_beta` (0: L1).

    torchvision computes the loss inside `forward` with a module-level function, so the
    training forward records the sampled proposals' classes and targets (its own
    `select_training_samples`) and the predictor's regression, and replaces `loss_box_reg`."""

    smooth_l1_beta: float = TORCHVISION_RCNN_BETA

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled  # (proposals, matched indices, labels, regression targets)
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        seen: dict[str, Tensor] = {}

        def keep(module, args, out) -> None:  # in training the predictor runs once, on the sampled proposals
            seen["regression"] = out[1]

        handle = self.box_predictor.register_forward_hook(keep)
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            handle.remove()
        _, _, labels, regression_targets = self._sampled
        del self._sampled
        losses["loss_box_reg"] = roi_box_loss(seen["regression"], torch.cat(labels), torch.cat(regression_targets),
                                              self.smooth_l1_beta)
        return result, losses


class SmoothL1RetinaNetRegressionHead(RetinaNetRegressionHead):
    """torchvision's RetinaNet regression head with a smooth-L1 loss of beta `smooth_l1_beta`
    (torchvision's is L1): per image summed over its foreground anchors and divided by their
    number, then averaged over the images, as torchvision does."""

    smooth_l1_beta: float = TORCHVISION_RETINANET_BETA

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        losses = []
        for target, regression, anchors_per_image, matched in zip(
                targets, head_outputs["bbox_regression"], anchors, matched_idxs):
            foreground = torch.where(matched >= 0)[0]
            wanted = self.box_coder.encode_single(target["boxes"][matched[foreground]], anchors_per_image[foreground])
            loss = F.smooth_l1_loss(regression[foreground], wanted, beta=self.smooth_l1_beta, reduction="sum")
            losses.append(loss / max(1, foreground.numel()))
        return sum(losses) / max(1, len(targets))


def _extend(module: nn.Module, cls: type[nn.Module], beta: float) -> None:
    # A subclass adding no state: re-classing the built module keeps every parameter, buffer and
    # setting torchvision's constructor gave it.
    if type(module) not in (cls, cls.__bases__[0]):
        raise TypeError(f"{type(module).__name__} is not torchvision's {cls.__bases__[0].__name__}")
    module.__class__ = cls
    module.smooth_l1_beta = float(beta)


def set_box_losses(model: nn.Module, *, rpn_beta: float | None, box_beta: float | None) -> None:
    """Set the smooth-L1 betas of a torchvision detector's box losses in place; None leaves
    torchvision's loss (and its class) untouched."""
    if hasattr(model, "rpn"):
        if rpn_beta is not None:
            _extend(model.rpn, SmoothL1RPN, rpn_beta)
        if box_beta is not None:
            _extend(model.roi_heads, SmoothL1RoIHeads, box_beta)
    elif box_beta is not None:
        _extend(model.head.regression_head, SmoothL1RetinaNetRegressionHead, box_beta)


__all__ = ["SmoothL1RPN", "SmoothL1RetinaNetRegressionHead", "SmoothL1RoIHeads", "TORCHVISION_RCNN_BETA",
           "TORCHVISION_RETINANET_BETA", "roi_box_loss", "set_box_losses"]
