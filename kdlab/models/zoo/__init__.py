"""The built-in model zoo. Importing this package registers every family's constructors.

Each module holds one architecture family of the KD benchmarks (RepDistiller / CRD /
mdistiller) and documents which tensors it returns as stages and pre-activations.
"""
from kdlab.models.zoo import (  # noqa: F401
    densenet,
    mobilenetv1,
    mobilenetv2,
    resnet,
    resnet_cifar,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
