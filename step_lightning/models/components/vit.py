"""A small Vision Transformer for 32x32 images, built on torchvision's ``VisionTransformer``."""

from __future__ import annotations

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def small_vit(num_classes: int, in_channels: int = 3, image_size: int = 32, patch_size: int = 4, depth: int = 6,
              width: int = 384, heads: int = 6, mlp_ratio: int = 4, dropout: float = 0.0) -> VisionTransformer:
    """torchvision's ViT with 4x4 patches (64 tokens + [CLS] for a 32x32 image), pre-norm blocks, GELU MLP.

    The default size (6 blocks, width 384, 6 heads, MLP 1536, ~10.7 M parameters) is ViT-S's width at
    half its depth, the usual scale for training a ViT from scratch on CIFAR. Attention is
    ``nn.MultiheadAttention``: its packed Q/K/V projection, its output projection and both MLP layers are
    the N:M targets; the patch embedding (the first layer) and the head stay dense by default.

    Raises:
        ValueError: ``image_size`` not a multiple of ``patch_size``, or ``width`` not divisible by ``heads``.
    """
    if image_size % patch_size:
        raise ValueError(f"ViT: the image size {image_size} is not a multiple of the patch size {patch_size}.")
    if width % heads:
        raise ValueError(f"ViT: the width {width} is not divisible by the number of heads {heads}.")
    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth, num_heads=heads,
                            hidden_dim=width, mlp_dim=width * mlp_ratio, dropout=dropout, num_classes=num_classes)
    if in_channels != 3:  # torchvision's patch embedding assumes RGB
        vit.conv_proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
    return vit
