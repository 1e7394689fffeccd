"""A multilayer perceptron on flattened images (MNIST-sized inputs on a CPU)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """flatten -> linear(in -> w) -> ReLU -> [linear(w -> w) -> ReLU] x (depth - 1) -> linear(w -> classes).

    The recipes mask the hidden ``w x w`` layers; the first layer (it sees the raw pixels) and the head stay
    dense by default, as in every backbone.

    Args:
        in_features: inputs per example (channels x height x width of the images).
        num_classes: outputs of the classifier head.
        width: units of every hidden layer; a multiple of 16, so N:M up to 1:16 applies.
        depth: hidden layers, at least 2 (so there is a ``w x w`` layer to mask).
    """

    def __init__(self, in_features: int, num_classes: int = 10, width: int = 512, depth: int = 3) -> None:
        super().__init__()
        if width % 16:
            raise ValueError(f"MLP `width` must be a multiple of 16 (so N:M up to 1:16 applies), got {width}.")
        if depth < 2:
            raise ValueError(f"MLP `depth` must be at least 2 (a hidden width x width layer to mask), got {depth}.")
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
