"""MobileNetV1 for ImageNet (the DKD / ReviewKD ImageNet student, mdistiller
`imagenet/mobilenetv1.py`): 13 depthwise-separable blocks, 1024-d pooled feature.

`model` is a Sequential of 14 conv blocks (each ends with BN + ReLU) and the pooling at
index 14 (adaptive here, so any input that survives the /32 down-sampling works).
Module names follow the reference, so its checkpoints load with `load_state_dict`.

Features (mdistiller `feats` / `preact_feats`, the last block at each resolution):
    stem          model[0](x) = relu(bn(conv3x3/2(x)))                 (32, 112, 112)
    stages        relu outputs of model[3], model[5], model[11], model[13]
                  (128@56, 256@28, 512@14, 1024@7 for a 224x224 input)
    preact_stages the same blocks' final BN output, before that ReLU
    raw_stages    = stages (the ReLU belongs to the block; mdistiller's `feats`)
    pooled        global average of model[13]'s output (1024), fed to `fc`
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdlab.models.features import FeatureClassifier, Features
from kdlab.models.registry import register_model

#: (in, out, stride) of the depthwise-separable blocks model[1..13]
_DW = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
       (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
       (512, 1024, 2), (1024, 1024, 1)]
_STAGE_ENDS = (3, 5, 11, 13)


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class MobileNetV1Model(FeatureClassifier):
    default_input_size = (3, 224, 224)

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.model = nn.Sequential(
            _conv_bn(3, 32, 2), *[_conv_dw(i, o, s) for i, o, s in _DW], nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(1024, num_classes)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, x: Tensor) -> tuple[Tensor, Features]:
        stem = self.model[0](x)
        out = stem
        stages, preacts = [], []
        start = 1
        for end in _STAGE_ENDS:
            for i in range(start, end):
                out = self.model[i](out)
            block = self.model[end]
            for j in range(len(block) - 1):  # the stage's last block, without its ReLU
                out = block[j](out)
            preacts.append(out)
            out = F.relu(out)
            stages.append(out)
            start = end + 1
        pooled = self.model[14](out).flatten(1)
        logits = self.fc(pooled)
        return logits, Features(stages, preacts, pooled, stem)


@register_model
def MobileNetV1(num_classes: int = 1000, **kwargs) -> MobileNetV1Model:
    return MobileNetV1Model(num_classes=num_classes, **kwargs)
