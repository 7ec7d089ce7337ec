"""The batch norm behind each stage's pre-activation, for methods that read its affine parameters.

OFD (Heo et al., ICCV 2019) derives a margin per channel from the batch norm whose output feeds the
ReLU that ends each teacher stage. `bn_before_relu(model)` returns those modules, one per entry of
`Features.preact_stages` and in the same order, as the reference model code's `get_bn_before_relu`
does (mdistiller `models/cifar/*.py`, `models/imagenet/*.py`; clovaai/overhaul-distillation):

    CIFAR ResNets, ResNet18/34/50, tv:resnet*  the last block of each stage: bn2 (basic), bn3 (bottleneck),
                                               the residual branch's last BN, before the sum and ReLU
    VGG                                        the last BN of block1..block4
    WRN                                        the BN that consumes each stage (block2/block3's first bn1,
                                               the final bn1)
    MobileNetV2                                the pw-linear BN of each stage's last block
    MobileNetV1                                the BN before each stage's last ReLU

Read-only: nothing is changed or wrapped. Families the references do not cover (ShuffleNets, whose
stage ends in a concatenation with an earlier ReLU output; DenseNet; other tv:/timm:/py: models)
are a ConfigError naming the model.
"""
from __future__ import annotations

from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.torchvision_models import TorchvisionClassifier
from kdlab.models.zoo.mobilenetv1 import _STAGE_ENDS, MobileNetV1Model
from kdlab.models.zoo.mobilenetv2 import MobileNetV2Model
from kdlab.models.zoo.resnet import ResNet
from kdlab.models.zoo.resnet_cifar import CifarResNet
from kdlab.models.zoo.vgg import VGG
from kdlab.models.zoo.wrn import WideResNet

#: MobileNetV2's stages end at these block groups (its `forward_features`).
_MOBILENETV2_STAGE_ENDS = (1, 2, 4, 6)
_KNOWN = ("the CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4), ResNet18/34/50, VGG, WRN, "
          "MobileNetV2, MobileNetV1 and torchvision ResNets (tv:resnet*, tv:resnext*, tv:wide_resnet*)")


def _residual_branch_bn(block: nn.Module) -> nn.Module:
    """The last BN of a ResNet block's residual branch: bn3 of a bottleneck, else bn2."""
    return block.get_submodule("bn3") if hasattr(block, "bn3") else block.get_submodule("bn2")


def _torchvision_bns(model: TorchvisionClassifier) -> list[nn.Module]:
    if model.nodes is None:
        raise _unknown(model, "it has no stage features")
    bns = []
    for pre in model.nodes.pre:
        block_name, _, op = pre.rpartition(".")
        block = model.net.get_submodule(block_name) if block_name else None
        if not (op.startswith("add") and block is not None and hasattr(block, "bn2")):
            raise _unknown(model, f"its stage pre-activation {pre!r} is not a ResNet block's residual sum")
        bns.append(_residual_branch_bn(block))
    return bns


def _unknown(model: nn.Module, why: str) -> ConfigError:
    name = getattr(model, "label", None) or type(model).__name__
    return ConfigError(
        f"kdlab does not know the batch norm before each stage's ReLU of model {name} ({why}); "
        f"it is known for {_KNOWN}: use a teacher of one of those families"
    )


def bn_before_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The batch norm whose output feeds (through a residual sum, for ResNets) the final activation of
    each of `model`'s stages, one per `Features.preact_stages` entry, shallow to deep. ConfigError for
    a model family kdlab does not know it for."""
    if isinstance(model, (CifarResNet, ResNet)):
        layers = [model.layer1, model.layer2, model.layer3] + ([model.layer4] if isinstance(model, ResNet) else [])
        bns = [_residual_branch_bn(layer[-1]) for layer in layers]
    elif isinstance(model, VGG):
        bns = [model.block1[-1], model.block2[-1], model.block3[-1], model.block4[-1]]
    elif isinstance(model, WideResNet):
        bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
    elif isinstance(model, MobileNetV2Model):
        bns = [model.blocks[i][-1].conv[-1] for i in _MOBILENETV2_STAGE_ENDS]
    elif isinstance(model, MobileNetV1Model):
        bns = [model.model[i][-2] for i in _STAGE_ENDS]
    elif isinstance(model, TorchvisionClassifier):
        bns = _torchvision_bns(model)
    else:
        raise _unknown(model, f"family {type(model).__name__}")
    if not all(isinstance(bn, nn.BatchNorm2d) for bn in bns):  # a family whose layout changed
        raise _unknown(model, "a module where its batch norm was expected is not one")
    return bns  # type: ignore[return-value]


__all__ = ["bn_before_relu"]
