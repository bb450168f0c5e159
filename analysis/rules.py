"""Layer rules: one small function per module type or function, registered in a table.

Each rule takes the symbolic inputs of one call and returns a `LayerCost` (or, for calls that
only move Python values around, such as `x.size()`, a `PlainValue`). Adding a layer type means
adding one function and one registry line.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy as sp
import torch
import torch.nn.functional as F
from torch import nn

from analysis import shapes

BATCH = sp.Symbol("B", integer=True, positive=True)


@dataclass(frozen=True)
class SymTensor:
    """A tensor known only by its symbolic shape (batch dimension first)."""

    shape: tuple[sp.Expr, ...]

    @property
    def per_example(self) -> sp.Expr:
        """Return the number of values per example (the batch dimension divided out)."""
        if self.shape and self.shape[0] == BATCH:
            return sp.Mul(*self.shape[1:])
        return sp.Mul(*self.shape) / BATCH


@dataclass(frozen=True)
class LayerCost:
    """What one layer call costs, before a counting convention is applied.

    Besides the default count (`connections`, the multiply-adds of conv/linear), it carries the
    facts other tools' conventions need: the operation (`op`), how it was called (`via`), the
    input size, the per-output multiply-adds of a convolution, the parameter count of the call.
    """

    kind: str  # conv, linear, pool, adaptive_pool, upsample, norm, activation, elementwise, routing
    output: Any  # SymTensor, or a tuple/list of them (chunk)
    weights: sp.Expr = sp.Integer(0)
    connections: sp.Expr = sp.Integer(0)
    bias_connections: sp.Expr = sp.Integer(0)  # added when the convention counts bias edges
    op: str = ""  # relu, max_pool2d, upsample_bilinear, add, ...; the interpreter fills it if empty
    via: str = ""  # module, module_subclass, F, torch, Tensor, operator, function (see call_via)
    inputs: sp.Expr | None = None  # values of the first input tensor per example
    macs_per_output: sp.Expr = sp.Integer(0)  # conv: C_in/groups * Kh * Kw
    parameters: sp.Expr | None = None  # parameters of this call (weights before de-duplication)
    bias_weights: sp.Expr = sp.Integer(0)  # the bias parameters among them
    trainable_weights: sp.Expr | None = None  # weights with requires_grad (None: all of them)
    affine: bool = False  # a normalisation with a learnt scale
    extra: tuple[tuple[str, sp.Expr], ...] = ()  # rule-specific quantities, e.g. softmax rows
    # sizes that must be equal for the call to run, (a, b, what), when they are equal only at
    # some input sizes (e.g. a Linear after a flatten); checked wherever formulas are evaluated
    requires: tuple[tuple[sp.Expr, sp.Expr, str], ...] = ()

    @property
    def outputs(self) -> sp.Expr:
        """Return the number of values the layer produces per example."""
        if isinstance(self.output, SymTensor):
            return self.output.per_example
        return sp.Add(*(t.per_example for t in self.output))

    def quantity(self, name: str) -> sp.Expr:
        """Return one named per-example quantity (QUANTITY_NAMES) that conventions count with."""
        extra = dict(self.extra)
        if name in extra:
            return extra[name]
        inputs = self.outputs if self.inputs is None else self.inputs
        values = {
            "macs": lambda: self.connections,
            "bias": lambda: self.bias_connections,
            "outputs": lambda: self.outputs,
            "inputs": lambda: inputs,
            "output_macs": lambda: self.outputs * self.macs_per_output,
            "weights": lambda: self.weights,
            "params": lambda: self.weights if self.parameters is None else self.parameters,
            "trainable_weights": lambda: (
                self.weights if self.trainable_weights is None else self.trainable_weights
            ),
            "bias_params": lambda: self.bias_weights,
            "affine_inputs": lambda: inputs if self.affine else sp.Integer(0),
        }
        if name not in values:
            raise ValueError(
                f"unknown quantity {name!r} for {self.op or self.kind}; "
                f"use one of {', '.join(QUANTITY_NAMES)}"
            )
        return sp.sympify(values[name]())


QUANTITY_NAMES = (
    "macs",  # the default count: multiply-adds of conv/linear, windows of pools, ...
    "bias",  # one per output of a layer with a bias
    "outputs",  # values produced
    "inputs",  # values of the first input
    "output_macs",  # outputs * C_in/groups * Kh*Kw (differs from macs for transposed convs)
    "weights",  # parameters owned by this row (0 on a module's second call)
    "params",  # parameters of the module, on every call
    "trainable_weights",  # weights with requires_grad
    "bias_params",  # bias parameters of the module
    "affine_inputs",  # inputs when the normalisation is affine, else 0
)


@dataclass(frozen=True)
class PlainValue:
    """The result of a call that computes no tensor (shape queries, arithmetic on sizes)."""

    value: Any


class UnsupportedLayer(ValueError):
    """A module or function that has no rule."""


# Attribute access for a module: channel counts and kernel sizes as sympy expressions in the
# hyperparameters where they were fitted, concrete integers otherwise.
Attributes = Mapping[str, Any]


def _pair(value: Any) -> tuple[Any, Any]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _spatial(x: SymTensor) -> tuple[sp.Expr, sp.Expr]:
    if len(x.shape) != 4:
        raise ValueError(f"expected a 4-d (B, C, H, W) input, got shape {x.shape}")
    return x.shape[2], x.shape[3]


def _with_spatial(x: SymTensor, channels: sp.Expr, height: sp.Expr, width: sp.Expr) -> SymTensor:
    return SymTensor((x.shape[0], sp.sympify(channels), sp.sympify(height), sp.sympify(width)))


# --- module rules: (module, attributes, input) -> LayerCost ---------------------------------


def conv2d(module: nn.Conv2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Conv2d: weights C_out*C_in/g*Kh*Kw (+C_out), connections outputs*C_in/g*Kh*Kw."""
    height, width = _spatial(x)
    kh, kw = module.kernel_size
    if module.padding == "same":
        sizes = (height, width)
    else:
        padding = (0, 0) if module.padding == "valid" else module.padding
        sizes = tuple(
            shapes.conv_output_size(size, k, s, p, d)
            for size, k, s, p, d in zip(
                (height, width), (kh, kw), module.stride, padding, module.dilation, strict=True
            )
        )
    c_out, c_in, groups = attrs["out_channels"], attrs["in_channels"], attrs["groups"]
    sym_kh, sym_kw = _pair(attrs["kernel_size"])
    output = _with_spatial(x, c_out, *sizes)
    per_output = c_in / groups * sym_kh * sym_kw
    bias = module.bias is not None
    return LayerCost(
        "conv",
        output,
        weights=c_out * per_output + (c_out if bias else 0),
        connections=output.per_example * per_output,
        bias_connections=output.per_example if bias else sp.Integer(0),
        # string padding runs as aten::_convolution_mode, which some tools do not see
        op="conv2d_mode" if isinstance(module.padding, str) else "conv2d",
        macs_per_output=per_output,
        bias_weights=sp.sympify(c_out if bias else 0),
    )


def conv_transpose2d(module: nn.ConvTranspose2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """ConvTranspose2d: connections = input values * C_out/g * Kh*Kw."""
    height, width = _spatial(x)
    sizes = tuple(
        shapes.transposed_output_size(size, k, s, p, op, d)
        for size, k, s, p, op, d in zip(
            (height, width),
            module.kernel_size,
            module.stride,
            module.padding,
            module.output_padding,
            module.dilation,
            strict=True,
        )
    )
    c_out, c_in, groups = attrs["out_channels"], attrs["in_channels"], attrs["groups"]
    sym_kh, sym_kw = _pair(attrs["kernel_size"])
    output = _with_spatial(x, c_out, *sizes)
    bias = module.bias is not None
    return LayerCost(
        "conv",
        output,
        weights=c_in * c_out / groups * sym_kh * sym_kw + (c_out if bias else 0),
        connections=x.per_example * c_out / groups * sym_kh * sym_kw,
        bias_connections=output.per_example if bias else sp.Integer(0),
        op="conv_transpose2d",
        macs_per_output=c_in / groups * sym_kh * sym_kw,
        bias_weights=sp.sympify(c_out if bias else 0),
    )


class ShapeMismatch(ValueError):
    """Sizes that must agree for a call to run disagree at every input size."""


def must_agree(a: Any, b: Any, what: str) -> tuple[tuple[sp.Expr, sp.Expr, str], ...]:
    """Return () when a == b always, ((a, b, what),) when only at some sizes; raise when never."""
    a, b = sp.sympify(a), sp.sympify(b)
    difference = sp.simplify(a - b)
    if difference == 0:
        return ()
    if difference.is_number:
        raise ShapeMismatch(f"{what}: {a} and {b} differ at every input size")
    return ((a, b, what),)


def linear(module: nn.Linear, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Linear: weights in*out (+out), connections in*out per input row."""
    n_in, n_out = attrs["in_features"], attrs["out_features"]
    requires = must_agree(x.shape[-1], n_in, "its input's last dimension must equal in_features")
    output = SymTensor((*x.shape[:-1], sp.sympify(n_out)))
    rows = x.per_example / x.shape[-1]
    bias = module.bias is not None
    return LayerCost(
        "linear",
        output,
        weights=n_in * n_out + (n_out if bias else 0),
        connections=rows * n_in * n_out,
        bias_connections=output.per_example if bias else sp.Integer(0),
        op="linear",
        macs_per_output=sp.sympify(n_in),
        bias_weights=sp.sympify(n_out if bias else 0),
        requires=requires,
    )


def _pool(x: SymTensor, kernel, stride, padding, dilation, ceil_mode, op: str = "") -> LayerCost:
    height, width = _spatial(x)
    kernel, padding, dilation = _pair(kernel), _pair(padding), _pair(dilation)
    stride = _pair(stride if stride not in (None, ()) else kernel)
    sizes = tuple(
        shapes.pool_output_size(size, k, s, p, d, ceil_mode)
        for size, k, s, p, d in zip((height, width), kernel, stride, padding, dilation, strict=True)
    )
    output = _with_spatial(x, x.shape[1], *sizes)
    return LayerCost("pool", output, connections=output.per_example * kernel[0] * kernel[1], op=op)


def max_pool2d(module: nn.MaxPool2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """MaxPool2d: connections = outputs * window size."""
    return _pool(
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.ceil_mode,
        "max_pool2d",
    )


def avg_pool2d(module: nn.AvgPool2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """AvgPool2d: connections = outputs * window size."""
    return _pool(
        x, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode, "avg_pool2d"
    )


def _adaptive_pool(x: SymTensor, output_size: Any, op: str = "") -> LayerCost:
    height, width = _spatial(x)
    out_h, out_w = _pair(output_size)
    out_h = height if out_h is None else sp.Integer(out_h)
    out_w = width if out_w is None else sp.Integer(out_w)
    output = _with_spatial(x, x.shape[1], out_h, out_w)
    window_h = height if out_h == height else shapes.adaptive_window_total(height, int(out_h))
    window_w = width if out_w == width else shapes.adaptive_window_total(width, int(out_w))
    return LayerCost("adaptive_pool", output, connections=x.shape[1] * window_h * window_w, op=op)


def adaptive_pool2d(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """AdaptiveAvg/MaxPool2d: connections = channels * sum of the (input/output) windows."""
    op = (
        "adaptive_max_pool2d" if isinstance(module, nn.AdaptiveMaxPool2d) else "adaptive_avg_pool2d"
    )
    return _adaptive_pool(x, module.output_size, op)


def batch_norm2d(module: nn.BatchNorm2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """BatchNorm2d: weights 2*C when affine, 1 connection per output."""
    output = SymTensor(x.shape)
    weights = 2 * attrs["num_features"] if module.affine else sp.Integer(0)
    return LayerCost(
        "norm",
        output,
        weights=weights,
        connections=output.per_example,
        op="batch_norm",
        affine=module.affine,
    )


def layer_norm(module: nn.LayerNorm, attrs: Attributes, x: SymTensor) -> LayerCost:
    """LayerNorm: weights 2*normalized size when affine, 1 connection per output."""
    size = math.prod(module.normalized_shape)
    count = (module.weight is not None) + (module.bias is not None)
    return LayerCost(
        "norm",
        SymTensor(x.shape),
        weights=sp.Integer(count * size),
        connections=x.per_example,
        op="layer_norm",
        affine=module.weight is not None,
    )


def group_norm(module: nn.GroupNorm, attrs: Attributes, x: SymTensor) -> LayerCost:
    """GroupNorm: weights 2*C when affine, 1 connection per output."""
    weights = 2 * attrs["num_channels"] if module.affine else sp.Integer(0)
    return LayerCost(
        "norm",
        SymTensor(x.shape),
        weights=weights,
        connections=x.per_example,
        op="group_norm",
        affine=module.affine,
    )


def activation(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Element-wise activation (ReLU, Sigmoid, ...): 1 connection per output."""
    weights = sum((p.numel() for p in module.parameters(recurse=False)), 0)
    op = next((ACTIVATION_OPS[c] for c in type(module).__mro__ if c in ACTIVATION_OPS), "")
    extra = ()
    if isinstance(module, nn.Softmax) and module.dim is not None:
        # rows = values / size along the softmax dimension (thop counts per row)
        extra = (("rows", x.per_example / x.shape[module.dim]),)
    return LayerCost(
        "activation",
        SymTensor(x.shape),
        weights=sp.Integer(weights),
        connections=x.per_example,
        op=op,
        extra=extra,
    )


ACTIVATION_OPS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.ELU: "elu",
    nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Softmax: "softmax",
}


def dropout(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Dropout: an element-wise mask, 1 connection per output."""
    return LayerCost("elementwise", SymTensor(x.shape), connections=x.per_example, op="dropout")


def identity(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Identity: routing only, no connections."""
    return LayerCost("routing", SymTensor(x.shape), op="identity")


def flatten_module(module: nn.Flatten, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Flatten: routing only."""
    return LayerCost("routing", _flatten(x, module.start_dim, module.end_dim), op="flatten")


def upsample(module: nn.Upsample, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Upsample: nearest 1 connection per output, bilinear 4."""
    return _interpolate(x, module.size, module.scale_factor, module.mode)


MODULE_RULES: dict[type, Callable[..., LayerCost]] = {
    nn.Conv2d: conv2d,
    nn.ConvTranspose2d: conv_transpose2d,
    nn.Linear: linear,
    nn.MaxPool2d: max_pool2d,
    nn.AvgPool2d: avg_pool2d,
    nn.AdaptiveAvgPool2d: adaptive_pool2d,
    nn.AdaptiveMaxPool2d: adaptive_pool2d,
    nn.BatchNorm2d: batch_norm2d,
    nn.LayerNorm: layer_norm,
    nn.GroupNorm: group_norm,
    nn.ReLU: activation,
    nn.ReLU6: activation,
    nn.LeakyReLU: activation,
    nn.PReLU: activation,
    nn.ELU: activation,
    nn.GELU: activation,
    nn.Sigmoid: activation,
    nn.Tanh: activation,
    nn.Hardswish: activation,
    nn.Hardsigmoid: activation,
    nn.SiLU: activation,
    nn.Mish: activation,
    nn.Softmax: activation,
    nn.Dropout: dropout,
    nn.Dropout2d: dropout,
    nn.Identity: identity,
    nn.Flatten: flatten_module,
    nn.Upsample: upsample,
}


# --- function rules: (*args, **kwargs) with SymTensor arguments -> LayerCost | PlainValue ------


def _flatten(x: SymTensor, start_dim: int = 0, end_dim: int = -1) -> SymTensor:
    dims = list(x.shape)
    start, end = start_dim % len(dims), end_dim % len(dims)
    merged = sp.Mul(*dims[start : end + 1])
    return SymTensor(tuple(dims[:start] + [merged] + dims[end + 1 :]))


def _interpolate(x: SymTensor, size: Any, scale_factor: Any, mode: str) -> LayerCost:
    height, width = _spatial(x)
    if size is not None:
        out_h, out_w = (sp.sympify(s) for s in _pair(size))
    else:
        scale_h, scale_w = (sp.nsimplify(s) for s in _pair(scale_factor))
        out_h, out_w = sp.floor(height * scale_h), sp.floor(width * scale_w)
    output = _with_spatial(x, x.shape[1], out_h, out_w)
    per_output = {"nearest": 1, "nearest-exact": 1, "bilinear": 4, "bicubic": 16, "area": None}
    if per_output.get(mode) is None:
        raise UnsupportedLayer(f"interpolation mode {mode!r} has no connection rule")
    return LayerCost(
        "upsample", output, connections=output.per_example * per_output[mode], op=f"upsample_{mode}"
    )


def interpolate(
    x: SymTensor,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
) -> LayerCost:
    """F.interpolate: nearest 1 connection per output, bilinear 4, bicubic 16."""
    return _interpolate(x, size, scale_factor, mode)


def _broadcast(a: tuple, b: tuple) -> tuple[tuple, tuple]:
    """Return the broadcast shape of `a` and `b` and the size agreements it needs."""
    result, requires = [], ()
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else sp.Integer(1)
        db = b[-i] if i <= len(b) else sp.Integer(1)
        if da != 1 and db != 1:
            requires += must_agree(da, db, f"the operands must agree in dimension {-i}")
        result.append(db if da == 1 else da)
    return tuple(reversed(result)), requires


def binary_elementwise(a: Any, b: Any, *args, **kwargs) -> LayerCost | PlainValue:
    """add/mul/sub/div: 2 connections per output for two tensors, 1 with a scalar operand."""
    tensors = [v for v in (a, b) if isinstance(v, SymTensor)]
    if not tensors:
        return PlainValue(None)  # marker: evaluate as Python arithmetic
    if len(tensors) == 2:
        shape, requires = _broadcast(a.shape, b.shape)
        output = SymTensor(shape)
        return LayerCost("elementwise", output, connections=2 * output.per_example,
                         requires=requires)
    output = SymTensor(tensors[0].shape)
    return LayerCost("elementwise", output, connections=output.per_example)


def unary_elementwise(x: SymTensor, *args, **kwargs) -> LayerCost:
    """F.relu, torch.sigmoid, ...: 1 connection per output."""
    return LayerCost("activation", SymTensor(x.shape), connections=x.per_example)


def cat(tensors: Sequence[SymTensor], dim: int = 0, **kwargs) -> LayerCost:
    """torch.cat: routing only; the sizes along `dim` add up."""
    dim = dim % len(tensors[0].shape)
    shape = list(tensors[0].shape)
    requires = ()
    for tensor in tensors[1:]:
        for axis, (first, other) in enumerate(zip(shape, tensor.shape)):
            if axis != dim:
                requires += must_agree(first, other, f"the inputs must agree in dimension {axis}")
    shape[dim] = sp.Add(*(t.shape[dim] for t in tensors))
    return LayerCost("routing", SymTensor(tuple(shape)), requires=requires)


def flatten(x: SymTensor, start_dim: int = 0, end_dim: int = -1) -> LayerCost:
    """torch.flatten / Tensor.flatten: routing only."""
    return LayerCost("routing", _flatten(x, start_dim, end_dim))


def view(x: SymTensor, *shape) -> LayerCost:
    """Tensor.view / reshape: routing only; a -1 takes what the other sizes leave."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    total = sp.Mul(*x.shape)
    known = sp.Mul(*(sp.sympify(s) for s in shape if s != -1))
    return LayerCost(
        "routing",
        SymTensor(tuple(sp.simplify(total / known) if s == -1 else sp.sympify(s) for s in shape)),
    )


def permute(x: SymTensor, *dims) -> LayerCost:
    """Tensor.permute / torch.permute: routing only."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return LayerCost("routing", SymTensor(tuple(x.shape[d] for d in dims)))


def transpose(x: SymTensor, dim0: int, dim1: int) -> LayerCost:
    """Tensor.transpose: routing only."""
    shape = list(x.shape)
    shape[dim0], shape[dim1] = shape[dim1], shape[dim0]
    return LayerCost("routing", SymTensor(tuple(shape)))


def contiguous(x: SymTensor, *args, **kwargs) -> LayerCost:
    """Tensor.contiguous and other same-shape copies: routing only."""
    return LayerCost("routing", SymTensor(x.shape))


def chunk(x: SymTensor, chunks: int, dim: int = 0) -> LayerCost:
    """Tensor.chunk into equal parts (the size along `dim` must divide): routing only."""
    shape = list(x.shape)
    shape[dim] = shape[dim] / chunks
    return LayerCost("routing", tuple(SymTensor(tuple(shape)) for _ in range(chunks)))


def mean(x: SymTensor, dim=None, keepdim: bool = False, **kwargs) -> LayerCost:
    """Tensor.mean over dims: each input value feeds one output, 1 connection per input."""
    dims = range(len(x.shape)) if dim is None else [d % len(x.shape) for d in _pair(dim)]
    shape = [sp.Integer(1) if i in dims else s for i, s in enumerate(x.shape)]
    if not keepdim:
        shape = [s for i, s in enumerate(shape) if i not in dims]
    return LayerCost("adaptive_pool", SymTensor(tuple(shape)), connections=x.per_example)


def functional_adaptive_avg_pool2d(
    x: SymTensor, output_size: Any, return_indices: bool = False
) -> LayerCost:
    """F.adaptive_avg_pool2d / F.adaptive_max_pool2d: as the modules."""
    if return_indices:
        raise UnsupportedLayer("adaptive_max_pool2d with return_indices=True")
    return _adaptive_pool(x, output_size)


def functional_pool2d(
    x: SymTensor,
    kernel_size,
    stride=None,
    padding=0,
    *args,
    ceil_mode: bool = False,
    dilation=1,
    **kwargs,
) -> LayerCost:
    """F.max_pool2d / F.avg_pool2d: as the modules."""
    return _pool(x, kernel_size, stride, padding, dilation, ceil_mode)


def getitem(container: Any, index: Any) -> LayerCost | PlainValue:
    """Indexing: on a tensor, routing (basic slices only); on anything else, plain Python."""
    if not isinstance(container, SymTensor):
        return PlainValue(operator.getitem(container, index))
    index = index if isinstance(index, tuple) else (index,)
    shape = []
    for position, size in enumerate(container.shape):
        item = index[position] if position < len(index) else slice(None)
        if isinstance(item, int):
            continue
        if item != slice(None):
            if not size.is_Integer:
                raise UnsupportedLayer(f"slicing a symbolic dimension ({size}) with {item}")
            shape.append(sp.Integer(len(range(*item.indices(int(size))))))
        else:
            shape.append(size)
    return LayerCost("routing", SymTensor(tuple(shape)))


def size(x: SymTensor, dim: int | None = None) -> PlainValue:
    """Tensor.size(): the symbolic shape (not a layer)."""
    return PlainValue(x.shape if dim is None else x.shape[dim])


def stochastic_depth(x: SymTensor, p: float, mode: str, training: bool = True) -> LayerCost:
    """torchvision's stochastic depth: the identity at inference, which is what is analysed."""
    return LayerCost("routing", SymTensor(x.shape))


def _getattr(x: Any, name: str) -> PlainValue:
    if isinstance(x, SymTensor) and name == "shape":
        return PlainValue(x.shape)
    if isinstance(x, SymTensor) and name == "ndim":
        return PlainValue(len(x.shape))
    if isinstance(x, SymTensor):
        raise UnsupportedLayer(f"tensor attribute {name!r}")
    return PlainValue(getattr(x, name))


def dim(x: SymTensor) -> PlainValue:
    """Tensor.dim(): the rank (not a layer)."""
    return PlainValue(len(x.shape))


def _stochastic_depth_target() -> Any:
    try:
        from torchvision.ops import stochastic_depth as function
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return function


UNARY_FUNCTIONS = (
    F.relu,
    F.relu6,
    F.hardswish,
    F.hardsigmoid,
    F.silu,
    F.gelu,
    F.sigmoid,
    F.leaky_relu,
    F.tanh,
    F.elu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.softmax,
    torch.softmax,
)
BINARY_FUNCTIONS = (
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
)

# Keys: the callable for call_function nodes, the method name for call_method nodes.
FUNCTION_RULES: dict[Any, Callable[..., LayerCost | PlainValue]] = {
    **{function: unary_elementwise for function in UNARY_FUNCTIONS},
    **{function: binary_elementwise for function in BINARY_FUNCTIONS},
    "add": binary_elementwise,
    "add_": binary_elementwise,
    "mul": binary_elementwise,
    "mul_": binary_elementwise,
    "sub": binary_elementwise,
    "div": binary_elementwise,
    "relu": unary_elementwise,
    "relu_": unary_elementwise,
    "sigmoid": unary_elementwise,
    "sigmoid_": unary_elementwise,
    "tanh": unary_elementwise,
    torch.cat: cat,
    torch.flatten: flatten,
    "flatten": flatten,
    "view": view,
    "reshape": view,
    torch.reshape: view,
    "permute": permute,
    torch.permute: permute,
    "transpose": transpose,
    torch.transpose: transpose,
    "contiguous": contiguous,
    "clone": contiguous,
    "detach": contiguous,
    "chunk": chunk,
    torch.chunk: chunk,
    "mean": mean,
    torch.mean: mean,
    F.interpolate: interpolate,
    F.adaptive_avg_pool2d: functional_adaptive_avg_pool2d,
    F.adaptive_max_pool2d: functional_adaptive_avg_pool2d,
    F.max_pool2d: functional_pool2d,
    F.avg_pool2d: functional_pool2d,
    operator.getitem: getitem,
    getattr: _getattr,
    "size": size,
    "dim": dim,
}
if _stochastic_depth_target() is not None:
    FUNCTION_RULES[_stochastic_depth_target()] = stochastic_depth


def call_via(node_op: str, target: Any) -> str:
    """Return how a torch.fx call reached its op: F, torch, Tensor, operator or function.

    Hook-based tools see modules only, and some patch a few `torch.nn.functional` or `torch`
    functions (but not Python operators such as `+`), so this fact decides what they count.
    """
    if node_op == "call_method":
        return "Tensor"
    name = getattr(target, "__name__", "")
    for via, namespace in (("operator", operator), ("F", F), ("torch", torch)):
        if name and getattr(namespace, name, None) is target:
            return via
    return "function"


def function_op(node_op: str, target: Any) -> str:
    """Return the op name of a function or method call: its name ('relu', 'iadd', 'add_')."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def module_via(module: nn.Module) -> str:
    """Return 'module' when the module's own class has a rule, 'module_subclass' otherwise.

    Tools that hook modules look their classes up exactly, so a subclass escapes them.
    """
    return "module" if type(module) in MODULE_RULES else "module_subclass"


def module_rule(module: nn.Module) -> Callable[..., LayerCost] | None:
    """Return the rule for `module`'s type (or its nearest registered base class), or None."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None
