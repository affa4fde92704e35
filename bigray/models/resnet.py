"""torchvision ResNets for image classification, with an optional small-image stem.

Plain single-device torch. For 28x28/32x32 inputs the ImageNet stem (7x7 stride-2 conv + max-pool)
throws away most of the image, so ``small_input_stem`` swaps in a 3x3 stride-1 conv and no pool
(the usual CIFAR recipe).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

ARCHS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


def build_resnet(
    arch: str, num_classes: int, in_channels: int = 3, small_input_stem: bool = True, zero_init_residual: bool = False
) -> nn.Module:
    """``zero_init_residual``: each block's last BatchNorm starts at 0, so every block starts as the
    identity (Goyal et al. 2017; torchvision's option): steadier first steps at a high learning rate."""
    model = ARCHS[arch](weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if small_input_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NCHW -> normalised float, exactly as in training (serving calls this too)."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
