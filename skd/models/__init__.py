"""The nets of the seed papers that timm lacks, as timm models (the CIFAR nets and ShuffleNetV2);
importing this package registers them.

``timm.create_model("resnet32x4_cifar", num_classes=100)`` and friends.
"""
from skd.models.bottleneck_resnet import Bottleneck
from skd.models.densenet import CifarDenseNet
from skd.models.postact_resnet import BasicBlock
from skd.models.preact_resnet import PreActResNet
from skd.models.pyramidnet import PyramidNet, ShakeDrop
from skd.models.repdistiller import VGG, CifarResNet, WideResNet
from skd.models.resnext import CifarResNeXt
from skd.models.shufflenet import ShuffleNetV2

CIFAR_MODELS = (
    "preact_resnet18_cifar", "resnet101_cifar", "densenet121_cifar", "resnext29_8x64d_cifar",
    "pyramidnet200_cifar", "pyramidnet200_shakedrop_cifar", "resnet18_cifar", "resnet50_cifar",
    "resnet8_cifar", "resnet8x4_cifar", "resnet32x4_cifar", "resnet20_cifar", "resnet32_cifar", "resnet56_cifar",
    "resnet110_cifar", "wrn_16_2_cifar", "wrn_40_1_cifar", "wrn_40_2_cifar",
    "vgg8_cifar", "vgg13_cifar",
)
"""The CIFAR nets this package registers with timm."""

IMAGENET_MODELS = ("shufflenet_v2_x1_0",)
"""The ImageNet nets this package registers with timm (those timm lacks)."""

__all__ = ["CIFAR_MODELS", "IMAGENET_MODELS", "ShuffleNetV2", "PreActResNet", "BasicBlock", "Bottleneck",
           "CifarDenseNet", "CifarResNeXt",
           "PyramidNet", "ShakeDrop", "CifarResNet", "WideResNet", "VGG"]
