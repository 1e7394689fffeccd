"""ResNets with the CIFAR stem, built on torchvision's ResNet (He et al., 2016, section 4.2 stem)."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torchvision.models import resnet18, resnet50


def cifar_resnet(depth: Literal[18, 50], num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18/50 with the stem for small images: a 3x3 stride-1 conv and no max-pool.

    The ImageNet stem (7x7 stride-2 conv, then max-pool) would shrink a 32x32 image to 8x8 before the
    first block; this one keeps 32x32, as every CIFAR ResNet does. Everything after the stem is
    torchvision's (``BasicBlock``/``Bottleneck``, its initialisation), untouched.
    """
    net = (resnet18 if depth == 18 else resnet50)(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    net.maxpool = nn.Identity()
    return net
