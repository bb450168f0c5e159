"""Layer rules: one small function per module type or function, registered in a table.

Each rule takes the symbolic inputs of one call and returns a `LayerCost` (or, for calls that
only move Python values around, such as `x.size()`, a `PlainValue`). Adding a layer type means
adding one function and one registry line.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sympy as sp
import torch
import torch.nn.functional as F
from convtally.analysis import shapes
from torch import nn

BATCH = sp.Symbol("B", integer=True, positive=True)


_ZERO = sp.Integer(0)


@dataclass(frozen=True)
class SymTensor:
    """A tensor known only by its symbolic shape (batch dimension first)."""

    shape: tuple[sp.Expr, ...]
    # (least, greatest) value of its elements, for a tensor computed from sizes alone (the
    # positions torch.arange gives): what an index into a fixed table must stay inside
    value_range: tuple[sp.Expr, sp.Expr] | None = field(default=None, compare=False)

    def __init__(self, shape: tuple[sp.Expr, ...],
                 value_range: tuple[sp.Expr, sp.Expr] | None = None) -> None:
        # the fields written into the instance at once (dataclasses' own __init__ sets each
        # through object.__setattr__, the price of frozen: a row makes a tensor or two)
        self.__dict__.update(shape=shape, value_range=value_range)

    def __hash__(self) -> int:
        # the shape's hash, worked out once (sympy hashes each size in Python): an output is
        # hashed with its cost when the cost is counted, and shared outputs again
        known = self.__dict__.get("_hash")
        if known is None:
            known = self.__dict__["_hash"] = hash((self.shape,))
        return known

    def __getstate__(self) -> dict[str, Any]:
        # a copy in another process (a pickle) hashes its symbols anew
        return {key: value for key, value in self.__dict__.items() if key != "_hash"}

    @functools.cached_property  # kept in the instance's __dict__: not a field, not compared
    def per_example(self) -> sp.Expr:
        """Return the number of values per example (the batch dimension divided out)."""
        if self.shape and self.shape[0] == BATCH:
            return sp.Mul(*self.shape[1:])
        values = sp.Mul(*self.shape)
        # a parameter, or a tensor computed from parameters only, has no batch dimension
        return values / BATCH if values.has(BATCH) else values


def same_shape(x: SymTensor) -> SymTensor:
    """Return a plain tensor of x's shape: x itself where it is one (frozen, so it can be
    shared, with the values per example it has worked out), else SymTensor(x.shape) (a
    parameter's or a ranged tensor's output is neither)."""
    if type(x) is SymTensor and x.value_range is None:
        return x
    return SymTensor(x.shape)


@dataclass(frozen=True)
class ParameterTensor(SymTensor):
    """A parameter (or buffer) read directly in forward: no batch dimension, owns its values."""

    target: str = ""  # the attribute path, e.g. stages.0.blocks.0.gamma
    numel: int = 0  # the values it owns as weights (0 for a buffer)


@dataclass(frozen=True)
class LayerCost:
    """What one layer call costs, before a counting convention is applied.

    Besides the default count (`connections`, the multiply-adds of conv/linear), it carries the
    facts other tools' conventions need: the operation (`op`), how it was called (`via`), the
    input size, the per-output multiply-adds of a convolution, the parameter count of the call.
    """

    kind: str  # conv, linear, recurrent, pool, adaptive_pool, upsample, norm, activation,
    # elementwise, routing
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
    # (margin, what): a margin that must be >= 0 for the call to run (an index computed from
    # the input size inside the table it reads: mvitv2's relative positions)
    bounds: tuple[tuple[sp.Expr, str], ...] = ()

    def __init__(self, kind: str, output: Any, weights: sp.Expr = _ZERO,
                 connections: sp.Expr = _ZERO, bias_connections: sp.Expr = _ZERO, op: str = "",
                 via: str = "", inputs: sp.Expr | None = None,
                 macs_per_output: sp.Expr = _ZERO, parameters: sp.Expr | None = None,
                 bias_weights: sp.Expr = _ZERO, trainable_weights: sp.Expr | None = None,
                 affine: bool = False, extra: tuple[tuple[str, sp.Expr], ...] = (),
                 requires: tuple[tuple[sp.Expr, sp.Expr, str], ...] = (),
                 bounds: tuple[tuple[sp.Expr, str], ...] = ()) -> None:
        # the fields, in order, written into the instance at once: dataclasses' own __init__
        # sets each of the 16 through object.__setattr__ (two thirds of making a cost, and
        # every row makes one); test_rules holds this signature to the fields
        self.__dict__.update(
            kind=kind, output=output, weights=weights, connections=connections,
            bias_connections=bias_connections, op=op, via=via, inputs=inputs,
            macs_per_output=macs_per_output, parameters=parameters, bias_weights=bias_weights,
            trainable_weights=trainable_weights, affine=affine, extra=extra, requires=requires,
            bounds=bounds,
        )

    def __hash__(self) -> int:
        # the fields that tell costs apart, where the dataclass hashes all 16 (each sympy
        # number in Python) every time a row is counted; equality still compares them all
        return hash((self.kind, self.op, self.output, self.weights, self.connections))

    @property
    def outputs(self) -> sp.Expr:
        """Return the number of values the layer produces per example."""
        output = self.output  # one tensor (most layers): its own, without the tuple walk
        return output.per_example if type(output) is SymTensor else _values_per_example(output)

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
            "row_params": lambda: (self.weights if self.parameters is None else self.parameters)
            * _leading_rows(self.output),
            "row_bias_params": lambda: self.bias_weights * _leading_rows(self.output),
            "affine_inputs": lambda: inputs if self.affine else sp.Integer(0),
        }
        if name not in values:
            raise ValueError(
                f"unknown quantity {name!r} for {self.op or self.kind}; "
                f"use one of {', '.join(QUANTITY_NAMES)}"
            )
        return sp.sympify(values[name]())


def _leading_rows(output: Any) -> sp.Expr:
    """Return the output's first dimension per example: 1 for (B, ...), N for (B*N, ...)."""
    while isinstance(output, (tuple, list)):
        output = next((item for item in output if item is not None), None)
    if not isinstance(output, SymTensor) or not output.shape:
        return sp.Integer(1)
    first = sp.sympify(output.shape[0])
    return first / BATCH if first.has(BATCH) else first


def _values_per_example(output: Any) -> sp.Expr:
    """Return the values per example of a tensor or of a (nested) tuple of them (an LSTM's
    (output, (h_n, c_n)))."""
    if isinstance(output, SymTensor):
        return output.per_example
    if isinstance(output, (tuple, list)):
        return sp.Add(*(_values_per_example(item) for item in output))
    return sp.Integer(0)


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
    "row_params",  # params times the output's first dimension per example (B*N rows: N)
    "row_bias_params",  # bias_params times the same
    "affine_inputs",  # inputs when the normalisation is affine, else 0
)


@dataclass(frozen=True)
class PlainValue:
    """The result of a call that computes no tensor (shape queries, arithmetic on sizes)."""

    value: Any


class UnsupportedLayer(ValueError):
    """A module or function that has no rule."""


class NoClosedForm(UnsupportedLayer):
    """A size whose floors and remainders do not reduce to a closed form (a view's -1 of pooled
    windows): torch.export's symbolic shapes meet the same arithmetic and ran for minutes."""


# Attribute access for a module: channel counts and kernel sizes as sympy expressions in the
# hyperparameters where they were fitted, concrete integers otherwise.
Attributes = Mapping[str, Any]


def _pair(value: Any) -> tuple[Any, Any]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _sizes(x: SymTensor, what: str) -> tuple[sp.Expr, ...]:
    """Return the sizes after the channels of a 3-d to 5-d input (T; H, W; D, H, W)."""
    if not 1 <= len(x.shape) - 2 <= 3:
        raise UnsupportedLayer(f"{what} expected a 3-d to 5-d input, got shape {tuple(x.shape)}")
    return tuple(x.shape[2:])


def _with_spatial(x: SymTensor, channels: sp.Expr, *sizes: sp.Expr) -> SymTensor:
    return SymTensor((x.shape[0], sp.sympify(channels), *(sp.sympify(s) for s in sizes)))


def _ntuple(value: Any, count: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


def _spatial_nd(x: SymTensor, count: int, what: str) -> tuple[sp.Expr, ...]:
    if len(x.shape) != count + 2:
        raise UnsupportedLayer(
            f"{what} expected a {count + 2}-d (B, C, {', '.join('DHW'[3 - count:])}) input, "
            f"got shape {tuple(x.shape)}"
        )
    return tuple(x.shape[2:])


# --- module rules: (module, attributes, input) -> LayerCost ---------------------------------


def conv(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Conv1d/2d/3d: weights C_out*C_in/g*prod(K) (+C_out), connections outputs*C_in/g*prod(K)."""
    count = len(module.kernel_size)
    sizes_in = _spatial_nd(x, count, type(module).__name__)
    if module.padding == "same":
        sizes = sizes_in
    else:
        padding = (0,) * count if module.padding == "valid" else module.padding
        sizes = tuple(
            shapes.conv_output_size(size, k, s, p, d)
            for size, k, s, p, d in zip(
                sizes_in, module.kernel_size, module.stride, padding, module.dilation, strict=True
            )
        )
    c_out, c_in, groups = attrs["out_channels"], attrs["in_channels"], attrs["groups"]
    kernel = _ntuple(attrs["kernel_size"], count)
    output = _with_spatial(x, c_out, *sizes)
    per_output = c_in / groups * sp.Mul(*kernel)
    bias = module.bias is not None
    # string padding runs as aten::_convolution_mode, which some tools do not see
    mode = "_mode" if isinstance(module.padding, str) else ""
    return LayerCost(
        "conv",
        output,
        weights=c_out * per_output + (c_out if bias else 0),
        connections=output.per_example * per_output,
        bias_connections=output.per_example if bias else sp.Integer(0),
        op=f"conv{count}d{mode}",
        macs_per_output=per_output,
        bias_weights=sp.sympify(c_out if bias else 0),
    )


conv2d = conv  # the name the 2-d rule had


def conv_transpose(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """ConvTranspose1d/2d/3d: connections = input values * C_out/g * prod(K)."""
    count = len(module.kernel_size)
    sizes_in = _spatial_nd(x, count, type(module).__name__)
    sizes = tuple(
        shapes.transposed_output_size(size, k, s, p, op, d)
        for size, k, s, p, op, d in zip(
            sizes_in,
            module.kernel_size,
            module.stride,
            module.padding,
            module.output_padding,
            module.dilation,
            strict=True,
        )
    )
    c_out, c_in, groups = attrs["out_channels"], attrs["in_channels"], attrs["groups"]
    kernel = sp.Mul(*_ntuple(attrs["kernel_size"], count))
    output = _with_spatial(x, c_out, *sizes)
    bias = module.bias is not None
    return LayerCost(
        "conv",
        output,
        weights=c_in * c_out / groups * kernel + (c_out if bias else 0),
        connections=x.per_example * c_out / groups * kernel,
        bias_connections=output.per_example if bias else sp.Integer(0),
        op=f"conv_transpose{count}d",
        macs_per_output=c_in / groups * kernel,
        bias_weights=sp.sympify(c_out if bias else 0),
    )


conv_transpose2d = conv_transpose


class ShapeMismatch(ValueError):
    """Sizes that must agree for a call to run disagree at every input size."""


def simplified_difference(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    """Return a - b in a form that tells whether it is 0, a number, or depends on the sizes:
    sp.simplify(a - b), except that a difference seen to take two values at integer points
    is returned as it is (simplify could not make it 0 or a number, and on nested floors it
    costs tenths of a second: HRNet's fuse layers compare such sizes hundreds of times)."""
    a, b = sp.sympify(a), sp.sympify(b)
    if a == b:
        return sp.Integer(0)  # what simplify gives, without simplifying
    try:
        return _simplified_difference(a, b)
    except TypeError:  # unhashable (none known)
        return sp.simplify(a - b)


_PROBES = (61, 64, 97, 128, 203, 256, 35)  # sides of both parities and many residues


@functools.lru_cache(maxsize=16384)
def _simplified_difference(a: sp.Expr, b: sp.Expr) -> sp.Expr:
    difference = a - b
    symbols = sorted(difference.free_symbols, key=lambda symbol: symbol.name)
    if symbols and all(s.is_integer and s.is_positive for s in symbols):
        seen = set()
        for k in range(len(_PROBES)):
            point = {s: sp.Integer(_PROBES[(k + i) % len(_PROBES)]) for i, s in enumerate(symbols)}
            value = difference.xreplace(point)
            if not value.is_Number:
                break  # something that does not evaluate to a number: let simplify decide
            seen.add(value)
            if len(seen) > 1:
                return difference  # not one constant, so neither 0 nor a number
    return sp.simplify(difference)


def must_agree(a: Any, b: Any, what: str) -> tuple[tuple[sp.Expr, sp.Expr, str], ...]:
    """Return () when a == b always, ((a, b, what),) when only at some sizes; raise when never."""
    a, b = sp.sympify(a), sp.sympify(b)
    difference = simplified_difference(a, b)
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
    """Max or average pooling over the last 1, 2 or 3 dimensions: outputs * window size."""
    sizes_in = _sizes(x, "pooling")
    count = len(sizes_in)
    kernel, padding, dilation = (_ntuple(v, count) for v in (kernel, padding, dilation))
    stride = _ntuple(stride if stride not in (None, ()) else kernel, count)
    sizes = tuple(
        shapes.pool_output_size(size, k, s, p, d, ceil_mode)
        for size, k, s, p, d in zip(sizes_in, kernel, stride, padding, dilation, strict=True)
    )
    output = _with_spatial(x, x.shape[1], *sizes)
    return LayerCost("pool", output, connections=output.per_example * sp.Mul(*kernel), op=op)


def _pool_count(module: nn.Module) -> int:
    """Return 1, 2 or 3: the dimensions torch.nn's pooling class (MaxPool1d, ...) pools over."""
    for base in type(module).__mro__:
        if base.__module__.startswith("torch.nn") and base.__name__[-2:] in ("1d", "2d", "3d"):
            return int(base.__name__[-2])
    raise UnsupportedLayer(f"{type(module).__name__}: not a torch.nn pooling layer")


def max_pool(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """MaxPool1d/2d/3d: connections = outputs * window size."""
    count = _pool_count(module)
    _spatial_nd(x, count, type(module).__name__)
    return _pool(
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.ceil_mode,
        f"max_pool{count}d",
    )


def avg_pool(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """AvgPool1d/2d/3d: connections = outputs * window size."""
    count = _pool_count(module)
    _spatial_nd(x, count, type(module).__name__)
    return _pool(
        x, module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
        f"avg_pool{count}d",
    )


def _adaptive_pool(x: SymTensor, output_size: Any, op: str = "") -> LayerCost:
    sizes_in = _sizes(x, "adaptive pooling")
    sizes_out = tuple(
        size if out is None else sp.Integer(out)
        for size, out in zip(sizes_in, _ntuple(output_size, len(sizes_in)), strict=True)
    )
    output = _with_spatial(x, x.shape[1], *sizes_out)
    windows = [
        size if out == size else shapes.adaptive_window_total(size, int(out))
        for size, out in zip(sizes_in, sizes_out, strict=True)
    ]
    return LayerCost(
        "adaptive_pool", output, connections=x.shape[1] * sp.Mul(*windows), op=op
    )


def adaptive_pool(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """AdaptiveAvg/MaxPool1d/2d/3d: connections = channels * sum of the (input/output) windows."""
    count = _pool_count(module)
    _spatial_nd(x, count, type(module).__name__)
    kind = "max" if "Max" in type(module).__name__ else "avg"
    return _adaptive_pool(x, module.output_size, f"adaptive_{kind}_pool{count}d")


def batch_norm2d(module: nn.BatchNorm2d, attrs: Attributes, x: SymTensor) -> LayerCost:
    """BatchNorm2d: weights 2*C when affine, 1 connection per output."""
    output = same_shape(x)
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
        same_shape(x),
        weights=sp.Integer(count * size),
        connections=x.per_example,
        op="layer_norm",
        affine=module.weight is not None,
    )


def _channel_norm(module: nn.Module, channels: sp.Expr, x: SymTensor, op: str) -> LayerCost:
    """A norm with one scale and one shift per channel: weights 2*C when affine, 1 connection
    per output."""
    return LayerCost(
        "norm",
        same_shape(x),
        weights=2 * channels if module.affine else sp.Integer(0),
        connections=x.per_example,
        op=op,
        affine=module.affine,
    )


def group_norm(module: nn.GroupNorm, attrs: Attributes, x: SymTensor) -> LayerCost:
    """GroupNorm: weights 2*C when affine, 1 connection per output."""
    return _channel_norm(module, attrs["num_channels"], x, "group_norm")


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
        same_shape(x),
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
    nn.LogSoftmax: "log_softmax",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.Softplus: "softplus",
    nn.Softsign: "softsign",
    nn.Hardtanh: "hardtanh",
    nn.Tanhshrink: "tanhshrink",
}


def glu_module(module: nn.GLU, attrs: Attributes, x: SymTensor) -> LayerCost:
    """GLU: halves dimension `dim`; one multiply per output (2 connections)."""
    return glu(x, module.dim)


def dropout(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Dropout: an element-wise mask, 1 connection per output."""
    return LayerCost("elementwise", same_shape(x), connections=x.per_example, op="dropout")


def identity(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Identity: routing only, no connections."""
    return LayerCost("routing", same_shape(x), op="identity")


def flatten_module(module: nn.Flatten, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Flatten: routing only."""
    return LayerCost("routing", _flatten(x, module.start_dim, module.end_dim), op="flatten")


def upsample(module: nn.Upsample, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Upsample: nearest 1 connection per output, bilinear 4."""
    return _interpolate(x, module.size, module.scale_factor, module.mode)


def instance_norm(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """InstanceNorm1d/2d/3d: weights 2*C when affine, 1 connection per output."""
    return _channel_norm(module, attrs["num_features"], x, "instance_norm")


def rms_norm(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """RMSNorm: weights the normalized size when affine, 1 connection per output."""
    weights = sum((p.numel() for p in module.parameters(recurse=False)), 0)
    return LayerCost(
        "norm",
        same_shape(x),
        weights=sp.Integer(weights),
        connections=x.per_example,
        op="rms_norm",
        affine=module.weight is not None,
    )


def multihead_attention(
    module: nn.MultiheadAttention,
    attrs: Attributes,
    query: SymTensor,
    key: SymTensor,
    value: SymTensor,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> LayerCost:
    """MultiheadAttention: q/k/v and output projections plus Q·K^T and A·V multiply-adds."""
    if len(query.shape) != 3:
        raise UnsupportedLayer(
            f"MultiheadAttention expected a 3-d (batch, length, embed) query, got {query.shape}"
        )
    length_axis = 1 if module.batch_first else 0
    q_len, kv_len = query.shape[length_axis], key.shape[length_axis]
    embed, heads = module.embed_dim, module.num_heads
    per_batch = query.per_example / (q_len * embed)  # 1, or 1/B... as the layout says
    projections = (q_len * embed + kv_len * module.kdim + kv_len * module.vdim) * embed
    attention = 2 * q_len * kv_len * embed
    out_projection = q_len * embed * embed
    output = SymTensor(query.shape)
    weights_shape = (query.shape[1 - length_axis], q_len, kv_len)
    if not average_attn_weights:
        weights_shape = (weights_shape[0], sp.Integer(heads), q_len, kv_len)
    attention_weights = SymTensor(weights_shape) if need_weights else None
    bias = module.in_proj_bias is not None
    return LayerCost(
        "attention",
        (output, attention_weights),
        weights=sp.Integer(sum(p.numel() for p in module.parameters())),
        connections=per_batch * (projections + attention + out_projection),
        bias_connections=per_batch * (q_len + 2 * kv_len + q_len) * embed if bias else 0,
        op="multihead_attention",
        extra=(
            ("linear_macs", per_batch * (projections + out_projection)),
            ("attention_macs", per_batch * attention),
            # need_weights=True runs two aten::bmm; False runs scaled_dot_product_attention
            ("attention_bmm_macs", per_batch * attention if need_weights else sp.Integer(0)),
        ),
    )


def lstm(module: nn.LSTM, attrs: Attributes, x: SymTensor, hx: Any = None) -> LayerCost:
    """LSTM: per token, direction and layer, the four gates' input and recurrent multiply-adds
    (and the projection's with proj_size); returns (output, (h_n, c_n)) as nn.LSTM does."""
    if len(x.shape) not in (2, 3):
        raise UnsupportedLayer(f"LSTM expected a 2-d or 3-d input, got {len(x.shape)}-d {x.shape}")
    size, hidden, layers = attrs["input_size"], attrs["hidden_size"], int(module.num_layers)
    requires = must_agree(x.shape[-1], size, "its input's last dimension must equal input_size")
    directions = 2 if module.bidirectional else 1
    projection = attrs["proj_size"] if module.proj_size else sp.Integer(0)
    hidden_out = projection if module.proj_size else hidden
    tokens = x.per_example / x.shape[-1]
    gate_macs = sp.Integer(0)
    unprojected_gate_macs = sp.Integer(0)  # the same with hidden_size in place of proj_size
    for layer in range(layers):
        layer_input = size if layer == 0 else directions * hidden_out
        gate_macs += 4 * hidden * (layer_input + hidden_out)
        unprojected_input = size if layer == 0 else directions * hidden
        unprojected_gate_macs += 4 * hidden * (unprojected_input + hidden)
    per_token = tokens * directions
    cells = per_token * layers * hidden  # cell-state values computed
    parameters = sp.Integer(sum(p.numel() for p in module.parameters()))
    batched = len(x.shape) == 3
    if batched:
        batch = x.shape[0] if module.batch_first else x.shape[1]
        output = SymTensor((*x.shape[:2], directions * hidden_out))
        states = ((directions * layers, batch, hidden_out), (directions * layers, batch, hidden))
    else:
        output = SymTensor((x.shape[0], directions * hidden_out))
        states = ((directions * layers, hidden_out), (directions * layers, hidden))
    bias = module.bias
    return LayerCost(
        "recurrent",
        (output, tuple(SymTensor(tuple(sp.sympify(d) for d in shape)) for shape in states)),
        weights=parameters,
        connections=per_token * (gate_macs + layers * hidden * projection),
        bias_connections=8 * cells if bias else sp.Integer(0),
        op="lstm_projected" if module.proj_size else "lstm",
        inputs=x.per_example,
        requires=requires,
        extra=(
            ("gate_macs", per_token * gate_macs),
            ("unprojected_gate_macs", per_token * unprojected_gate_macs),
            ("gate_values", 4 * cells),
            ("cell_values", cells),
            ("bias_values", 8 * cells if bias else sp.Integer(0)),  # b_ih + b_hh per cell
            ("parameter_reads", tokens * parameters),
        ),
    )


def pixel_shuffle(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """PixelShuffle: (C*r^2, H, W) -> (C, H*r, W*r), routing only."""
    return functional_pixel_shuffle(x, module.upscale_factor)


def pixel_unshuffle(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """PixelUnshuffle: (C, H*r, W*r) -> (C*r^2, H, W), routing only."""
    return functional_pixel_unshuffle(x, module.downscale_factor)


def fold_module(module: nn.Fold, attrs: Attributes, x: SymTensor) -> LayerCost:
    """nn.Fold: as F.fold."""
    return fold(x, module.output_size, module.kernel_size, module.dilation, module.padding,
                module.stride)


def unfold_module(module: nn.Unfold, attrs: Attributes, x: SymTensor) -> LayerCost:
    """Unfold (im2col): routing only; (B, C, H, W) -> (B, C*Kh*Kw, sliding positions)."""
    return unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)


def padding_module(module: nn.Module, attrs: Attributes, x: SymTensor) -> LayerCost:
    """ZeroPad2d, ConstantPad, ReflectionPad, ReplicationPad: routing only."""
    return pad(x, tuple(module.padding))


MODULE_RULES: dict[type, Callable[..., LayerCost]] = {
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.ConvTranspose1d: conv_transpose,
    nn.ConvTranspose2d: conv_transpose,
    nn.ConvTranspose3d: conv_transpose,
    nn.Linear: linear,
    nn.MaxPool1d: max_pool,
    nn.MaxPool2d: max_pool,
    nn.MaxPool3d: max_pool,
    nn.AvgPool1d: avg_pool,
    nn.AvgPool2d: avg_pool,
    nn.AvgPool3d: avg_pool,
    nn.AdaptiveAvgPool1d: adaptive_pool,
    nn.AdaptiveAvgPool2d: adaptive_pool,
    nn.AdaptiveAvgPool3d: adaptive_pool,
    nn.AdaptiveMaxPool1d: adaptive_pool,
    nn.AdaptiveMaxPool2d: adaptive_pool,
    nn.AdaptiveMaxPool3d: adaptive_pool,
    nn.BatchNorm1d: batch_norm2d,
    nn.BatchNorm2d: batch_norm2d,
    nn.BatchNorm3d: batch_norm2d,
    nn.InstanceNorm1d: instance_norm,
    nn.InstanceNorm2d: instance_norm,
    nn.InstanceNorm3d: instance_norm,
    nn.RMSNorm: rms_norm,
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
    nn.LogSoftmax: activation,
    nn.SELU: activation,
    nn.CELU: activation,
    nn.Softplus: activation,
    nn.Softsign: activation,
    nn.Hardtanh: activation,
    nn.Tanhshrink: activation,
    nn.GLU: glu_module,
    nn.Dropout: dropout,
    nn.Dropout1d: dropout,
    nn.Dropout2d: dropout,
    nn.Dropout3d: dropout,
    nn.AlphaDropout: dropout,
    nn.FeatureAlphaDropout: dropout,
    nn.MultiheadAttention: multihead_attention,
    nn.LSTM: lstm,
    nn.PixelShuffle: pixel_shuffle,
    nn.PixelUnshuffle: pixel_unshuffle,
    nn.ZeroPad1d: padding_module,
    nn.ZeroPad2d: padding_module,
    nn.ZeroPad3d: padding_module,
    nn.ConstantPad1d: padding_module,
    nn.ConstantPad2d: padding_module,
    nn.ConstantPad3d: padding_module,
    nn.ReflectionPad1d: padding_module,
    nn.ReflectionPad2d: padding_module,
    nn.ReflectionPad3d: padding_module,
    nn.ReplicationPad1d: padding_module,
    nn.ReplicationPad2d: padding_module,
    nn.ReplicationPad3d: padding_module,
    nn.Identity: identity,
    nn.Flatten: flatten_module,
    nn.Upsample: upsample,
    nn.Unfold: unfold_module,
    nn.Fold: fold_module,
}


# --- function rules: (*args, **kwargs) with SymTensor arguments -> LayerCost | PlainValue ------


def _flatten(x: SymTensor, start_dim: int = 0, end_dim: int = -1) -> SymTensor:
    dims = list(x.shape)
    start, end = start_dim % len(dims), end_dim % len(dims)
    merged = sp.Mul(*dims[start : end + 1])
    return SymTensor(tuple(dims[:start] + [merged] + dims[end + 1 :]))


def _exact_scale(scale: Any) -> sp.Expr:
    """Return a scale factor as an exact number (2.0 -> 2, 0.5 -> 1/2); nsimplify, which
    parses the float's text, only for a non-integral one."""
    if isinstance(scale, (int, float)) and float(scale).is_integer():
        return sp.Integer(int(scale))
    return sp.nsimplify(scale)


# connections per output value by interpolation mode (the input values each output reads)
INTERPOLATION_READS = {"nearest": 1, "nearest-exact": 1, "linear": 2, "bilinear": 4,
                       "bicubic": 16, "trilinear": 8}


def _interpolate(x: SymTensor, size: Any, scale_factor: Any, mode: str,
                 antialias: bool = False) -> LayerCost:
    sizes_in = _sizes(x, "interpolation")
    count = len(sizes_in)
    if size is not None:
        sizes = tuple(sp.sympify(s) for s in _ntuple(size, count))
    else:
        scales = (_exact_scale(s) for s in _ntuple(scale_factor, count))
        sizes = tuple(sp.floor(d * s) for d, s in zip(sizes_in, scales, strict=True))
    output = _with_spatial(x, x.shape[1], *sizes)
    if mode not in INTERPOLATION_READS:
        raise UnsupportedLayer(f"interpolation mode {mode!r} has no connection rule")
    # the 2-d op keeps its name (the presets count aten::upsample_nearest2d and friends); the
    # 1-d and 3-d ones are named apart, as the tools see other ATen ops there
    op = f"upsample_{mode}" if count == 2 else f"upsample_{mode}{count}d"
    if antialias and mode in ("bilinear", "bicubic"):
        op += "_aa"  # another ATen op (aten::_upsample_bilinear2d_aa), which fvcore does not count
    return LayerCost(
        "upsample", output, connections=output.per_example * INTERPOLATION_READS[mode], op=op
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
    """F.interpolate: nearest 1 connection per output, bilinear 4, bicubic 16 (antialiased
    too: the same reads per output, under an op of its own)."""
    return _interpolate(x, size, scale_factor, mode, bool(antialias))


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


COMPARISONS = {operator.eq: sp.Eq, operator.ne: sp.Ne, operator.lt: sp.Lt, operator.le: sp.Le,
               operator.gt: sp.Gt, operator.ge: sp.Ge}
# a relation's sympy text ('>=') -> the Python operator that tests it on numbers or arrays
RELATIONS = {relation.rel_op: test for test, relation in COMPARISONS.items()}


@functools.lru_cache(maxsize=16384, typed=True)  # a block repeated per stage tests a size again
def _relation(relation: Any, a: int | sp.Expr, b: int | sp.Expr) -> Any:
    return COMPARISONS[relation](a, b)


def comparison(relation: Any) -> Callable[..., LayerCost | PlainValue]:
    """Return the rule of ==, !=, <, <=, >, >=: on tensors one connection per output (Swin's
    mask != 0), on sizes the sympy relation (a branch the forward takes on the input size)."""

    def rule(a: Any, b: Any) -> LayerCost | PlainValue:
        if isinstance(a, SymTensor) or isinstance(b, SymTensor):
            shape, requires = (a if isinstance(a, SymTensor) else b).shape, ()
            if isinstance(a, SymTensor) and isinstance(b, SymTensor):
                shape, requires = _broadcast(a.shape, b.shape)
            output = SymTensor(tuple(shape))
            return LayerCost("elementwise", output, connections=output.per_example,
                             requires=requires)
        if isinstance(a, (int, sp.Expr)) and isinstance(b, (int, sp.Expr)):
            return PlainValue(_relation(relation, a, b))
        return PlainValue(None)  # other Python values: compared as Python does

    rule.__doc__ = f"{relation.__name__}: a comparison (sizes: the sympy relation)."
    return rule


def addcmul(x: Any, tensor1: Any, tensor2: Any, *args, **kwargs) -> LayerCost:
    """torch.addcmul / addcdiv (x + value * t1 * t2): 1 connection per tensor operand per output."""
    tensors = [v for v in (x, tensor1, tensor2) if isinstance(v, SymTensor)]
    shape, requires = tensors[0].shape, ()
    for tensor in tensors[1:]:
        shape, more = _broadcast(shape, tensor.shape)
        requires += more
    output = SymTensor(shape)
    return LayerCost("elementwise", output, connections=len(tensors) * output.per_example,
                     requires=requires)


def unary_elementwise(x: SymTensor, *args, **kwargs) -> LayerCost | PlainValue:
    """F.relu, torch.sigmoid, ...: 1 connection per output (on a size, ~n or -n: Python's)."""
    if not isinstance(x, SymTensor):
        return PlainValue(None)  # marker: evaluate as Python arithmetic
    return LayerCost("activation", same_shape(x), connections=x.per_example)


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
    # without a -1, the sizes must hold every value: with floors kept (--exact), a window
    # partition view(B, H // 7, 7, W // 7, 7, C) runs only where 7 divides H and W
    requires = () if -1 in shape else must_agree(known, total, "a view keeps every value")
    return LayerCost(
        "routing",
        SymTensor(tuple(_quotient(total, known) if s == -1 else sp.sympify(s) for s in shape)),
        requires=requires,
    )


@functools.lru_cache(maxsize=4096)
def _quotient(total: sp.Expr, known: sp.Expr) -> sp.Expr:
    """Return total / known, cancelled; sympy's simplify only when cancelling leaves a symbolic
    denominator (simplify on DaViT's padded window sizes ran for minutes). Remembered: a
    model's repeated blocks reshape the same sizes (cancel took 0.3 s of pvt_v2_b0's 0.7 s)."""
    quotient = sp.cancel(total / known)
    if not sp.fraction(quotient)[1].free_symbols:
        return quotient
    # a size padded to a multiple of n, h + (n - h % n) % n, divides n * floor(that / n) only
    # once Mod(a, n) is written a - n * floor(a / n) (DaViT's and Swin's windows)
    def floors(expression: sp.Expr) -> sp.Expr:
        return sp.expand(expression.replace(sp.Mod, lambda a, n: a - n * sp.floor(a / n)))

    quotient = sp.cancel(floors(floors(total)) / floors(floors(known)))
    if not sp.fraction(quotient)[1].free_symbols:
        return quotient
    operations = sp.count_ops(total / known)
    if operations > SIMPLIFY_LIMIT:
        raise NoClosedForm(
            f"a view's -1 size, {operations} operations of floors and "
            "remainders, does not reduce to a closed form here; use --capture concrete"
        )
    return sp.simplify(total / known)


SIMPLIFY_LIMIT = 150  # operations; larger quotients took sympy's simplify minutes (DaViT)


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
    return LayerCost("routing", same_shape(x))


def chunk(x: SymTensor, chunks: int, dim: int = 0) -> LayerCost:
    """Tensor.chunk: routing only. A known size takes PyTorch's pieces, ceil(size / chunks)
    each and the rest last (timm edgenext_xx_small chunks 88 channels into 30, 30, 28); a
    symbolic size is split in equal parts (the formulas then assume it divides)."""
    dim = _dim_index(x, dim)
    size = sp.sympify(x.shape[dim])
    if size.is_Integer and int(size) % chunks:
        piece = -(-int(size) // chunks)
        count = -(-int(size) // piece)  # PyTorch may return fewer than `chunks`
        pieces = [sp.Integer(piece)] * (count - 1) + [size - piece * (count - 1)]
    else:
        pieces = [size / chunks] * chunks
    return LayerCost("routing", tuple(
        SymTensor(tuple(p if i == dim else d for i, d in enumerate(x.shape))) for p in pieces))


def mean(x: SymTensor, dim=None, keepdim: bool = False, **kwargs) -> LayerCost:
    """Tensor.mean over dims: each input value feeds one output, 1 connection per input."""
    dims = range(len(x.shape)) if dim is None else [d % len(x.shape) for d in _pair(dim)]
    shape = [sp.Integer(1) if i in dims else s for i, s in enumerate(x.shape)]
    if not keepdim:
        shape = [s for i, s in enumerate(shape) if i not in dims]
    return LayerCost("adaptive_pool", SymTensor(tuple(shape)), connections=x.per_example)


def vector_norm(x: SymTensor, p: Any = 2, dim: Any = None, keepdim: bool = False, *args,
                **kwargs) -> LayerCost:
    """Tensor.norm / torch.linalg.vector_norm over dims: 1 connection per input value."""
    return replace(mean(x, dim, keepdim), kind="norm", op="vector_norm")


def functional_adaptive_avg_pool2d(
    x: SymTensor, output_size: Any, return_indices: bool = False
) -> LayerCost:
    """F.adaptive_avg_pool1d/2d/3d / F.adaptive_max_pool1d/2d/3d: as the modules."""
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
    """F.max_pool1d/2d/3d / F.avg_pool1d/2d/3d: as the modules."""
    return _pool(x, kernel_size, stride, padding, dilation, ceil_mode)


def setitem(container: Any, index: Any, value: Any) -> LayerCost:
    """Item assignment `x[index] = value` (timm ConViT's relative indices): routing, with no
    output of its own (it writes into x and returns None)."""
    if not isinstance(container, SymTensor):
        raise UnsupportedLayer(f"item assignment into {type(container).__name__}, not a tensor")
    if not isinstance(getitem(container, index), LayerCost):
        raise UnsupportedLayer(f"item assignment at {index!r}: expected a region of a tensor")
    return LayerCost("routing", None, op="setitem")


def getitem(container: Any, index: Any) -> LayerCost | PlainValue:
    """Indexing: on a tensor, routing (basic slices only); on anything else, plain Python."""
    if not isinstance(container, SymTensor):
        return PlainValue(operator.getitem(container, index))
    index = index if isinstance(index, tuple) else (index,)
    if any(item is Ellipsis for item in index):  # x[..., :n]: as many full slices as it stands for
        if sum(item is Ellipsis for item in index) > 1:
            raise UnsupportedLayer(f"indexing with two ... ({index})")
        at = next(i for i, item in enumerate(index) if item is Ellipsis)
        taken = sum(item is not None for item in index) - 1
        index = (*index[:at], *[slice(None)] * (len(container.shape) - taken), *index[at + 1 :])
    if any(isinstance(item, list) for item in index):  # x[:, [0, 8, 1]]: a list of positions
        for item in index:
            if isinstance(item, list) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in item
            ):
                raise UnsupportedLayer(f"indexing with a list of non-integers ({item[:8]})")
        listed = {i for i, item in enumerate(index) if isinstance(item, list)}
        index = tuple(SymTensor((sp.Integer(len(item)),)) if isinstance(item, list) else item
                      for item in index)
        return _advanced_getitem(container, index, not_masks=listed)
    if any(isinstance(item, SymTensor) for item in index):
        return _advanced_getitem(container, index)
    if any(item is None for item in index):  # x[:, None]: a new dimension of 1
        sizes = iter(container.shape)
        container = SymTensor(
            tuple(sp.Integer(1) if item is None else next(sizes) for item in index)
            + tuple(sizes)
        )
        index = tuple(slice(None) if item is None else item for item in index)
    shape = []
    for position, size in enumerate(container.shape):
        item = index[position] if position < len(index) else slice(None)
        if isinstance(item, int):
            continue
        if item is None:
            shape.append(sp.Integer(1))
            continue
        if item is Ellipsis:
            raise UnsupportedLayer(f"indexing with ... ({index})")
        if not isinstance(item, slice):
            raise UnsupportedLayer(
                f"indexing with {type(item).__name__} (expected ints and slices), got {item}"
            )
        if item != slice(None):
            shape.append(_slice_length(size, item))
        else:
            shape.append(size)
    return LayerCost("routing", SymTensor(tuple(shape)))


def _advanced_getitem(container: SymTensor, index: tuple, not_masks: set[int] = frozenset()
                      ) -> LayerCost:
    """x[idx], x[:, idx] with integer index tensors (a relative-position bias table read through
    its index buffer): a gather, no arithmetic. The indexed dimensions are replaced by the index
    shape, in place when the tensor (and int) indices are adjacent, else in front (PyTorch's
    rule). An index shaped like the dimensions it indexes may be a boolean mask, whose result
    size depends on the values: it is refused."""
    if any(item is None for item in index):
        raise UnsupportedLayer(f"indexing with None next to an index tensor ({index})")
    if len(index) > len(container.shape):
        raise UnsupportedLayer(f"too many indices for a tensor of {len(container.shape)} dims")
    tensors = [item for item in index if isinstance(item, SymTensor)]
    shapes_seen = {tuple(t.shape) for t in tensors}
    if len(shapes_seen) != 1:
        raise UnsupportedLayer(f"index tensors of different shapes {sorted(map(str, shapes_seen))}")
    index_shape = tensors[0].shape
    advanced = [i for i, item in enumerate(index)
                if isinstance(item, SymTensor) or isinstance(item, int)]
    for position, item in enumerate(index):
        if isinstance(item, SymTensor) and position not in not_masks:
            indexed = tuple(container.shape[position : position + len(item.shape)])
            if len(item.shape) == len(indexed) and all(
                _same_size(a, b) for a, b in zip(item.shape, indexed, strict=True)
            ):
                raise UnsupportedLayer(
                    f"indexing with a tensor shaped like the dimensions it indexes "
                    f"({tuple(item.shape)}): a boolean mask's result depends on its values"
                )
    kept: list[tuple[int, sp.Expr]] = []
    for position, size in enumerate(container.shape):
        item = index[position] if position < len(index) else slice(None)
        if position in advanced:
            continue
        if not isinstance(item, slice):
            raise UnsupportedLayer(f"indexing with {type(item).__name__} next to an index tensor")
        kept.append((position, size if item == slice(None) else _slice_length(size, item)))
    adjacent = advanced == list(range(advanced[0], advanced[-1] + 1))
    before = [size for position, size in kept if adjacent and position < advanced[0]]
    after = [size for position, size in kept if not adjacent or position > advanced[-1]]
    bounds = tuple(
        bound for position, item in enumerate(index) if isinstance(item, SymTensor)
        for bound in index_bounds(item, container.shape[position], position))
    return LayerCost("routing", SymTensor((*before, *index_shape, *after)), op="index",
                     extra=(("index_values", sp.Mul(*index_shape)),), bounds=bounds)


def index_bounds(index: SymTensor, size: sp.Expr, dimension: int
                  ) -> tuple[tuple[sp.Expr, str], ...]:
    """Return the margins an index whose values are known from sizes leaves inside a dimension
    of `size` (PyTorch reads -size..size-1): none for an index read from a buffer."""
    if index.value_range is None or any(sp.sympify(v).has(BATCH)
                                        for v in (*index.value_range, size)):
        return ()  # positions over the batch (arange(B)): not a size of the input
    least, greatest = index.value_range
    return (
        (sp.sympify(size - 1 - greatest),
         f"its index reaches {greatest} in dimension {dimension} of size {size}"),
        (sp.sympify(least + size),
         f"its index goes down to {least} in dimension {dimension} of size {size}"),
    )


def _same_size(a: Any, b: Any) -> bool:
    """Return True when sizes `a` and `b` are equal for every value of their symbols: a
    difference that is not 0 at some sizes is decided there, without simplify (seconds on
    timm MViTv2's pooled relative positions)."""
    difference = sp.sympify(a - b)
    if difference.is_number:
        return difference == 0
    symbols = sorted(difference.free_symbols, key=str)
    for values in ((224,) * len(symbols), tuple(range(97, 97 + 31 * len(symbols), 31))):
        if difference.subs(dict(zip(symbols, values, strict=True))) != 0:
            return False
    return sp.simplify(difference) == 0


def _slice_length(size: sp.Expr, item: slice) -> sp.Expr:
    """Return the length of x[start:stop] along a dimension of `size` (step 1 when symbolic)."""
    bounds = [item.start, item.stop, item.step]
    size = sp.sympify(size)
    if size.is_Integer and all(isinstance(v, int) or v is None for v in bounds):
        return sp.Integer(len(range(*item.indices(int(size)))))
    if item.step not in (None, 1) or not all(
        v is None or isinstance(v, (int, sp.Expr)) for v in (item.start, item.stop)
    ):
        raise UnsupportedLayer(
            f"slicing a dimension of {size} with {item}: expected integer or symbolic bounds "
            "and step 1"
        )

    def position(bound: Any, default: sp.Expr) -> sp.Expr:
        if bound is None:
            return default
        bound = sp.sympify(bound)
        return size + bound if bound.is_number and bound < 0 else bound

    # the dimension is assumed long enough for the bounds
    return position(item.stop, size) - position(item.start, sp.Integer(0))


def size(x: SymTensor, dim: int | None = None) -> PlainValue:
    """Tensor.size(): the symbolic shape (not a layer)."""
    return PlainValue(x.shape if dim is None else x.shape[dim])


def stochastic_depth(x: SymTensor, p: float, mode: str, training: bool = True) -> LayerCost:
    """torchvision's stochastic depth: the identity at inference, which is what is analysed."""
    return LayerCost("routing", same_shape(x))


def _getattr(x: Any, name: str) -> PlainValue:
    if isinstance(x, SymTensor) and name == "shape":
        return PlainValue(x.shape)
    if isinstance(x, SymTensor) and name == "ndim":
        return PlainValue(len(x.shape))
    if isinstance(x, SymTensor) and name == "dtype":
        return PlainValue(torch.float32)  # analysed networks run in float32
    if isinstance(x, SymTensor) and name == "device":
        return PlainValue(torch.device("cpu"))
    if isinstance(x, SymTensor) and name == "is_cuda":
        return PlainValue(False)
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


def _dim_index(x: SymTensor, dim: int) -> int:
    return dim % len(x.shape)


def split(x: SymTensor, split_size_or_sections: Any, dim: int = 0) -> LayerCost:
    """torch.split / Tensor.split: routing only; pieces of a given size or given sizes."""
    dim = _dim_index(x, dim)
    size = x.shape[dim]
    if isinstance(split_size_or_sections, (tuple, list)):
        pieces = [sp.sympify(p) for p in split_size_or_sections]
        requires = must_agree(sp.Add(*pieces), size, f"the sections must add up to dimension {dim}")
    else:
        piece = sp.sympify(split_size_or_sections)
        if not (size / piece).is_integer:
            if not size.is_Integer:
                raise UnsupportedLayer(
                    f"split of a symbolic dimension ({size}) into pieces of {piece}: "
                    "expected the size to be a known multiple of the piece"
                )
            count = -(-int(size) // int(piece))
            pieces = [piece] * (count - 1) + [size - piece * (count - 1)]
        else:
            pieces = [piece] * int(size / piece)
        requires = ()
    outputs = tuple(
        SymTensor(tuple(p if i == dim else d for i, d in enumerate(x.shape))) for p in pieces
    )
    return LayerCost("routing", outputs, op="split", requires=requires)


def unbind(x: SymTensor, dim: int = 0) -> LayerCost:
    """torch.unbind / Tensor.unbind: routing only; one tensor per index of `dim`."""
    dim = _dim_index(x, dim)
    if not x.shape[dim].is_Integer:
        raise UnsupportedLayer(f"unbind along a symbolic dimension ({x.shape[dim]})")
    shape = tuple(d for i, d in enumerate(x.shape) if i != dim)
    return LayerCost(
        "routing", tuple(SymTensor(shape) for _ in range(int(x.shape[dim]))), op="unbind"
    )


def pad(x: SymTensor, pad: Sequence[int], mode: str = "constant", value: Any = None) -> LayerCost:
    """F.pad: routing only; pad (left, right, top, bottom, ...) from the last dimension back."""
    shape = list(x.shape)
    for index in range(len(pad) // 2):
        axis = len(shape) - 1 - index
        shape[axis] = shapes.rounded_up(shape[axis] + pad[2 * index] + pad[2 * index + 1])
    return LayerCost("routing", SymTensor(tuple(shape)), op="pad")


def same_padding(x: SymTensor, kernel_size: Any, stride: Any, dilation: Any = (1, 1),
                 value: Any = 0) -> LayerCost:
    """timm's pad_same (TensorFlow 'SAME'): pads H by max((ceil(H/s) - 1) s + (K - 1) d + 1 - H, 0)
    so that a stride-s window then gives ceil(H/s); routing only."""
    shape = list(x.shape)
    for axis, k, s, d in zip((-2, -1), _pair(kernel_size), _pair(stride), _pair(dilation)):
        size = sp.sympify(shape[axis])
        reach = (k - 1) * d + 1
        padding = (sp.ceiling(size / s) - 1) * s + reach - size
        if size.is_Integer:
            shape[axis] = size + max(int(padding), 0)
        elif reach >= s:  # the padding is never negative
            shape[axis] = sp.expand(size + padding)
        elif reach == 1:  # a 1x1 window: never padded
            shape[axis] = size
        else:
            raise UnsupportedLayer(
                f"'SAME' padding of a {k}-wide window (dilation {d}) with stride {s} pads by "
                f"max({padding}, 0), which has no closed form here; use --capture concrete"
            )
    return LayerCost("routing", SymTensor(tuple(shape)), op="pad_same")


def patch_merging_pad(x: SymTensor) -> LayerCost:
    """torchvision Swin's _patch_merging_pad on (..., H, W, C): H and W padded to even, each 2x2
    neighbourhood gathered into the channels, (..., ceil(H/2), ceil(W/2), 4C); routing only."""
    if len(x.shape) < 3:
        raise UnsupportedLayer(f"_patch_merging_pad expected (..., H, W, C), got {x.shape}")
    *lead, height, width, channels = x.shape
    output = SymTensor((*lead, sp.ceiling(height / 2), sp.ceiling(width / 2), 4 * channels))
    return LayerCost("routing", output, op="patch_merging_pad")


def relative_position_bias(table: SymTensor, index: SymTensor, window_size: Sequence[int]
                           ) -> LayerCost:
    """torchvision Swin's _get_relative_position_bias: the (positions, heads) table read through
    its index buffer (a gather), returned as (1, heads, N, N), N the window's area."""
    area = sp.Integer(window_size[0] * window_size[1])
    return LayerCost("routing", SymTensor((sp.Integer(1), table.shape[-1], area, area)),
                     op="index")


def shifted_window_attention(
    x: SymTensor, qkv_weight: SymTensor, proj_weight: SymTensor, relative_position_bias: Any,
    window_size: Sequence[int], num_heads: int, shift_size: Sequence[int],
    attention_dropout: float = 0.0, dropout: float = 0.0, qkv_bias: Any = None,
    proj_bias: Any = None, logit_scale: Any = None, training: bool = True,
) -> LayerCost:
    """torchvision Swin's shifted_window_attention on (B, H, W, C): H and W padded up to whole
    windows, then per token the q/k/v and output projections' multiply-adds and, per window of
    N tokens, Q·K^T and A·V (N·C each per token). The shift moves tokens and masks scores: no
    multiply-adds (softmax, scale, bias and mask not counted, as for MultiheadAttention)."""
    if len(x.shape) != 4:
        raise UnsupportedLayer(f"shifted_window_attention expected (B, H, W, C), got {x.shape}")
    _, height, width, channels = x.shape
    padded = [w * sp.ceiling(size / w) for size, w in zip((height, width), window_size)]
    tokens = padded[0] * padded[1]  # per example, after padding to whole windows
    area = window_size[0] * window_size[1]
    requires = must_agree(qkv_weight.shape[1], channels, "qkv_weight's inputs must equal C")
    projected = qkv_weight.shape[0] + proj_weight.shape[0]
    linear_macs = tokens * channels * projected
    attention_macs = 2 * tokens * area * channels
    biases = (qkv_weight.shape[0] if qkv_bias is not None else 0) + (
        proj_weight.shape[0] if proj_bias is not None else 0)
    linear_params = (sp.Mul(*qkv_weight.shape) + sp.Mul(*proj_weight.shape) + biases)
    return LayerCost(
        "attention", same_shape(x), connections=linear_macs + attention_macs,
        bias_connections=tokens * biases, op="shifted_window_attention", requires=requires,
        extra=(
            ("linear_macs", linear_macs),
            ("attention_macs", attention_macs),
            ("scores", tokens * area * num_heads),
            # v1 runs both products as Tensor.matmul; v2 (cosine attention) runs Q·K^T as @
            ("matmul_method_macs", attention_macs / (1 if logit_scale is None else 2)),
            ("linear_params", linear_params),
        ),
    )


# functions of optional libraries, by import path (the library need not be installed); the
# tracer keeps them as one call (their Python branches on sizes) and counts them with the rule
def coordinate_grid(feat_shape: Sequence[Any], *args: Any, ndim: int | None = None,
                    **kwargs: Any) -> LayerCost | PlainValue:
    """timm's _build_grid(feat_shape): the (*feat_shape, len(feat_shape)) coordinates rotary
    and sin-cos embeddings are computed over (qwen3_vit, deepseek_vit), a table built from
    sizes: routing. With numbers for sizes, timm's own function (a constant)."""
    feat_shape = tuple(feat_shape)
    if all(isinstance(s, int) or isinstance(s, sp.Expr) and s.is_number for s in feat_shape):
        return PlainValue(None)
    if ndim is not None and len(feat_shape) != ndim:
        raise UnsupportedLayer(f"expected {ndim} spatial dimensions, got {len(feat_shape)}")
    return LayerCost("routing", SymTensor((*map(sp.sympify, feat_shape), len(feat_shape))),
                     op="coordinate_grid")


OPTIONAL_FUNCTIONS: dict[str, Callable[..., LayerCost]] = {
    "timm.layers.padding.pad_same": same_padding,
    "timm.layers.pos_embed_sincos._build_grid": coordinate_grid,
    "torchvision.models.swin_transformer._patch_merging_pad": patch_merging_pad,
    "torchvision.models.swin_transformer._get_relative_position_bias": relative_position_bias,
    "torchvision.models.swin_transformer.shifted_window_attention": shifted_window_attention,
}


def optional_function_rules() -> dict[Any, Callable[..., LayerCost]]:
    """Return {function: rule} for the OPTIONAL_FUNCTIONS whose library is already imported."""
    found = {}
    for path, rule in OPTIONAL_FUNCTIONS.items():
        module_name, _, name = path.rpartition(".")
        function = getattr(sys.modules.get(module_name), name, None)
        if function is not None:
            found[function] = rule
    return found


def same_shape_routing(x: SymTensor, *args, **kwargs) -> LayerCost:
    """roll, flip, dtype/device casts, contiguous: routing only, shape unchanged."""
    return LayerCost("routing", same_shape(x))


def unsqueeze(x: SymTensor, dim: int) -> LayerCost:
    """Tensor.unsqueeze: routing only."""
    shape = list(x.shape)
    shape.insert(dim % (len(shape) + 1), sp.Integer(1))
    return LayerCost("routing", SymTensor(tuple(shape)))


def squeeze(x: SymTensor, dim: Any = None) -> LayerCost:
    """Tensor.squeeze: routing only; drops the size-1 dimensions named (or all)."""
    dims = range(len(x.shape)) if dim is None else [d % len(x.shape) for d in _pair(dim)]
    shape = tuple(d for i, d in enumerate(x.shape) if not (i in dims and d == 1))
    return LayerCost("routing", SymTensor(shape))


def expand(x: SymTensor, *sizes) -> LayerCost:
    """Tensor.expand: routing only; -1 keeps a size."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    offset = len(sizes) - len(x.shape)
    shape = tuple(
        x.shape[i - offset] if (s == -1 and i >= offset) else sp.sympify(s)
        for i, s in enumerate(sizes)
    )
    return LayerCost("routing", SymTensor(shape))


def expand_as(x: SymTensor, other: SymTensor) -> LayerCost:
    """Tensor.expand_as, view_as, reshape_as: routing only, the other tensor's shape."""
    return LayerCost("routing", SymTensor(other.shape))


def repeat(x: SymTensor, *sizes) -> LayerCost:
    """Tensor.repeat: routing only (copies)."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    shape = (sp.Integer(1),) * (len(sizes) - len(x.shape)) + tuple(x.shape)
    return LayerCost("routing", SymTensor(tuple(d * r for d, r in zip(shape, sizes, strict=True))))


def tile(x: SymTensor, *sizes) -> LayerCost:
    """Tensor.tile: routing only (copies); fewer sizes than dimensions repeat the last ones."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return repeat(x, *((1,) * (len(x.shape) - len(sizes)) + tuple(sizes)))


def repeat_interleave(x: SymTensor, repeats: Any, dim: int | None = None, *,
                      output_size: Any = None) -> LayerCost:
    """Tensor.repeat_interleave with a number of repeats: routing only (copies); dimension
    `dim` (the flattened tensor when None) grows `repeats` times."""
    if isinstance(repeats, SymTensor):
        raise UnsupportedLayer(
            "repeat_interleave with a tensor of repeats: its output size depends on the "
            "tensor's values; pass --allow-unknown to count it from the running network")
    if dim is None:
        return LayerCost("routing", SymTensor((sp.Mul(*x.shape) * repeats,)))
    shape = list(x.shape)
    shape[_dim_index(x, dim)] *= repeats
    return LayerCost("routing", SymTensor(tuple(shape)))


def stack(tensors: Sequence[SymTensor], dim: int = 0) -> LayerCost:
    """torch.stack: routing only; a new dimension of len(tensors)."""
    shape = list(tensors[0].shape)
    shape.insert(dim % (len(shape) + 1), sp.Integer(len(tensors)))
    return LayerCost("routing", SymTensor(tuple(shape)), op="stack")


def unflatten(x: SymTensor, dim: int, sizes: Sequence[Any]) -> LayerCost:
    """Tensor.unflatten: routing only."""
    dim = _dim_index(x, dim)
    sizes = [sp.sympify(s) for s in sizes]
    if -1 in sizes:
        known = sp.Mul(*(s for s in sizes if s != -1))
        sizes = [sp.simplify(x.shape[dim] / known) if s == -1 else s for s in sizes]
    return LayerCost("routing", SymTensor((*x.shape[:dim], *sizes, *x.shape[dim + 1 :])))


def functional_dropout(x: SymTensor, p: float = 0.5, training: bool = True, *args, **kwargs):
    """F.dropout and its 1d/2d/3d/alpha variants: the identity in eval (0 connections)."""
    if training:
        return LayerCost("elementwise", same_shape(x), connections=x.per_example,
                         op="dropout")
    return LayerCost("routing", same_shape(x), op="dropout")


def _matmul_shapes(a: tuple, b: tuple) -> tuple[tuple, sp.Expr, tuple]:
    """Return (output shape, contracted size, size agreements) of a @ b (numpy rules)."""
    a_shape = (sp.Integer(1), *a) if len(a) == 1 else tuple(a)
    b_shape = (*b, sp.Integer(1)) if len(b) == 1 else tuple(b)
    requires = must_agree(a_shape[-1], b_shape[-2], "the inner dimensions must agree")
    batch, more = _broadcast(a_shape[:-2], b_shape[:-2])
    shape = (*batch, a_shape[-2], b_shape[-1])
    if len(a) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(b) == 1:
        shape = shape[:-1]
    return shape, a_shape[-1], requires + more


def _per_example(shape: Sequence[sp.Expr]) -> sp.Expr:
    return SymTensor(tuple(shape)).per_example


def matmul(a: SymTensor, b: SymTensor, **kwargs) -> LayerCost:
    """matmul / @ / bmm / mm: one multiply-add per output value and contracted index."""
    if not (isinstance(a, SymTensor) and isinstance(b, SymTensor)):
        raise UnsupportedLayer(f"matmul expected two tensors, got {type(a).__name__}, "
                               f"{type(b).__name__}")
    shape, inner, requires = _matmul_shapes(a.shape, b.shape)
    output = SymTensor(shape)
    macs = output.per_example * inner
    # fvcore and ptflops: prod(a.shape) * b.shape[-1] (equal to macs unless a is broadcast)
    left = _per_example(a.shape) * (b.shape[-1] if len(b.shape) > 1 else 1)
    return LayerCost(
        "matmul", output, connections=macs, op="matmul", requires=requires,
        extra=(("left_macs", left),),
    )


def baddbmm(bias: SymTensor, a: SymTensor, b: SymTensor, **kwargs) -> LayerCost:
    """addmm / baddbmm: the product's multiply-adds; the added term is one more per output."""
    cost = matmul(a, b)
    return replace(cost, op="baddbmm", extra=(*cost.extra, ("added", cost.outputs)))


def addmm(bias: SymTensor, a: SymTensor, b: SymTensor, **kwargs) -> LayerCost:
    """torch.addmm: as baddbmm, for matrices."""
    return replace(baddbmm(bias, a, b), op="addmm")


class FvcoreEinsum(sp.Function):
    """fvcore's einsum count from numpy's optimal flop count: numpy prints it as '%.3e', fvcore
    parses that text and halves it (jit_handles.py einsum_flop_jit).
    """

    @classmethod
    def eval(cls, flops):  # noqa: D102 - sympy's hook
        if flops.is_Integer:
            return sp.Integer(fvcore_einsum_count(int(flops)))
        return None


def fvcore_einsum_count(flops: Any) -> Any:
    """Return floor(float('%.3e' % flops) / 2) for an int or an object array of ints."""
    if hasattr(flops, "shape"):
        import numpy as np

        return np.array([fvcore_einsum_count(int(f)) for f in flops.ravel()], dtype=object
                        ).reshape(flops.shape)
    return int(math.floor(float(f"{int(flops):.3e}") / 2))


def einsum(equation: str, *operands) -> LayerCost:
    """torch.einsum: the product of the sizes of every index (one multiply-add each)."""
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = tuple(operands[0])
    equation = equation.replace(" ", "")
    inputs, _, result = equation.partition("->")
    terms = inputs.split(",")
    if "..." in equation or len(terms) != len(operands):
        raise UnsupportedLayer(
            f"einsum {equation!r} with {len(operands)} operands: expected one explicit term "
            "per operand and no '...'"
        )
    sizes: dict[str, sp.Expr] = {}
    requires: tuple = ()
    for term, operand in zip(terms, operands, strict=True):
        for letter, size in zip(term, operand.shape, strict=True):
            if letter in sizes:
                requires += must_agree(sizes[letter], size, f"einsum index {letter!r}")
            else:
                sizes[letter] = size
    if not result:
        result = "".join(sorted(k for k in sizes if inputs.count(k) == 1))
    output = SymTensor(tuple(sizes[letter] for letter in result))
    everything = sp.Mul(*sizes.values())
    batch = output.per_example / sp.Mul(*(sizes[letter] for letter in result))
    macs = everything * batch
    contracted = any(letter not in result for letter in sizes)
    # fvcore: numpy's einsum_path optimal flop count / 2 (two operands): the product of every
    # size when an index is summed over, half of it (floored) when none is
    fvcore = FvcoreEinsum(2 * macs if contracted or len(operands) != 2 else macs)
    return LayerCost(
        "matmul", output, connections=macs, op="einsum", requires=requires,
        extra=(
            ("einsum_fvcore", fvcore),
            ("einsum_contracted_macs", macs if contracted else sp.Integer(0)),
        ),
    )


def scaled_dot_product_attention(
    query: SymTensor, key: SymTensor, value: SymTensor, attn_mask: Any = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: Any = None, enable_gqa: bool = False,
) -> LayerCost:
    """F.scaled_dot_product_attention: Q·K^T and A·V multiply-adds (softmax not counted)."""
    length, depth = query.shape[-2], query.shape[-1]
    kv_length, value_depth = key.shape[-2], value.shape[-1]
    output = SymTensor((*query.shape[:-1], value_depth))
    heads = query.per_example / (length * depth)
    macs = heads * length * kv_length * (depth + value_depth)
    # the CPU's fused kernel takes 3-d and 4-d q, k, v; any other rank (hiera's mask units:
    # 5-d) runs the math path, whose two matmuls are mm / bmm calls a FLOP counter sees
    math_path = macs if len(query.shape) not in (3, 4) else sp.Integer(0)
    requires = must_agree(key.shape[-1], depth, "the query and key must agree in their last "
                          "dimension")
    if isinstance(attn_mask, SymTensor):  # a bias of fixed size (timm coatnet's relative
        # positions for 14x14 tokens) broadcasts to the scores at one size only
        _, agreements = _broadcast(attn_mask.shape, (*query.shape[:-2], length, kv_length))
        requires += tuple((a, b, what.replace("the operands", "the attention mask and scores"))
                          for a, b, what in agreements)
    return LayerCost("attention", output, connections=macs, op="scaled_dot_product_attention",
                     extra=(("math_path_macs", math_path),), requires=requires)


def functional_linear(x: SymTensor, weight: SymTensor, bias: Any = None) -> LayerCost:
    """F.linear with a parameter read in forward: as Linear (its weights go to this row)."""
    n_out, n_in = weight.shape
    requires = must_agree(x.shape[-1], n_in, "its input's last dimension must equal in_features")
    output = SymTensor((*x.shape[:-1], n_out))
    rows = x.per_example / x.shape[-1]
    has_bias = bias is not None
    return LayerCost(
        "linear", output, connections=rows * n_in * n_out,
        bias_connections=output.per_example if has_bias else sp.Integer(0), op="linear",
        macs_per_output=sp.sympify(n_in), requires=requires,
    )


def functional_conv(
    x: SymTensor, weight: SymTensor, bias: Any = None, stride: Any = 1, padding: Any = 0,
    dilation: Any = 1, groups: int = 1,
) -> LayerCost:
    """F.conv1d/2d/3d with a parameter read in forward: as the Conv module."""
    count = len(weight.shape) - 2
    sizes_in = _spatial_nd(x, count, f"conv{count}d")
    kernel = tuple(weight.shape[2:])
    if padding == "same":
        sizes = sizes_in
    else:
        padding = (0,) * count if padding == "valid" else _ntuple(padding, count)
        sizes = tuple(
            shapes.conv_output_size(size, int(k), s, p, d)
            for size, k, s, p, d in zip(
                sizes_in, kernel, _ntuple(stride, count), padding, _ntuple(dilation, count),
                strict=True,
            )
        )
    output = _with_spatial(x, weight.shape[0], *sizes)
    per_output = weight.shape[1] * sp.Mul(*kernel)
    has_bias = bias is not None
    mode = "_mode" if isinstance(padding, str) else ""
    return LayerCost(
        "conv", output, connections=output.per_example * per_output,
        bias_connections=output.per_example if has_bias else sp.Integer(0),
        op=f"conv{count}d{mode}", macs_per_output=per_output,
    )


def functional_norm(op: str, affine_index: int) -> Callable[..., LayerCost]:
    """Return the rule of F.layer_norm / group_norm / rms_norm / batch_norm / instance_norm."""

    def rule(x: SymTensor, *args, **kwargs) -> LayerCost:
        names = {"layer_norm": "weight", "group_norm": "weight", "rms_norm": "weight",
                 "batch_norm": "weight", "instance_norm": "weight"}
        weight = args[affine_index - 1] if len(args) >= affine_index else kwargs.get(names[op])
        name = op
        if op == "batch_norm":  # (input, running_mean, running_var, weight, bias, training, ...)
            training = args[4] if len(args) >= 5 else kwargs.get("training", False)
            if training is True:  # batch statistics, e.g. timm's weight standardisation
                name = "batch_norm_training"
        return LayerCost("norm", same_shape(x), connections=x.per_example, op=name,
                         affine=weight is not None)

    rule.__doc__ = f"F.{op}: 1 connection per output (its parameters go to this row)."
    return rule


def softmax(x: SymTensor, dim: int | None = None, *args, **kwargs) -> LayerCost:
    """F.softmax / Tensor.softmax: 1 connection per output."""
    extra = ()
    if dim is not None:
        extra = (("rows", x.per_example / x.shape[dim]),)
    return LayerCost("activation", same_shape(x), connections=x.per_example, extra=extra)


def reduction(x: SymTensor, dim=None, keepdim: bool = False, **kwargs) -> LayerCost:
    """Tensor.sum / amax / amin over dims: 1 connection per input value."""
    cost = mean(x, dim, keepdim)
    return replace(cost, kind="reduction")


def extremum(op: str) -> Callable[..., LayerCost | PlainValue]:
    """Return the rule of Tensor.max / min and torch.max / min (`op`: 'max' or 'min'; timm
    VOLO's head takes `aux.max(1)[0]`): over every value, one value; along `dim`, the values
    and their indices, that dimension reduced; 1 connection per input value either way.
    Against another tensor: element-wise, as torch.maximum."""
    def rule(x: SymTensor, dim: Any = None, keepdim: bool = False, *args, **kwargs
             ) -> LayerCost | PlainValue:
        if isinstance(dim, SymTensor) or not isinstance(x, SymTensor):
            return binary_elementwise(x, dim)
        dim = kwargs.pop("dim", dim)
        cost = replace(reduction(x, dim, keepdim), op=op)
        if dim is None:
            return cost
        return replace(cost, output=(cost.output, SymTensor(cost.output.shape)))

    return rule


def normalize(x: SymTensor, *args, **kwargs) -> LayerCost:
    """F.normalize (x / max(||x||_p, eps) along a dimension): 1 per value; fvcore and
    FlopCounterMode have no formula for its aten ops (0)."""
    return LayerCost("norm", same_shape(x), connections=x.per_example, op="normalize")


def glu(x: SymTensor, dim: int = -1) -> LayerCost:
    """F.glu: the halves along `dim` multiplied, 2 connections per output."""
    dim = _dim_index(x, dim)
    shape = tuple(d / 2 if i == dim else d for i, d in enumerate(x.shape))
    output = SymTensor(shape)
    return LayerCost("elementwise", output, connections=2 * output.per_example, op="glu")


def unfold(x: SymTensor, kernel_size: Any, dilation: Any = 1, padding: Any = 0,
           stride: Any = 1) -> LayerCost:
    """F.unfold (im2col): routing only; (B, C, H, W) -> (B, C*Kh*Kw, sliding positions)."""
    sizes = _spatial_nd(x, 2, "unfold")
    kernel, dilation, padding, stride = map(_pair, (kernel_size, dilation, padding, stride))
    positions = sp.Mul(*(
        shapes.conv_output_size(size, k, s, p, d)
        for size, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True)
    ))
    return LayerCost("routing", SymTensor((x.shape[0], x.shape[1] * kernel[0] * kernel[1],
                                           positions)), op="unfold")


def fold(x: SymTensor, output_size: Any, kernel_size: Any, dilation: Any = 1, padding: Any = 0,
         stride: Any = 1) -> LayerCost:
    """F.fold (col2im, unfold's inverse: timm VOLO's outlook attention): (B, C*Kh*Kw, L) ->
    (B, C, *output_size), each input value added into its output position, 1 connection per
    input value; L must be the sliding positions over output_size."""
    if len(x.shape) != 3:
        raise UnsupportedLayer(f"fold expected a 3-d (B, C*Kh*Kw, L) input, got shape "
                               f"{tuple(x.shape)}")
    output_size, kernel, dilation, padding, stride = map(
        _pair, (output_size, kernel_size, dilation, padding, stride))
    positions = sp.Mul(*(
        shapes.conv_output_size(size, k, s, p, d)
        for size, k, s, p, d in zip(output_size, kernel, stride, padding, dilation, strict=True)
    ))
    requires = must_agree(x.shape[2], positions,
                          "fold's columns must be the sliding positions over its output size")
    output = SymTensor((x.shape[0], x.shape[1] / (kernel[0] * kernel[1]),
                        *(sp.sympify(size) for size in output_size)))
    return LayerCost("elementwise", output, connections=x.per_example, op="fold",
                     requires=requires)


def functional_pixel_shuffle(x: SymTensor, upscale_factor: int) -> LayerCost:
    """F.pixel_shuffle: routing only."""
    r = upscale_factor
    *batch, channels, height, width = x.shape
    return LayerCost(
        "routing", SymTensor((*batch, channels / r**2, height * r, width * r)), op="pixel_shuffle"
    )


def functional_pixel_unshuffle(x: SymTensor, downscale_factor: int) -> LayerCost:
    """F.pixel_unshuffle: routing only."""
    r = downscale_factor
    *batch, channels, height, width = x.shape
    return LayerCost(
        "routing", SymTensor((*batch, channels * r**2, height / r, width / r)),
        op="pixel_unshuffle",
    )


def new_tensor(x: Any, *args, **kwargs) -> LayerCost | PlainValue:
    """zeros_like / new_zeros and friends: a tensor of a known shape, no arithmetic."""
    if isinstance(x, SymTensor) and not args:
        return LayerCost("routing", same_shape(x), op="new_tensor")
    return PlainValue(None)


def arange(*limits: Any, **kwargs: Any) -> LayerCost | PlainValue:
    """torch.arange(end) / (start, end[, step]) with a limit read from the input size (timm
    MViTv2's relative positions): a tensor of ceil((end - start) / step) values, no arithmetic;
    with numbers only, PyTorch's own (a constant)."""
    if not any(isinstance(v, sp.Expr) and not v.is_number for v in limits):
        return PlainValue(None)
    return sized_arange(*limits, **kwargs)


def sized_arange(*limits: Any, **kwargs: Any) -> LayerCost:
    """torch.arange over limits read from the input's sizes, formulas or numbers (a count at one
    size, a window's side): a row whatever they are, so that a count at one size equals the
    formulas' there, and the arithmetic on these positions has rows too (as in torch.export)."""
    start, end, step = ((0, *limits, 1) if len(limits) == 1 else (*limits, 1))[:3]
    if not all(isinstance(v, (int, sp.Expr)) for v in (start, end, step)):
        raise UnsupportedLayer(f"arange expected sizes, got {limits}")
    length = sp.ceiling(sp.sympify(end - start) / step)
    values = None
    if sp.sympify(step).is_positive:
        values = (sp.sympify(start), sp.sympify(start + (length - 1) * step))
    return LayerCost("routing", SymTensor((length,), value_range=values), op="arange")


def constructor(*size: Any, **kwargs: Any) -> LayerCost:
    """torch.zeros / ones / empty(B, H, W) with sizes read from a tensor (edgenext's positional
    encoding mask): a tensor of that shape, no arithmetic."""
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    if not all(isinstance(s, (int, sp.Expr)) for s in size):
        raise UnsupportedLayer(f"a tensor constructor expected sizes, got {size}")
    return LayerCost("routing", SymTensor(tuple(sp.sympify(s) for s in size)), op="new_tensor")


def full(size: Sequence[Any], fill_value: Any, **kwargs: Any) -> LayerCost:
    """torch.full(size, value) with sizes read from a tensor: as torch.zeros."""
    return constructor(tuple(size))


def eye(n: Any, m: Any = None, **kwargs: Any) -> LayerCost:
    """torch.eye(n, m) with sizes read from a tensor (bat_resnext's attention): n x m."""
    return constructor(n, n if m is None else m)


def size_rounding(function: Callable[[Any], Any]) -> Callable[[Any], PlainValue]:
    """math.ceil / math.floor of a size (mobilevit's patch count): the sympy ceiling/floor."""

    def rule(x: Any) -> PlainValue:
        if isinstance(x, sp.Expr):
            return PlainValue(function(x))
        return PlainValue(None)

    rule.__doc__ = f"math.{function.__name__} of a size."
    return rule


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
    F.hardtanh,
    F.mish,
    F.softplus,
    F.selu,
    F.celu,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    torch.exp,
    torch.erf,
    torch.cumsum,  # one addition per output (edgenext's positional encoding)
    torch.sqrt,
    torch.rsqrt,
    torch.abs,
    operator.abs,
    torch.neg,
    operator.neg,
    torch.log,
    torch.sin,
    torch.cos,
    torch.clamp,
    torch.clip,
    torch.square,
    torch.reciprocal,
)
UNARY_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "sqrt", "rsqrt",
    "abs", "neg", "log", "sin", "cos", "clamp", "clamp_", "clip", "clamp_min", "clamp_max",
    "square", "reciprocal", "erf", "gelu", "silu", "hardswish", "sign", "floor", "round",
    "cumsum",
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
    torch.rsub,
    torch.div,
    torch.pow,
    torch.maximum,
    torch.minimum,
    torch.where,
    operator.pow,
    operator.sub,
    operator.isub,
    operator.itruediv,
    operator.floordiv,
)

# Keys: the callable for call_function nodes, the method name for call_method nodes.
FUNCTION_RULES: dict[Any, Callable[..., LayerCost | PlainValue]] = {
    **{function: unary_elementwise for function in UNARY_FUNCTIONS},
    **{function: binary_elementwise for function in BINARY_FUNCTIONS},
    **{method: unary_elementwise for method in UNARY_METHODS},
    "pow": binary_elementwise,
    "div_": binary_elementwise,
    "sub_": binary_elementwise,
    "maximum": binary_elementwise,
    F.softmax: softmax,
    torch.softmax: softmax,
    "softmax": softmax,
    F.log_softmax: softmax,
    "log_softmax": softmax,
    operator.matmul: matmul,
    torch.matmul: matmul,
    torch.bmm: matmul,
    torch.mm: matmul,
    "matmul": matmul,
    "bmm": matmul,
    "mm": matmul,
    torch.baddbmm: baddbmm,
    torch.addmm: addmm,
    torch.einsum: einsum,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    F.linear: functional_linear,
    F.conv1d: functional_conv,
    F.conv2d: functional_conv,
    F.conv3d: functional_conv,
    F.layer_norm: functional_norm("layer_norm", 2),
    F.group_norm: functional_norm("group_norm", 2),
    F.rms_norm: functional_norm("rms_norm", 2),
    F.batch_norm: functional_norm("batch_norm", 3),
    F.instance_norm: functional_norm("instance_norm", 3),
    F.dropout: functional_dropout,
    F.dropout1d: functional_dropout,
    F.dropout2d: functional_dropout,
    F.dropout3d: functional_dropout,
    F.alpha_dropout: functional_dropout,
    F.feature_alpha_dropout: functional_dropout,
    "dropout": functional_dropout,
    F.glu: glu,
    F.normalize: normalize,
    F.pad: pad,
    F.pixel_shuffle: functional_pixel_shuffle,
    F.unfold: unfold,
    F.fold: fold,
    F.pixel_unshuffle: functional_pixel_unshuffle,
    torch.split: split,
    "split": split,
    torch.unbind: unbind,
    "unbind": unbind,
    torch.roll: same_shape_routing,
    "roll": same_shape_routing,
    torch.flip: same_shape_routing,
    "flip": same_shape_routing,
    "to": same_shape_routing,
    "type": same_shape_routing,
    "type_as": same_shape_routing,
    "float": same_shape_routing,
    "bool": same_shape_routing,
    "half": same_shape_routing,
    "bfloat16": same_shape_routing,
    "long": same_shape_routing,
    "int": same_shape_routing,
    "double": same_shape_routing,
    "masked_fill": same_shape_routing,
    torch.unsqueeze: unsqueeze,
    "unsqueeze": unsqueeze,
    torch.squeeze: squeeze,
    "squeeze": squeeze,
    "expand": expand,
    "expand_as": expand_as,
    "view_as": expand_as,
    "reshape_as": expand_as,
    "repeat": repeat,
    "tile": tile,
    torch.tile: tile,
    "repeat_interleave": repeat_interleave,
    torch.repeat_interleave: repeat_interleave,
    torch.stack: stack,
    "unflatten": unflatten,
    torch.swapaxes: transpose,
    "swapaxes": transpose,
    torch.sum: reduction,
    "sum": reduction,
    "amax": reduction,
    "amin": reduction,
    **{key: extremum("max") for key in (torch.max, "max")},
    **{key: extremum("min") for key in (torch.min, "min")},
    torch.zeros_like: new_tensor,
    torch.zeros: constructor,
    torch.arange: arange,
    torch.ones: constructor,
    torch.empty: constructor,
    torch.full: full,
    torch.eye: eye,
    math.ceil: size_rounding(sp.ceiling),
    math.floor: size_rounding(sp.floor),
    operator.invert: unary_elementwise,  # ~mask (edgenext's positional encoding)
    torch.ones_like: new_tensor,
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
    "norm": vector_norm,
    torch.addcmul: addcmul,
    "addcmul": addcmul,
    torch.addcdiv: addcmul,
    "addcdiv": addcmul,
    torch.norm: vector_norm,
    torch.linalg.vector_norm: vector_norm,
    F.interpolate: interpolate,
    F.adaptive_avg_pool1d: functional_adaptive_avg_pool2d,
    F.adaptive_avg_pool2d: functional_adaptive_avg_pool2d,
    F.adaptive_avg_pool3d: functional_adaptive_avg_pool2d,
    F.adaptive_max_pool1d: functional_adaptive_avg_pool2d,
    F.adaptive_max_pool2d: functional_adaptive_avg_pool2d,
    F.adaptive_max_pool3d: functional_adaptive_avg_pool2d,
    F.max_pool1d: functional_pool2d,
    F.max_pool2d: functional_pool2d,
    F.max_pool3d: functional_pool2d,
    F.avg_pool1d: functional_pool2d,
    F.avg_pool2d: functional_pool2d,
    F.avg_pool3d: functional_pool2d,
    operator.getitem: getitem,
    operator.setitem: setitem,
    **{relation: comparison(relation) for relation in COMPARISONS},
    getattr: _getattr,
    "size": size,
    "dim": dim,
}
if _stochastic_depth_target() is not None:
    FUNCTION_RULES[_stochastic_depth_target()] = stochastic_depth


# --- value ranges of tensors computed from sizes: (range of the first argument, the others)
# -> the range of the output, or None where it is not known ---------------------------------

Range = tuple[sp.Expr, sp.Expr]


def _number_range(value: Any) -> Range | None:
    """Return (v, v) for a number or a size (a whole float as an integer), else the range a
    tensor carries (None without one)."""
    if isinstance(value, SymTensor):
        return value.value_range
    if isinstance(value, bool) or not isinstance(value, (int, float, sp.Expr)):
        return None
    value = sp.sympify(value)
    if isinstance(value, sp.Float) and float(value).is_integer():
        value = sp.Integer(int(value))
    return (value, value)


def range_kept(x: Range, *args: Any) -> Range:
    """Routing (view, unsqueeze, x[:, None], casts to a float type): the same values."""
    return x


def _range_sum(x: Range, other: Any, *args: Any) -> Range | None:
    other_range = _number_range(other)
    if other_range is None:
        return None
    return (x[0] + other_range[0], x[1] + other_range[1])


def _range_difference(x: Range, other: Any, *args: Any) -> Range | None:
    other_range = _number_range(other)
    if other_range is None:
        return None
    return (x[0] - other_range[1], x[1] - other_range[0])


def _range_scaled(x: Range, other: Any, *args: Any) -> Range | None:
    """x * c for a number or size c of known sign (a tensor's range times another: unknown)."""
    if isinstance(other, SymTensor):
        return None
    factor = _number_range(other)
    if factor is None:
        return None
    if factor[0].is_nonnegative:
        return (x[0] * factor[0], x[1] * factor[0])
    if factor[0].is_nonpositive:
        return (x[1] * factor[0], x[0] * factor[0])
    return None


def _range_negated(x: Range, *args: Any) -> Range:
    """-x: the ends swapped and negated."""
    return (-x[1], -x[0])


def _range_subtracted_from(x: Range, other: Any, *args: Any) -> Range | None:
    """c - x (operator.sub with the number first, aten.rsub(x, c))."""
    other_range = _number_range(other)
    if other_range is None:
        return None
    return (other_range[0] - x[1], other_range[1] - x[0])


def _range_absolute(x: Range, *args: Any) -> Range | None:
    """|x| where the signs decide it: x itself, -x, or 0 up to the larger end; else unknown."""
    least, greatest = map(sp.sympify, x)
    if least.is_nonnegative:
        return (least, greatest)
    if greatest.is_nonpositive:
        return (-greatest, -least)
    if least.is_nonpositive and greatest.is_nonnegative:
        larger = sp.sympify(greatest + least)
        if larger.is_nonnegative:
            return (sp.Integer(0), greatest)
        if larger.is_nonpositive:
            return (sp.Integer(0), -least)
    return None


def _range_floor_divided(x: Range, other: Any, *args: Any) -> Range | None:
    """x // c for a number or size c of known sign (PyTorch's floor division; by a tensor:
    unknown)."""
    if isinstance(other, SymTensor):
        return None
    divisor = _number_range(other)
    if divisor is None or divisor[0] != divisor[1]:
        return None
    c = divisor[0]
    if c.is_positive:
        return (sp.floor(x[0] / c), sp.floor(x[1] / c))
    if c.is_negative:
        return (sp.floor(x[1] / c), sp.floor(x[0] / c))
    return None


def _range_clamped(x: Range, *args: Any, min: Any = None, max: Any = None) -> Range | None:
    """x.clamp(min, max) with numbers or sizes, where sympy decides each end's comparison
    (a Max or Min left standing has no integer form here): unknown otherwise."""
    low, high = (list(args) + [None, None])[:2]
    low, high = (min if low is None else low), (max if high is None else high)
    ends = list(map(sp.sympify, x))
    for bound, choose in ((low, sp.Max), (high, sp.Min)):
        if bound is None:
            continue
        value = _number_range(bound)
        if value is None or isinstance(bound, SymTensor):
            return None
        ends = [choose(end, value[0]) for end in ends]
    if any(end.has(sp.Max, sp.Min) for end in ends):
        return None
    return (ends[0], ends[1])


def _range_truncated(x: Range, *args: Any) -> Range | None:
    """.long() / .int(): toward zero, which is floor() where no value is negative."""
    if not sp.sympify(x[0]).is_nonnegative:
        return None
    return (sp.floor(x[0]), sp.floor(x[1]))


def _range_cast(x: Range, *args: Any, dtype: Any = None, **kwargs: Any) -> Range | None:
    """.to(dtype) / .to(device): int64 and int32 truncate as .long() does, float32 and float64
    keep the values; another tensor's dtype, narrower types, bool or complex: unknown."""
    if any(isinstance(a, SymTensor) for a in args):
        return None
    dtype = dtype or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype in (None, torch.float32, torch.float64):
        return x
    if dtype in (torch.int64, torch.int32):
        return _range_truncated(x)
    # bool, complex, half precision (which rounds whole numbers past 2048); uint8 and int8
    # wrap around (and a byte index is a mask)
    return None


# the rules for calls whose arguments are read from the input's sizes (the interpreter knows
# from the graph), where the rule above would leave a number-only call to PyTorch as a
# constant: a count at one size, where every size is a number, and a window's side
SIZED_FUNCTION_RULES: dict[Any, Callable[..., LayerCost]] = {torch.arange: sized_arange}

VALUE_RANGE_RULES: dict[Any, Callable[..., Range | None]] = {
    **{key: range_kept for key in (
        "view", "reshape", torch.reshape, "unsqueeze", torch.unsqueeze, "permute",
        torch.permute, "transpose", torch.transpose, "contiguous", "clone", "detach",
        "expand", "expand_as", "flatten", torch.flatten, "float", "double",
        operator.getitem, "flip", torch.flip, "roll", torch.roll)},
    **{key: _range_negated for key in (operator.neg, torch.neg, "neg")},
    **{key: _range_absolute for key in (operator.abs, torch.abs, "abs")},
    **{key: _range_floor_divided for key in (operator.floordiv, "__floordiv__")},
    **{key: _range_clamped for key in (torch.clamp, torch.clip, "clamp", "clip")},
    **{key: _range_subtracted_from for key in (torch.rsub, "rsub")},
    "to": _range_cast,
    **{key: _range_sum for key in (operator.add, operator.iadd, torch.add, "add", "add_")},
    **{key: _range_difference for key in (operator.sub, operator.isub, torch.sub, "sub",
                                          "sub_")},
    **{key: _range_scaled for key in (operator.mul, operator.imul, torch.mul, "mul", "mul_")},
    "long": _range_truncated,
    "int": _range_truncated,
}


# calls that compute a new tensor (never a view of their input): x + 1, x * 2, x - y
NEW_TENSOR_ARITHMETIC = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, "add", "sub", "mul", "div", "neg",
})


def with_value_range(target: Any, args: tuple, kwargs: Mapping[str, Any], output: Any) -> Any:
    """Return `output` with the range of values VALUE_RANGE_RULES gives for a call of `target`
    on `args` (a tensor computed from sizes: positions, offsets), else `output` as it is."""
    rule = VALUE_RANGE_RULES.get(target) if isinstance(output, SymTensor) else None
    if rule is None or not args or (kwargs and rule not in (_range_cast, _range_clamped)):
        return output  # alpha=, out=, ...: not followed
    first, others = args[0], args[1:]
    if not isinstance(first, SymTensor) and target in (operator.add, operator.mul, torch.add,
                                                       torch.mul):
        first, others = (args[1], (args[0], *args[2:])) if len(args) > 1 else (first, others)
    elif not isinstance(first, SymTensor) and target is operator.sub and len(args) == 2:
        first, others, rule = args[1], (args[0],), _range_subtracted_from  # c - x
    if not isinstance(first, SymTensor) or first.value_range is None:
        return output
    if target is operator.getitem and any(
            isinstance(item, SymTensor) for item in (
                others[0] if isinstance(others[0], tuple) else (others[0],))):
        return output  # a gather: the values of what it reads
    values = rule(first.value_range, *others, **kwargs)
    return output if values is None else replace(output, value_range=values)


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
    """Return the rule for `module`'s type (or its nearest registered base class), or None.

    A subclass that overrides forward gets None: it computes what its own forward says (timm's
    BatchNormAct2d adds an activation, Conv2dSame pads by the input size), so it is traced into.
    """
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls] if type(module).forward is cls.forward else None
    return None
