"""PyTorch's output-size arithmetic, written once for integers and sympy expressions alike.

sympy is imported where a size is built, not with the module, so `convtally padding` (integer
arithmetic only) starts at once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import sympy as sp

Size = Union["sp.Expr", int]


def conv_output_size(
    size: Size, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1
) -> sp.Expr:
    """Return Conv2d/MaxPool2d's output length: floor((I + 2p - d(k-1) - 1) / s) + 1."""
    import sympy as sp

    return sp.floor(_per(stride) * (size + 2 * padding - dilation * (kernel - 1) - 1)) + 1


def _per(stride: Size) -> sp.Expr:
    """Return 1 / stride: a Rational for a number, a quotient for a size read from the input
    (timm MobileNetV5 pools with a window and stride of H // 16)."""
    import sympy as sp

    return sp.Rational(1, stride) if isinstance(stride, (int, sp.Integer)) else 1 / stride


def pool_output_size(
    size: Size,
    kernel: int,
    stride: int,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> sp.Expr:
    """Return MaxPool2d/AvgPool2d's output length, including ceil_mode's last-window rule."""
    import sympy as sp

    if not ceil_mode:
        return conv_output_size(size, kernel, stride, padding, dilation)
    if padding + stride > dilation * (kernel - 1) + 1:
        # PyTorch drops a last window that starts in the right padding; with windows at least
        # stride + padding wide that cannot happen, and every torchvision model is in that case.
        raise ValueError(
            f"ceil_mode pooling with kernel {kernel}, stride {stride}, padding {padding} needs "
            "PyTorch's last-window correction, which has no closed form here"
        )
    return (
        sp.ceiling(_per(stride) * (size + 2 * padding - dilation * (kernel - 1) - 1)) + 1
    )


def transposed_output_size(
    size: Size,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    dilation: int = 1,
) -> sp.Expr:
    """Return ConvTranspose2d's output length: (I-1)s - 2p + d(k-1) + output_padding + 1."""

    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def same_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """Return the (left, right) padding PyTorch's padding='same' uses for a stride-1 conv."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def halving_and_doubling_padding(kernel: int, stride: int = 2) -> tuple[int, int]:
    """Return (padding, output_padding): Conv2d(I) = I/stride and ConvTranspose2d(I) = I*stride.

    In closed form: Conv2d maps stride*n to n + floor((2p - kernel)/stride) + 1, which is n
    exactly when kernel - stride <= 2p < kernel; the smallest such p >= 0 is taken, and then
    output_padding = stride*n - transposed_output_size(n) = stride - kernel + 2p, in [0, stride).
    """
    if kernel < 1 or stride < 1:
        raise ValueError(f"kernel and stride must be positive, got kernel={kernel}, "
                         f"stride={stride}")
    padding = max(0, -((stride - kernel) // 2))  # ceil((kernel - stride) / 2)
    if 2 * padding >= kernel:
        raise ValueError(
            f"no padding makes a kernel-{kernel}, stride-{stride} convolution divide the size by "
            f"{stride} exactly with a matching transposed convolution; try an odd kernel or a "
            f"stride of 2 or more"
        )
    return padding, stride - kernel + 2 * padding


@functools.lru_cache(maxsize=4096, typed=True)  # a block repeated per stage pools a size again
def adaptive_window_total(size: Size, output_size: int) -> sp.Expr:
    """Return the summed window length of adaptive pooling from `size` to `output_size` cells.

    Cell i pools [floor(i*I/O), ceil((i+1)*I/O)), as in PyTorch's adaptive pooling kernels.
    """
    import sympy as sp

    return sum(
        (
            sp.ceiling(sp.Rational(i + 1, output_size) * size)
            - sp.floor(sp.Rational(i, output_size) * size)
            for i in range(output_size)
        ),
        sp.Integer(0),
    )


def rounded_up(size: object) -> object:
    """Return `size` with a term a + Mod(E, n), where E = -a modulo n, written n*ceiling(a/n):
    a size padded up to a multiple of n (window attention pads H by (n - H % n) % n), in the
    form whose multiples and quotients by n cancel."""
    import sympy as sp

    if not isinstance(size, sp.Expr) or not size.has(sp.Mod):
        return size
    for remainder in sp.Add.make_args(size):
        if not isinstance(remainder, sp.Mod) or not remainder.args[1].is_Integer:
            continue
        difference, multiple = remainder.args
        rest = size - remainder
        if rest.is_integer and (sp.expand(difference + rest) / multiple).is_integer:
            return multiple * sp.ceiling(rest / multiple)
    return size
