"""A small CNN for tiny images (the quickstart's 8x8 digits)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(in -> w) -> conv(w -> 2w) -> pool -> conv(2w -> 2w) -> global pool -> linear(2w -> 4w) -> head.

    Every layer but the stem (it sees the raw ``in_channels``) and the head has a reduction size that
    divides by 16, so N:M up to 1:16 applies to the rest.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs of the classifier head.
        width: channels of the first conv; a multiple of 16.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if width % 16:
            raise ValueError(f"SmallCNN `width` must be a multiple of 16 (so N:M up to 1:16 applies), got {width}.")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                                    nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(2 * width, 4 * width), nn.ReLU())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.block2(self.block1(self.stem(x)))))
