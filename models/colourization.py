"""The three image-colourization CNNs of the seed write-up (CSC2516 PA2, Parts A-C)."""

from __future__ import annotations

import torch
from torch import nn


def same_padding(kernel: int) -> int:
    """Return the Conv2d padding the write-up uses for stride-1 'same' convolutions: kernel // 2."""
    return kernel // 2


def halving_padding(kernel: int) -> tuple[int, int]:
    """Return (padding, output_padding) so a stride-2 Conv2d halves and ConvTranspose2d doubles.

    This is the write-up's Part B.4 table (K=3: 1/1, K=4: 1/0, K=5: 2/1), for any kernel.
    """
    padding = (kernel - 1) // 2
    output_padding = 2 + 2 * padding - kernel
    return padding, output_padding


def conv_pool_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Return the write-up's down block: 'same' conv, 2x2 max-pool, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=same_padding(kernel)),
        nn.MaxPool2d(kernel_size=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def conv_upsample_block(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    """Return the write-up's up block: 'same' conv, 2x nearest upsampling, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=same_padding(kernel)),
        nn.Upsample(scale_factor=2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class PoolUpsampleNet(nn.Module):
    """Part A: max-pooling down to H/4, nearest upsampling back to H."""

    def __init__(self, kernel: int, num_filters: int, num_colours: int, num_in_channels: int):
        super().__init__()
        self.block0 = conv_pool_block(num_in_channels, num_filters, kernel)
        self.block1 = conv_pool_block(num_filters, 2 * num_filters, kernel)
        self.block2 = conv_upsample_block(2 * num_filters, num_filters, kernel)
        self.block3 = conv_upsample_block(num_filters, num_colours, kernel)
        self.block4 = nn.Sequential(
            nn.Conv2d(num_colours, num_colours, kernel_size=kernel, padding=same_padding(kernel)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block0, self.block1, self.block2, self.block3, self.block4):
            x = block(x)
        return x


class ConvTransposeNet(nn.Module):
    """Part B: stride-2 convolutions down to H/4, transposed convolutions back to H."""

    def __init__(self, kernel: int, num_filters: int, num_colours: int, num_in_channels: int):
        super().__init__()
        stride = 2
        padding, output_padding = halving_padding(kernel)
        self.block0 = nn.Sequential(
            nn.Conv2d(num_in_channels, num_filters, kernel, stride=stride, padding=padding),
            nn.BatchNorm2d(num_filters),
            nn.ReLU(),
        )
        self.block1 = nn.Sequential(
            nn.Conv2d(num_filters, 2 * num_filters, kernel, stride=stride, padding=padding),
            nn.BatchNorm2d(2 * num_filters),
            nn.ReLU(),
        )
        self.block2 = nn.Sequential(
            nn.ConvTranspose2d(
                2 * num_filters,
                num_filters,
                kernel,
                stride=stride,
                padding=padding,
                output_padding=output_padding,
            ),
            nn.BatchNorm2d(num_filters),
            nn.ReLU(),
        )
        self.block3 = nn.Sequential(
            nn.ConvTranspose2d(
                num_filters,
                num_colours,
                kernel,
                stride=stride,
                padding=padding,
                output_padding=output_padding,
            ),
            nn.BatchNorm2d(num_colours),
            nn.ReLU(),
        )
        self.block4 = nn.Sequential(
            # 'same' keeps H for even kernels too (PyTorch pads asymmetrically there).
            nn.Conv2d(num_colours, num_colours, kernel, padding="same"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.block0, self.block1, self.block2, self.block3, self.block4):
            x = block(x)
        return x


class UNet(nn.Module):
    """Part C: PoolUpsampleNet with two skip connections joined by channel concatenation."""

    def __init__(self, kernel: int, num_filters: int, num_colours: int, num_in_channels: int):
        super().__init__()
        self.block0 = conv_pool_block(num_in_channels, num_filters, kernel)
        self.block1 = conv_pool_block(num_filters, 2 * num_filters, kernel)
        self.block2 = conv_upsample_block(2 * num_filters, num_filters, kernel)
        self.block3 = conv_upsample_block(num_filters + num_filters, num_colours, kernel)
        self.block4 = nn.Sequential(
            nn.Conv2d(num_colours + num_in_channels, num_colours, kernel_size=kernel,
                      padding=same_padding(kernel)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_input = x
        x = self.block0(x)
        x_1 = x
        x = self.block1(x)
        x = self.block2(x)
        x = torch.cat((x_1, x), dim=1)
        x = self.block3(x)
        x = torch.cat((x_input, x), dim=1)
        return self.block4(x)
