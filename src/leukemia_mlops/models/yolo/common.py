"""Building blocks shared by the YOLO backbones, neck and head."""

from __future__ import annotations

from torch import Tensor, nn

LEAKY_SLOPE = 0.1  # Darknet's "leaky" activation


def scale_channels(channels: int, width_mult: float) -> int:
    """Channel count after ``width_mult``, at least 1 so tiny test models stay valid."""
    return max(1, round(channels * width_mult))


class ConvBNAct(nn.Module):
    """Darknet's ``[convolutional]`` with ``batch_normalize=1``: bias-free conv, BN, leaky ReLU.

    Padding is ``kernel_size // 2`` on both sides, which is what Darknet's ``pad=1`` means, so
    feature-map sizes (and loaded Darknet weights) line up with the reference network.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


ConvLayer = tuple[nn.Conv2d, nn.BatchNorm2d | None]


def conv_layers(module: nn.Module) -> list[ConvLayer]:
    """Every convolution of ``module`` in registration order, paired with its BN (or ``None``).

    The backbones register their layers in Darknet's order, so this walk is their Darknet order.
    """
    if isinstance(module, ConvBNAct):
        return [(module.conv, module.bn)]
    if isinstance(module, nn.Conv2d):
        return [(module, None)]
    return [layer for child in module.children() for layer in conv_layers(child)]
