"""Fast forward passes on the meta device: shapes without PyTorch's Python meta kernels.

Counting runs networks built on the meta device (no weights) to learn shapes: to decide a
forward's branches at a probe size, and to see whether a model runs at twice its size. Many
meta kernels are Python decompositions (layer_norm, hardswish, add), which do far more work
than the output's shape needs. `MetaShapes` answers the element-wise calls, the norms, linear,
convolutions, attention and resizing with an empty meta tensor of the output's shape, after
the shape checks the call makes; anything it does not know, or whose checks fail, runs as
before, so errors are PyTorch's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _dense(tensor: torch.Tensor) -> bool:
    """Return whether `tensor`'s elements fill its storage without gaps or overlaps (any order
    of dimensions): then an element-wise result is laid out as it is."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _row_major(tensor: torch.Tensor) -> bool:
    """Return whether `tensor` has exactly the strides of a new tensor of its shape (size-1
    dimensions included: a channels-last tensor of 1x1 images passes is_contiguous())."""
    expected = 1
    for size, stride in zip(reversed(tensor.shape), reversed(tensor.stride()), strict=True):
        if stride != expected:
            return False
        expected *= max(size, 1)
    return True


def _like(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Return an empty meta tensor with `tensor`'s shape and strides (None where `tensor` is
    not dense: PyTorch lays the result out afresh)."""
    if not _dense(tensor):
        return None
    return tensor.new_empty_strided(tensor.shape, tensor.stride(), dtype=dtype or tensor.dtype)


def _unary(inplace_at: int | None) -> Callable[..., torch.Tensor | None]:
    """Return the rule of an element-wise call whose `inplace` flag is positional argument
    `inplace_at` (None: the call has none): the input itself in place, else one like it."""

    def rule(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        inplace = kwargs.get("inplace", False)
        if inplace_at is not None and len(args) >= inplace_at:
            inplace = args[inplace_at - 1]
        return input if inplace else _like(input)

    return rule


def _orders_alone(tensor: torch.Tensor) -> bool:
    """Return whether `tensor`'s strides alone decide the layout of an element-wise result of
    which it is the first operand: PyTorch (TensorIterator) orders the dimensions by the first
    operand's strides wherever they differ, so a dense one without size-1 dimensions, its
    strides all different and none 0, lays the result out as it is (a residual added to a
    transposed tensor, timm mobilevit's)."""
    strides = tensor.stride()
    return (1 not in tensor.shape and 0 not in strides and len(set(strides)) == len(strides)
            and _dense(tensor))


def _binary(input: torch.Tensor, other: Any, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """add, sub, mul: the broadcast shape and the promoted dtype (None with out=)."""
    if kwargs.get("out") is not None or len(args) > 1 or kwargs.get("alpha", 1) != 1:
        return None  # alpha: PyTorch checks it against the dtypes
    if isinstance(other, torch.Tensor):
        if not other.is_meta or input.dtype is other.dtype is torch.bool:
            return None  # bool - bool: PyTorch refuses it
        shape = torch.broadcast_shapes(input.shape, other.shape)
        if shape != input.shape and _row_major(input) and _row_major(other):
            # a smaller operand first (`bias + x`): row-major operands (exact strides, size-1
            # dimensions too) give a row-major result
            return input.new_empty(shape, dtype=torch.result_type(input, other))
        if shape != input.shape or (other.shape == shape and other.stride() != input.stride()
                                    and not _orders_alone(input)):
            return None  # the layout PyTorch picks among several operands: left to it
    elif isinstance(other, (int, float, bool)):
        shape = input.shape
    else:
        return None
    return _like(input, torch.result_type(input, other))


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
            ) -> torch.Tensor | None:
    if (weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]
            or input.dtype != weight.dtype or not weight.is_meta):
        return None
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != input.dtype
                             or not bias.is_meta):
        return None
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _layer_norm(input: torch.Tensor, normalized_shape: Any, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> torch.Tensor | None:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(input.shape[-len(shape):]) != shape or input.dim() < len(shape):
        return None
    if any(p is not None and tuple(p.shape) != shape for p in (weight, bias)):
        return None
    return input.new_empty(input.shape)  # contiguous, whatever the input's layout


def _batch_norm(input: torch.Tensor, running_mean: Any, running_var: Any, weight: Any = None,
                bias: Any = None, training: bool = False, *args: Any, **kwargs: Any
                ) -> torch.Tensor | None:
    if training or kwargs.get("training") or input.dim() < 2:
        return None  # training checks the batch in Python first: left to PyTorch
    channels = input.shape[1]
    if any(p is not None and tuple(p.shape) != (channels,)
           for p in (running_mean, running_var, weight, bias)):
        return None
    return _like(input)


def _group_norm(input: torch.Tensor, num_groups: int, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> torch.Tensor | None:
    if input.dim() < 2 or num_groups <= 0 or input.shape[1] % num_groups:
        return None
    if any(p is not None and tuple(p.shape) != (input.shape[1],) for p in (weight, bias)):
        return None
    return input.new_empty(input.shape)  # contiguous, whatever the input's layout


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None,
               enable_gqa: bool = False) -> torch.Tensor | None:
    """scaled_dot_product_attention: (..., L, Ev), contiguous (as the meta kernel lays it)."""
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    if (enable_gqa or query.dim() < 2 or not all(isinstance(t, torch.Tensor) and t.is_meta
                                                 for t in tensors)
            or not query.dim() == key.dim() == value.dim()
            or not query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
            or query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]
            or not query.dtype == key.dtype == value.dtype):
        return None
    if attn_mask is not None:
        if is_causal:
            return None  # PyTorch refuses a mask with is_causal
        scores = (*query.shape[:-1], key.shape[-2])
        if attn_mask.dim() > len(scores) or torch.broadcast_shapes(
                attn_mask.shape, scores) != scores:
            return None
        if attn_mask.dtype not in (torch.bool, query.dtype):
            return None
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _convolution(dims: int) -> Callable[..., torch.Tensor | None]:
    """Return the rule of conv{dims}d: floor((size + 2 padding - dilation (K - 1) - 1) /
    stride) + 1 per spatial size, contiguous; 'same' and 'valid' padding as PyTorch reads them."""

    def rule(input: torch.Tensor, weight: torch.Tensor, bias: Any = None, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor | None:
        if (input.dim() != dims + 2 or weight.dim() != dims + 2 or not weight.is_meta
                or input.dtype != weight.dtype or not input.is_contiguous()
                or groups < 1 or input.shape[1] != weight.shape[1] * groups
                or weight.shape[0] % groups):
            return None
        if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or not bias.is_meta):
            return None
        strides, dilations = _per_dim(stride, dims), _per_dim(dilation, dims)
        kernel = weight.shape[2:]
        if padding == "valid":
            paddings = (0,) * dims
        elif padding == "same":
            if any(s != 1 for s in strides):
                return None  # PyTorch refuses it
            return input.new_empty((input.shape[0], weight.shape[0], *input.shape[2:]))
        else:
            paddings = _per_dim(padding, dims)
        if None in (strides, dilations, paddings) or min(strides) < 1 or min(dilations) < 1:
            return None
        sizes = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                 zip(input.shape[2:], paddings, dilations, kernel, strides, strict=True)]
        if min(sizes) < 1 or min(paddings) < 0:
            return None  # PyTorch says why
        return input.new_empty((input.shape[0], weight.shape[0], *sizes))

    return rule


def _per_dim(value: Any, dims: int) -> tuple[int, ...] | None:
    """Return a conv argument as one int per spatial dimension (None for anything else)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        if len(value) == dims:
            return tuple(value)
        if len(value) == 1:
            return (value[0],) * dims
    return None


# the modes F.interpolate runs on an input of 1, 2 or 3 sizes after its channels
_INTERPOLATE_MODES = {"nearest": (1, 2, 3), "nearest-exact": (1, 2, 3), "area": (1, 2, 3),
                      "linear": (1,), "bilinear": (2,), "bicubic": (2,), "trilinear": (3,)}


def _interpolate(input: torch.Tensor, size: Any = None, scale_factor: Any = None,
                 mode: str = "nearest", align_corners: Any = None,
                 recompute_scale_factor: Any = None, antialias: bool = False
                 ) -> torch.Tensor | None:
    """F.interpolate to a given `size`, contiguous (a scale factor is left to PyTorch): the
    bicubic kernel's meta function is a Python decomposition, 26 ms of timm crossvit's trace."""
    dims = input.dim() - 2
    if isinstance(size, bool) or isinstance(size, (tuple, list)) and any(
            isinstance(v, bool) for v in size):
        return None  # PyTorch refuses it
    if (size is None or scale_factor is not None or antialias or not _row_major(input)
            or recompute_scale_factor
            or dims not in _INTERPOLATE_MODES.get(mode, ())
            or (align_corners is not None and mode in ("nearest", "nearest-exact", "area"))):
        return None
    sizes = _per_dim(size, dims)
    if (sizes is None or isinstance(size, (tuple, list)) and len(size) != dims
            or min(sizes) < 1 or min(input.shape) < 1):
        return None  # PyTorch says why
    return input.new_empty((*input.shape[:2], *sizes))


_NO_FLAG = _unary(None)
RULES: dict[Any, Callable[..., torch.Tensor | None]] = {
    F.relu: _unary(1), F.relu6: _unary(1), F.silu: _unary(1), F.hardswish: _unary(1),
    F.hardsigmoid: _unary(1), F.mish: _unary(1), F.leaky_relu: _unary(2), F.elu: _unary(2),
    F.hardtanh: _unary(3), F.dropout: _unary(3), F.gelu: _NO_FLAG,
    torch.relu: _NO_FLAG, torch.Tensor.relu: _NO_FLAG, torch.sigmoid: _NO_FLAG,
    torch.Tensor.sigmoid: _NO_FLAG, torch.tanh: _NO_FLAG, torch.Tensor.tanh: _NO_FLAG,
    torch.add: _binary, torch.Tensor.add: _binary, torch.sub: _binary,
    torch.Tensor.sub: _binary, torch.mul: _binary, torch.Tensor.mul: _binary,
    F.linear: _linear, F.layer_norm: _layer_norm, F.batch_norm: _batch_norm,
    F.group_norm: _group_norm, F.scaled_dot_product_attention: _attention,
    F.conv1d: _convolution(1), F.conv2d: _convolution(2), F.conv3d: _convolution(3),
    F.interpolate: _interpolate,
}


class MetaShapes(TorchFunctionMode):
    """While active, the calls in RULES on meta tensors return an empty meta tensor of their
    output's shape (strides and dtype as PyTorch gives them), checked as the call checks it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = RULES.get(func)
        if rule is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            try:
                result = rule(*args, **kwargs)
            except (TypeError, ValueError, RuntimeError, IndexError):
                result = None  # an unusual call: PyTorch answers it
            if result is not None:
                return result
        return func(*args, **kwargs)
