"""VGG-16 with BatchNorm, CIFAR-style classifier (Table 8's larger single model)."""

from __future__ import annotations

from torch import nn

from sors.models.layers import Conv2d, Normalize, default_stats
from sors.models.registry import register

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG feature stack + global average pool + linear classifier; works on 28x28 and 32x32."""

    def __init__(self, plan=_VGG16, num_classes=10, in_channels=3, width_scale=1.0, mean=None, std=None):
        super().__init__()
        layers: list[nn.Module] = [Normalize(*default_stats(in_channels, mean, std))]
        c_in = in_channels
        for item in plan:
            if item == "M":
                # ceil_mode keeps 28x28 inputs alive through five pools (28 -> 14 -> 7 -> 4 -> 2 -> 1)
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = max(1, int(item * width_scale))
            layers += [Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@register("vgg16", randomized=False)
def vgg16(num_classes=10, in_channels=3, **options):
    return VGG(_VGG16, num_classes, in_channels, **options)
