"""Memory as exact formulas: parameters, gradients, optimizer state, activations kept for backward.

Every quantity is a sympy formula in bytes, in the batch size B, the input size H x W and the
model's hyperparameters. What a layer keeps for backward comes from a table of rules, one small
function per op or layer kind, looked up like the counting conventions (analysis/conventions.py):

    "op@via", "kind@via", "*@via", "op", "kind", "*"

Each rule says what autograd's node for the call saves (PyTorch's tools/autograd/derivatives.yaml
names the saved variables of every op): some of the call's tensor inputs, its output, and new
tensors (BatchNorm's per-channel save_mean/save_invstd, max pooling's int64 indices, dropout's
noise). A saved tensor is a view of some storage; autograd holds the whole storage, and two
layers saving the same storage (a ReLU its output, the next conv its input) hold it once. So
the engine follows storages through the captured graph (views and in-place ops share their
input's storage) and charges each storage to the first layer that saves it; that is also what
the witness measures: `torch.autograd.graph.saved_tensors_hooks` around a training-mode forward
pass, each storage counted once, parameters and buffers left out (`measure_saved`).

The same storage walk in evaluation mode gives the inference peak: a storage lives from the
layer that produces it to its last consumer in the graph, and the peak is the largest set alive
at once (`measure_forward_peak` is the witness: PyTorch's profiler memory events on the CPU).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sympy as sp
import torch
import torch.fx
import torch.nn.functional as F
from convtally.analysis.rules import BATCH, LayerCost, SymTensor
from convtally.analysis.tracing import flat_values, map_values
from torch import nn

H = sp.Symbol("H", integer=True, positive=True)
W = sp.Symbol("W", integer=True, positive=True)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
# state tensors the size of the trainable parameters, per optimizer (torch/optim/*.py)
OPTIMIZER_COPIES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}
MODES = ("training", "inference")
DERIVATIVES = "https://github.com/pytorch/pytorch/blob/main/tools/autograd/derivatives.yaml"


# --- what one call saves -------------------------------------------------------------------


@dataclass(frozen=True)
class NewTensor:
    """A tensor an op creates only for its backward (statistics, indices, masks)."""

    what: str
    elements: sp.Expr  # for the whole batch
    dtype: str = "activation"  # "activation" (the model's dtype) or "int64"


@dataclass(frozen=True)
class Saved:
    """What autograd's node for one call keeps: inputs (by position), its output, new tensors."""

    inputs: tuple[int, ...] = ()  # positions among the call's activation inputs
    output: bool = False
    new: tuple[NewTensor, ...] = ()
    known: bool = True  # False: no rule; the layer's saved bytes are unknown (counted 0)
    source: str = ""  # the derivatives.yaml entry (or the code) that says so

    def describe(self) -> str:
        """Return what is saved in words, e.g. 'input + 2 x C stats'."""
        if not self.known:
            return "unknown (no memory rule)"
        parts = [("input" if i == 0 else f"input {i}") for i in self.inputs]
        parts += ["output"] if self.output else []
        parts += [t.what for t in self.new]
        return " + ".join(parts) or "nothing"


@dataclass(frozen=True)
class Call:
    """One layer call as the memory rules see it."""

    cost: LayerCost
    module: nn.Module | None
    node: torch.fx.Node
    inputs_require_grad: tuple[bool, ...]  # per tensor operand, parameters included
    training: bool

    def shape(self) -> tuple[sp.Expr, ...]:
        """Return the output's shape with the batch dimension (B first)."""
        output = self.cost.output
        return tuple(output.shape) if isinstance(output, SymTensor) else ()

    def output_elements(self) -> sp.Expr:
        """Return the output's values for the whole batch."""
        return BATCH * self.cost.outputs

    def input_elements(self) -> sp.Expr:
        """Return the first input's values for the whole batch."""
        return BATCH * (self.cost.inputs if self.cost.inputs is not None else self.cost.outputs)

    def argument(self, name: str, position: int, default: Any = None) -> Any:
        """Return a call argument by keyword, else by position (after the input), else default."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        if len(self.node.args) > position:
            return self.node.args[position]
        return default


Rule = Callable[[Call], Saved]


def _batch_values(cost: LayerCost) -> sp.Expr:
    """Return the values of a call's output for the whole batch: B per example, but once for a
    tensor computed from parameters alone (timm's standardised convolution weights)."""
    output = cost.output
    tensors = [output] if isinstance(output, SymTensor) else [
        t for t in output or () if isinstance(t, SymTensor)]
    # SymTensor.per_example divides B out of a batched tensor and leaves the others whole
    return sp.Add(*(sp.Mul(*t.shape) for t in tensors))


def saves(*inputs: int, output: bool = False, source: str = "") -> Rule:
    """Return a rule that saves the given inputs and/or the output, nothing new."""

    def rule(call: Call) -> Saved:
        return Saved(tuple(inputs), output, source=source)

    return rule


def nothing(source: str = "") -> Rule:
    """Return a rule for ops whose backward needs only sizes or scalars."""
    return saves(source=source)


def batch_norm(call: Call) -> Saved:
    """BatchNorm in training: its input and save_mean, save_invstd (C values each)."""
    channels = call.shape()[1]
    if not call.training:
        return Saved((0,), source=DERIVATIVES + " native_batch_norm (eval: input only)")
    stats = NewTensor("2 x C stats (save_mean, save_invstd)", 2 * channels)
    # operand 1 is a computed weight when called functionally (timm's weight standardisation
    # scales by gain * scale); a parameter or running statistic has no storage of its own here
    return Saved((0,) if call.module is not None else (0, 1), new=(stats,),
                 source=DERIVATIVES + " native_batch_norm / "
                 "_batch_norm_with_update: input, weight, running stats, save_mean, save_invstd")


def group_norm(call: Call) -> Saved:
    """GroupNorm: its input and mean, rstd (B x groups values each)."""
    groups = call.module.num_groups if call.module is not None else call.argument("num_groups", 1)
    stats = NewTensor("2 x B*G stats (mean, rstd)", 2 * BATCH * groups)
    return Saved((0,), new=(stats,), source=DERIVATIVES + " native_group_norm: input, mean, rstd")


def layer_norm(call: Call) -> Saved:
    """LayerNorm: its input and mean, rstd (one value per normalised row each)."""
    if call.module is not None:
        normalized = math.prod(call.module.normalized_shape)
    else:
        normalized = math.prod(_tuple(call.argument("normalized_shape", 1)))
    rows = call.output_elements() / normalized
    stats = NewTensor("2 x rows stats (mean, rstd)", 2 * rows)
    return Saved((0,), new=(stats,), source=DERIVATIVES + " native_layer_norm: input, mean, rstd")


def max_pool(call: Call) -> Saved:
    """Max pooling: its input and the int64 index of every output's maximum."""
    indices = NewTensor("int64 indices (one per output)", call.output_elements(), "int64")
    return Saved((0,), new=(indices,), source=DERIVATIVES + " max_pool2d_with_indices: self, "
                 "result1 (indices)")


def adaptive_avg_pool(call: Call) -> Saved:
    """Adaptive average pooling: nothing at 1x1 (it runs as mean), else its input."""
    height, width = call.shape()[2:4]
    if height == 1 and width == 1:
        return Saved(source="aten/src/ATen/native/AdaptiveAveragePooling.cpp: a 1x1 output "
                     "runs as mean(), whose backward needs only sizes")
    return Saved((0,), source=DERIVATIVES + " _adaptive_avg_pool2d: self")


def dropout(call: Call) -> Saved:
    """Dropout in training on the CPU: a noise tensor of the input's size (in its dtype)."""
    if not call.training or not _rate(call):
        return Saved(source="eval (or p=0): returns its input")
    noise = NewTensor("noise (input-sized, CPU)", call.input_elements())
    return Saved(new=(noise,), source="aten/src/ATen/native/Dropout.cpp _dropout_impl: on the "
                 "CPU input * noise saves noise (on CUDA native_dropout saves a bool mask)")


def attention(call: Call) -> Saved:
    """scaled_dot_product_attention on the CPU's fused kernel (3-d and 4-d, no dropout in
    training): query, key, value, the mask, the output and one logsumexp per query row. The
    math path (other ranks, dropout) keeps its matmuls' operands: not modelled."""
    dropout = call.argument("dropout_p", 4, 0.0)
    if len(call.shape()) not in (3, 4) or (call.training and dropout):
        return Saved(known=False)
    rows = NewTensor("logsumexp (one per query row)", call.output_elements() / call.shape()[-1])
    return Saved((0, 1, 2, 3), output=True, new=(rows,), source=(
        "aten/src/ATen/native/transformers/attention.cpp: _scaled_dot_product_flash_attention"
        "_cpu keeps query, key, value, attn_mask, output, logsumexp"))


def stochastic_depth(call: Call) -> Saved:
    """torchvision's stochastic depth in training: one noise value per row (or one per batch)."""
    if not call.training or not call.argument("p", 1, 0.0):
        return Saved(source="eval (or p=0): returns its input")
    mode = call.argument("mode", 2, "row")
    noise = NewTensor("noise (one per example)" if mode == "row" else "noise (one value)",
                      BATCH if mode == "row" else sp.Integer(1))
    return Saved(new=(noise,), source="torchvision/ops/stochastic_depth.py: input * noise "
                 "saves noise")


def multiply(call: Call) -> Saved:
    """Tensor x tensor: each operand is kept when the other one needs a gradient."""
    flags = call.inputs_require_grad
    if len(flags) < 2:
        return Saved(source=DERIVATIVES + " mul.Scalar: nothing")
    kept = tuple(i for i, other in ((0, flags[1]), (1, flags[0])) if other)
    return Saved(kept, source=DERIVATIVES + " mul.Tensor: self if other requires grad, other "
                 "if self does")


def index(call: Call) -> Saved:
    """x[idx] with index tensors: the indices (int64), kept alive by the saving where the forward
    computed them (timm MViTv2's relative positions); an index buffer is the buffer's memory."""
    nodes = [n for n in flat_values(call.node.args[1:]) if isinstance(n, torch.fx.Node)]
    if all(_read_from_a_buffer(n) for n in nodes):
        return Saved(source=DERIVATIVES + " index.Tensor: indices (a buffer: its own memory)")
    values = dict(call.cost.extra).get("index_values", sp.Integer(0))
    return Saved(new=(NewTensor("int64 indices", values, "int64"),),
                 source=DERIVATIVES + " index.Tensor: indices")


def _reads_sizes(node: torch.fx.Node) -> bool:
    """Return True for a read of a tensor's sizes (x.shape, x.size(), x.dim()): what is made
    from them (torch.arange(H), timm's coordinate grid) needs no gradient."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in ("shape", "ndim", "dtype", "device", "is_cuda"))


def _read_from_a_buffer(node: torch.fx.Node) -> bool:
    """Return True for a buffer (get_attr) or a view of one (swin's index.view(-1)), whose
    storage is the buffer's; `.long()` of an int64 buffer returns the buffer itself."""
    while node.op != "get_attr":
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op not in ("call_method", "call_function") or not node.args or (
                name not in VIEW_OPS and name != "long"):
            return False
        node = node.args[0]
        if not isinstance(node, torch.fx.Node):
            return False
    return True


def divide(call: Call) -> Saved:
    """Tensor / tensor: the divisor always, the dividend when the divisor needs a gradient."""
    flags = call.inputs_require_grad
    if len(flags) < 2:
        return Saved(source=DERIVATIVES + " div.Scalar: nothing")
    return Saved((1, 0) if flags[1] else (1,), source=DERIVATIVES + " div.Tensor")


def convolution(call: Call) -> Saved:
    """Convolution: its input; with padding='same' and an odd total padding (an even kernel)
    PyTorch first pads the input by one on the far side and saves that padded copy."""
    module = call.module
    if isinstance(module, nn.modules.conv._ConvNd) and module.padding == "same":
        extra = [d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)]
        if any(extra):
            sizes = [size + e for size, e in zip(call.shape()[2:], extra)]
            padded = NewTensor("input padded for 'same'", BATCH * module.in_channels
                               * math.prod(sizes))
            return Saved(new=(padded,), source="aten/src/ATen/native/Convolution.cpp "
                         "_convolution_mode: asymmetric 'same' padding pads the input first")
    # the weight is saved too: a module's is a parameter, counted as one; a functional call's
    # may be computed in forward (timm's weight standardisation), a tensor of its own
    saved = (0,) if module is not None else (0, 1)
    return Saved(saved, source=DERIVATIVES + " convolution: input, weight")


def linear(call: Call) -> Saved:
    """Linear: its input (addmm's mat1; mat2 is the weight, a parameter)."""
    return Saved((0,), source=DERIVATIVES + " addmm / mm: mat1, mat2 (weight.t())")


def activation(call: Call) -> Saved:
    """Element-wise activations: the output for those whose derivative is read off it (ReLU,
    sigmoid, tanh, softmax; LeakyReLU and ELU in place), else the input, which an in-place
    call (ReLU6, SiLU, hardswish with inplace=True) first copies: autograd keeps the copy."""
    op = call.cost.op.rstrip("_")
    inplace = _inplace(call)
    if op in OUTPUT_SAVERS or (op in INPLACE_OUTPUT_SAVERS and inplace):
        return Saved(output=True, source=DERIVATIVES + f" {op}: result")
    if op in INPUT_SAVERS or op in INPLACE_OUTPUT_SAVERS:
        if inplace:
            copy_ = NewTensor("copy of the input (in place)", call.input_elements())
            return Saved(new=(copy_,), source=DERIVATIVES + f" {op}_: self is saved, so the "
                         "in-place call saves a clone of it before overwriting")
        return Saved((0,), source=DERIVATIVES + f" {op}: self")
    return Saved(known=False)


OUTPUT_SAVERS = frozenset({"relu", "sigmoid", "tanh", "softmax", "log_softmax", "threshold",
                           "exp", "sqrt", "rsqrt"})
# saved from the input out of place, from the result in place (derivatives.yaml *_ entries)
INPLACE_OUTPUT_SAVERS = frozenset({"leaky_relu", "elu", "celu", "selu"})
# saved from the input; in place, from a clone of it
INPUT_SAVERS = frozenset({"relu6", "hardtanh", "silu", "gelu", "hardswish", "hardsigmoid",
                          "mish", "softplus", "prelu", "softsign", "tanhshrink", "logsigmoid",
                          "erf", "abs", "log", "sin", "cos", "square",
                          "reciprocal", "clamp", "clip"})

ROUTING = nothing("derivatives.yaml: view/cat/permute/flatten backward needs sizes only")

# Looked up as conventions are: "op@via", "kind@via", "*@via", "op", "kind", "*".
SAVED_RULES: Mapping[str, Rule] = {
    "conv": convolution,
    "linear": linear,
    "batch_norm": batch_norm,
    "batch_norm_training": batch_norm,
    "group_norm": group_norm,
    "layer_norm": layer_norm,
    "max_pool2d": max_pool,
    "adaptive_max_pool2d": max_pool,
    "avg_pool2d": saves(0, source=DERIVATIVES + " avg_pool2d: self"),
    "adaptive_avg_pool2d": adaptive_avg_pool,
    "mean": nothing(DERIVATIVES + " mean.dim: sizes only"),
    "sum": nothing(DERIVATIVES + " sum.dim_IntList: sizes only"),
    "activation": activation,
    "upsample": nothing(DERIVATIVES + " upsample_nearest2d / upsample_bilinear2d: sizes only"),
    "dropout": dropout,
    "stochastic_depth": stochastic_depth,
    "scaled_dot_product_attention": attention,
    **{op: nothing(DERIVATIVES + f" {op}: alpha and sizes only")
       for op in ("add", "iadd", "add_", "sub", "isub", "sub_")},
    **{op: multiply for op in ("mul", "imul", "mul_")},
    **{op: divide for op in ("truediv", "itruediv", "div", "div_")},
    "index": index,
    "routing": ROUTING,
    "*": lambda call: Saved(known=False),
}


def lookup_keys(cost: LayerCost) -> tuple[str, ...]:
    """Return the rule keys tried for `cost`, most specific first (as conventions.py)."""
    op, kind, via = cost.op or cost.kind, cost.kind, cost.via or "module"
    return (f"{op}@{via}", f"{kind}@{via}", f"*@{via}", op, kind, "*")


def saved_rule(cost: LayerCost, table: Mapping[str, Rule] = SAVED_RULES) -> tuple[str, Rule]:
    """Return (matching key, rule) for what `cost`'s call saves for backward."""
    for key in lookup_keys(cost):
        if key in table:
            return key, table[key]
    raise ValueError(f"no memory rule for {cost.op or cost.kind} and no '*' rule")


ONEDNN = "aten/src/ATen/native/mkldnn/Conv.cpp (oneDNN)"


# oneDNN's blocked layouts (nChw16c on x86 with AVX-512, as on the machine the benchmarks ran):
# a reordered copy pads the channels to a multiple of the block
ONEDNN_BLOCK = 16


def _blocked_copies(module: nn.Module | None, outputs: sp.Expr, inputs: sp.Expr) -> sp.Expr:
    """Return the values of blocked copies of a convolution's output and input (per example):
    each channel count padded to oneDNN's block (a convolution called functionally: unpadded)."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return outputs + inputs

    def padded(values: sp.Expr, channels: int) -> sp.Expr:
        return values * sp.Rational(-(-channels // ONEDNN_BLOCK) * ONEDNN_BLOCK, channels)

    return padded(outputs, module.out_channels) + padded(inputs, module.in_channels)


def _padded(channels: int) -> sp.Rational:
    """Return the factor by which oneDNN's blocked layout pads `channels` (1 when a multiple)."""
    return sp.Rational(-(-channels // ONEDNN_BLOCK) * ONEDNN_BLOCK, channels)


def conv_workspace(call: Call, size: int) -> sp.Expr:
    """oneDNN convolution on the CPU, beyond its input and its plain output: first a blocked
    copy of the input (none for 1 to 3 input channels: oneDNN's first-layer kernels read the
    plain input), of the weight and of the output, channels padded to the block; then the input
    and weight copies are freed and the plain output is written from the blocked one."""
    module = call.module
    weight = call.cost.macs_per_output * call.shape()[1]
    if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or module.groups not in (
            1, module.in_channels):  # other grouped convolutions: blocks not measured here
        return (call.output_elements() + weight) * size
    depthwise = module.groups > 1
    input_copy = 0 if module.in_channels <= 3 else call.input_elements() * _padded(
        module.in_channels)
    weight_copy = weight * _padded(module.out_channels) * (
        _padded(module.in_channels) if input_copy and not depthwise else 1)
    output_copy = call.output_elements() * _padded(module.out_channels)
    first = input_copy + weight_copy + output_copy - call.output_elements()
    return sp.Max(first, output_copy) * size


def pool_workspace(call: Call, size: int) -> sp.Expr:
    """Max pooling on the CPU runs max_pool2d_with_indices: int64 indices even in inference."""
    return call.output_elements() * 8


def upsample_workspace(call: Call, size: int) -> sp.Expr:
    """Upsampling on the CPU: an input-sized and an output-sized temporary."""
    return (call.output_elements() + call.input_elements()) * size


# What an op allocates and frees while it runs, beyond its result (inference, CPU, measured
# with the profiler's memory events); looked up like SAVED_RULES.
WORKSPACE_RULES: Mapping[str, Callable[[Call, int], sp.Expr]] = {
    "conv": conv_workspace,
    "max_pool2d": pool_workspace,
    "upsample": upsample_workspace,
    "*": lambda call, size: sp.Integer(0),
}
# the optimizer's step: Adam computes denom = exp_avg_sq.sqrt() / bias_correction2_sqrt, two
# temporaries the size of one parameter (torch/optim/adam.py _single_tensor_adam)
STEP_TEMPORARIES = {"sgd": 0, "momentum": 0, "adam": 2, "adamw": 2}


# --- storages: views and in-place ops share their input's ---------------------------------

VIEW_OPS = frozenset({
    "view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "swapaxes",
    "expand", "expand_as", "getitem", "chunk", "split", "unbind", "identity", "detach", "to",
    "type", "type_as", "float", "half", "bfloat16", "contiguous", "reshape",
})
# ops whose result is not contiguous (a later reshape/contiguous copies it)
STRIDED_OPS = frozenset({"permute", "transpose", "swapaxes", "expand", "expand_as"})
COPY_WHEN_STRIDED = frozenset({"contiguous", "reshape", "flatten"})
INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _inplace(call: Call) -> bool:
    """Return True when the call overwrites its input (inplace=True, x.relu_(), x += y)."""
    node, module = call.node, call.module
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_")
    if node.target in INPLACE_OPERATORS:
        return True
    if "inplace" in node.kwargs:
        return bool(node.kwargs["inplace"])
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace", False))


def _rate(call: Call) -> float:
    """Return the drop probability (a traced `training` flag is ignored: the mode decides)."""
    if call.module is not None:
        return float(getattr(call.module, "p", 0.5))
    return float(call.argument("p", 1, 0.5))


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


@dataclass
class Storage:
    """One allocation: its bytes, the node index that makes it and the last that reads it."""

    bytes: sp.Expr
    produced: int
    last_use: int
    owner: str  # the layer (or input) that allocated it


@dataclass
class _Value:
    storage: int | None  # None: a parameter or a non-tensor value
    requires_grad: bool
    contiguous: bool = True
    parts: tuple | None = None  # storages of a layer's separate outputs, nested as returned
    # laid out as its transpose(1, 2): attention's output for a query permuted from
    # (B, N, heads, d), which PyTorch's kernels lay out as the query, so x.transpose(1, 2)
    # .reshape(B, N, C) before the projection is a view of the storage attention keeps
    heads_inner: bool = False


# --- the model -----------------------------------------------------------------------------


@dataclass
class LayerMemory:
    """One row: bytes of parameters, gradients, optimizer state and saved activations."""

    name: str
    type: str
    kind: str
    saves: str  # in words
    rule: str  # the matching rule key
    known: bool
    parameters: sp.Expr
    buffers: sp.Expr
    gradients: sp.Expr
    optimizer: sp.Expr
    saved: sp.Expr  # bytes of the storages this layer is the first to keep for backward
    transient: sp.Expr  # bytes of its output's and input's gradients during backward
    live: sp.Expr | None  # inference: bytes alive while it runs (None: not a running layer)
    training_live: sp.Expr | None = None  # the same in a training step's forward pass
    backward_live: sp.Expr | None = None  # held while its backward runs (None: it has none)


PARTS = ("parameters", "buffers", "gradients", "optimizer", "saved")


@dataclass
class MemoryModel:
    """The memory of one network in training and in inference, as formulas in B, H, W."""

    model: str
    dtype: str
    optimizer: str
    layers: list[LayerMemory]
    substitutions: dict[sp.Symbol, int]
    divisor: tuple[int, int]
    input_bytes: sp.Expr
    step_transient: sp.Expr = sp.Integer(0)  # the optimizer step's temporaries
    output_bytes: sp.Expr = sp.Integer(0)  # the network's output, held through backward
    notes: list[str] = field(default_factory=list)
    analysis: Any = field(default=None, repr=False)

    def total(self, part: str) -> sp.Expr:
        """Return the model total of one part (PARTS) as a formula."""
        return sp.expand(sp.Add(*(getattr(layer, part) for layer in self.layers)))

    def transient(self) -> sp.Expr:
        """Return the largest transient: the biggest output + input gradient pair of a layer."""
        candidates = [layer.transient for layer in self.layers if layer.transient != 0]
        return sp.Max(*candidates) if candidates else sp.Integer(0)

    def held(self) -> sp.Expr:
        """Return what a training step holds throughout: parameters, buffers, optimizer state."""
        return sum((self.total(p) for p in ("parameters", "buffers", "optimizer")),
                   sp.Integer(0))

    def training_phases(self) -> list[tuple[str, sp.Expr]]:
        """Return (where, bytes alive beyond held()) for every moment of a training step that
        can be its peak: each layer's forward and backward, and the optimizer step."""
        phases = [(f"forward {layer.name}", layer.training_live) for layer in self.layers
                  if layer.training_live is not None]
        phases += [(f"backward {layer.name}", layer.backward_live)
                   for layer in reversed(self.layers) if layer.backward_live is not None]
        phases.append(("optimizer step", self.total("gradients") + self.step_transient))
        return phases

    def training_peak(self) -> sp.Expr:
        """Return the peak of a training step: held() + the largest of training_phases()."""
        return self.held() + sp.Max(*(bytes_ for _, bytes_ in self.training_phases()))

    def training_bound(self) -> sp.Expr:
        """Return the simple upper bound: parameters + buffers + gradients + optimizer state +
        the larger of (every saved activation + the largest backward transient + the output)
        and the optimizer step's temporaries, all as if alive at once."""
        backward = self.total("saved") + self.transient() + self.output_bytes
        return self.held() + self.total("gradients") + (
            sp.Max(backward, self.step_transient) if self.step_transient != 0 else backward)

    def inference_rows(self) -> list[int]:
        """Return the indices of the rows with an inference live set."""
        return [i for i, layer in enumerate(self.layers) if layer.live is not None]

    def values(self, expression: sp.Expr, points: Sequence[tuple[int, int, int]]) -> list[int]:
        """Return `expression` evaluated exactly at (B, H, W) points."""
        return [int(v) for v in _evaluate([expression], self.substitutions, points)[0]]

    def evaluate(self, points: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
        """Return per-layer part values, totals, peaks and the peak layers at (B, H, W) points."""
        self._check(points)
        formulas = [getattr(layer, part) for part in PARTS for layer in self.layers]
        transients = [layer.transient for layer in self.layers]
        live_rows = self.inference_rows()
        lives = [self.layers[i].live for i in live_rows]
        phases = self.training_phases()
        values = _evaluate(formulas + transients + lives + [f for _, f in phases]
                           + [self.step_transient], self.substitutions, points)
        count = len(self.layers)
        per_part = {p: values[i * count:(i + 1) * count] for i, p in enumerate(PARTS)}
        transient = values[len(PARTS) * count:(len(PARTS) + 1) * count]
        live = values[(len(PARTS) + 1) * count:(len(PARTS) + 1) * count + len(live_rows)]
        phase_values = values[(len(PARTS) + 1) * count + len(live_rows):-1]
        step = values[-1]
        totals = {p: per_part[p].sum(axis=0) for p in PARTS}
        largest = transient.max(axis=0) if count else np.zeros(len(points), dtype=object)
        held = sum(totals[p] for p in ("parameters", "buffers", "optimizer"))
        training = held + phase_values.max(axis=0)
        training_at = [phases[int(r)][0] for r in phase_values.argmax(axis=0)]
        peak_rows = live.argmax(axis=0) if len(live_rows) else [None] * len(points)
        inference = [int(live[r, j]) if r is not None else 0 for j, r in enumerate(peak_rows)]
        return {
            "layers": per_part,
            "totals": {p: [int(v) for v in totals[p]] for p in PARTS},
            "transient": [int(v) for v in largest],
            "transient_layer": [self.layers[int(r)].name for r in transient.argmax(axis=0)]
            if count else [],
            "step_transient": [int(v) for v in step],
            "training_peak": [int(v) for v in training],
            "training_at": training_at,
            "inference_peak": inference,
            "inference_layer": [
                self.layers[live_rows[int(r)]].name if r is not None else "" for r in peak_rows
            ],
        }

    def _check(self, points: Sequence[tuple[int, int, int]]) -> None:
        for batch, _, _ in points:
            if batch < 1:
                raise ValueError(f"batch size must be a positive integer, got {batch}")
        if self.analysis is not None:
            self.analysis.evaluate(sorted({(h, w) for _, h, w in points}))

    def breakdown(self, batch: int, height: int, width: int) -> list[tuple[str, int]]:
        """Return the training peak's parts at one point, largest first."""
        result = self.evaluate([(batch, height, width)])
        parts = [(p, result["totals"][p][0]) for p in PARTS]
        parts.append(("transient", result["transient"][0]))
        parts.append(("step temporaries", result["step_transient"][0]))
        return sorted(parts, key=lambda item: -item[1])


def _evaluate(formulas: Sequence[sp.Expr], substitutions: Mapping[sp.Symbol, int],
              points: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Return an object array (formulas x points) of exact integers (Max() allowed)."""
    return _compile(formulas, substitutions)(points)


def _compile(formulas: Sequence[sp.Expr], substitutions: Mapping[sp.Symbol, int]
             ) -> Callable[[Sequence[tuple[int, int, int]]], np.ndarray]:
    """Return a function (B, H, W) points -> exact integer values, compiled once."""
    from convtally.analysis.evaluation import IntegerEvaluator

    leaves: list[sp.Expr] = []
    plans = [_plan(sp.sympify(f).subs(substitutions), leaves) for f in formulas]
    evaluator = IntegerEvaluator(leaves) if leaves else None

    def run(points: Sequence[tuple[int, int, int]]) -> np.ndarray:
        batches = np.array([int(p[0]) for p in points], dtype=object)
        heights = np.array([int(p[1]) for p in points], dtype=object)
        widths = np.array([int(p[2]) for p in points], dtype=object)
        evaluated = (evaluator(heights, widths) if evaluator is not None
                     else np.zeros((0, len(points)), dtype=object))
        out = np.zeros((len(formulas), len(points)), dtype=object)
        for index, plan in enumerate(plans):
            out[index] = _run(plan, evaluated, batches)
        return out

    return run


def _plan(expression: sp.Expr, leaves: list[sp.Expr]) -> tuple:
    """Return an evaluation plan: affine leaves (constant, slope in B) joined by Max and Add."""
    if isinstance(expression, sp.Max):
        return ("max", [_plan(a, leaves) for a in expression.args])
    if isinstance(expression, sp.Add) and expression.has(sp.Max):
        return ("add", [_plan(a, leaves) for a in expression.args])
    if isinstance(expression, sp.Mul) and expression.has(sp.Max):
        factor, rest = expression.as_independent(sp.Max)
        if not sp.sympify(factor).is_number or factor < 0:
            raise ValueError(f"memory formula with a non-constant factor on Max: {expression}")
        return ("scale", sp.Rational(factor), _plan(rest, leaves))
    constant, slope = _affine(expression)
    leaves.extend((constant, slope))
    return ("leaf", len(leaves) - 2)


def _run(plan: tuple, evaluated: np.ndarray, batches: np.ndarray) -> np.ndarray:
    kind = plan[0]
    if kind == "leaf":
        return evaluated[plan[1]] + evaluated[plan[1] + 1] * batches
    if kind == "scale":
        value = _run(plan[2], evaluated, batches) * plan[1].p
        return value // plan[1].q
    parts = [_run(p, evaluated, batches) for p in plan[1]]
    return np.maximum.reduce(parts) if kind == "max" else sum(parts[1:], parts[0])


def _affine(formula: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """Return (constant, slope) of a formula affine in the batch size B."""
    expanded = sp.expand(formula)
    slope = expanded.coeff(BATCH, 1)
    constant = expanded.coeff(BATCH, 0)
    if sp.expand(constant + slope * BATCH - expanded) != 0:
        raise ValueError(f"memory formula not affine in B: {formula}")
    return constant, slope


def _simplify(expression: sp.Expr, divisor: tuple[int, int], exact: bool) -> sp.Expr:
    """Return `expression` with the analysis' divisibility of H and W assumed (floors gone)."""
    expression = sp.sympify(expression)
    if exact or not expression.has(H, W):
        return sp.expand(expression)
    t_h, t_w = sp.symbols("t_h t_w", integer=True, positive=True)
    forward = {H: divisor[0] * t_h, W: divisor[1] * t_w}
    back = {t_h: H / divisor[0], t_w: W / divisor[1]}
    return sp.expand(expression.subs(forward).subs(back))


def itemsize(dtype: str) -> int:
    """Return the bytes per value of a dtype name (float32, bfloat16, float16)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def memory_model(analysis: Any, dtype: str = "float32", optimizer: str = "sgd",
                 rules: Mapping[str, Rule] = SAVED_RULES) -> MemoryModel:
    """Return the memory model of an `analysis.accounting.Analysis` (fx capture)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    size = itemsize(dtype)
    analysis.require_images("memory")
    graph_module = getattr(analysis, "graph_module", None)
    if graph_module is None or analysis.concrete is not None:
        raise ValueError(
            f"memory needs the fx capture (formulas in H, W); {analysis.model} was captured "
            f"as {analysis.capture}"
        )
    exact = analysis.exact or any("floor()" in a for a in analysis.assumptions)
    simplify = lambda e: _simplify(e, analysis.divisor, exact)  # noqa: E731
    training = _walk(analysis, graph_module, size, True, rules)
    inference = _walk(analysis, graph_module, size, False, rules)
    copies = OPTIMIZER_COPIES[optimizer]
    seen: set[int] = set()
    layers = []
    for layer in analysis.layers:
        cost = layer.cost
        parameters = _layer_parameters(layer, graph_module, seen)
        trainable = [p for p in parameters if p.requires_grad]
        weights = sp.sympify(cost.weights)
        trainable_weights = (
            weights if len(trainable) == len(parameters)
            else sp.Integer(sum(p.numel() for p in trainable))
        )
        if layer.kind == "unused":  # never called: no gradient, no optimizer state
            trainable_weights, trainable = sp.Integer(analysis.unused_weights) * 0, []
        steps = 4 * len(trainable) if optimizer in ("adam", "adamw") else 0
        row_training = training.get(layer.node, {})
        row_inference = inference.get(layer.node, {})
        layers.append(LayerMemory(
            name=layer.name,
            type=layer.type,
            kind=layer.kind,
            saves=row_training.get("saves", ""),
            rule=row_training.get("rule", ""),
            known=row_training.get("known", True),
            parameters=simplify(weights * size),
            buffers=sp.Integer(_buffer_bytes(layer, graph_module, size, seen)),
            gradients=simplify(trainable_weights * size),
            optimizer=simplify(copies * trainable_weights * size + steps),
            saved=simplify(row_training.get("saved", 0)),
            transient=simplify(row_training.get("transient", 0)),
            live=simplify(row_inference["live"]) if "live" in row_inference else None,
            training_live=simplify(row_training["live"]) if "live" in row_training else None,
        ))
    output_bytes = simplify(training.get("(output)", {}).get("bytes", 0))
    _backward_liveness(layers, output_bytes)
    input_bytes = simplify(BATCH * analysis.input_channels * H * W * size)
    largest_parameter = max((p.numel() for p in graph_module.parameters() if p.requires_grad),
                            default=0)
    step = STEP_TEMPORARIES[optimizer] * largest_parameter * size
    model = MemoryModel(analysis.model, dtype, optimizer, layers, analysis.substitutions(),
                        analysis.divisor, input_bytes, sp.Integer(step), output_bytes,
                        analysis=analysis)
    unknown = [layer.name for layer in layers if not layer.known]
    if unknown:
        model.notes.append(
            f"no memory rule for {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}: "
            "their saved bytes are unknown (0 in the totals, which are lower bounds)"
        )
    if any(layer.rule == "dropout" and layer.saved != 0 for layer in layers):
        model.notes.append("dropout keeps an input-sized noise tensor on the CPU (PyTorch "
                           "_dropout_impl); on CUDA native_dropout keeps a 1-byte mask instead")
    return model


def _backward_liveness(layers: list[LayerMemory], output_bytes: sp.Expr) -> None:
    """Set each layer's backward live set: backward runs the layers in reverse, freeing what a
    layer keeps once it has run and adding its parameters' gradients, so while layer i runs
    what the layers up to i keep, the gradients of the layers from i on, its output's and
    input's gradients (the transient) and the network's output are alive."""
    gradients_after = [sp.Integer(0)] * (len(layers) + 1)
    for i in range(len(layers) - 1, -1, -1):
        gradients_after[i] = sp.expand(gradients_after[i + 1] + layers[i].gradients)
    kept = sp.Integer(0)
    for i, layer in enumerate(layers):
        kept = sp.expand(kept + layer.saved)
        if layer.transient != 0:
            layer.backward_live = sp.expand(kept + gradients_after[i] + layer.transient
                                            + output_bytes)


def _layer_parameters(layer: Any, graph_module: torch.fx.GraphModule,
                      seen: set[int]) -> list[nn.Parameter]:
    """Return the parameters a row owns (a module's on its first call; get_attr parameters)."""
    if layer.kind == "unused":
        used = {id(p) for p in seen}
        return [p for p in graph_module.parameters() if id(p) not in used]
    node = _node(graph_module, layer.node)
    if node is None:
        return []
    found = []
    if node.op == "call_module":
        found = list(graph_module.get_submodule(node.target).parameters())
    else:
        for argument in node.all_input_nodes:
            if argument.op == "get_attr":
                try:
                    found.append(graph_module.get_parameter(argument.target))
                except AttributeError:
                    continue
    owned = [p for p in found if id(p) not in {id(s) for s in seen}]
    seen.update(owned)  # type: ignore[arg-type]
    return owned


def _buffer_bytes(layer: Any, graph_module: torch.fx.GraphModule, size: int,
                  seen: set) -> int:
    node = _node(graph_module, layer.node)
    if node is None or node.op != "call_module":
        return 0
    total = 0
    for buffer in graph_module.get_submodule(node.target).buffers():
        if id(buffer) in seen:
            continue
        seen.add(id(buffer))
        per_value = size if buffer.is_floating_point() else buffer.element_size()
        total += buffer.numel() * per_value
    return total


def _node(graph_module: torch.fx.GraphModule, name: str) -> torch.fx.Node | None:
    nodes = getattr(graph_module, "_memory_nodes", None)
    if nodes is None:
        nodes = {n.name: n for n in graph_module.graph.nodes}
        graph_module._memory_nodes = nodes
    return nodes.get(name)


def _walk(analysis: Any, graph_module: torch.fx.GraphModule, size: int, training: bool,
          rules: Mapping[str, Rule]) -> dict[str, dict]:
    """Follow storages through the graph; return node -> saved bytes (training) or live bytes."""
    layers = {layer.node: layer for layer in analysis.layers if layer.node}
    nodes = list(graph_module.graph.nodes)
    storages: list[Storage] = []
    values: dict[str, _Value] = {}
    rows: dict[str, dict] = {}
    kept: dict[int, str] = {}  # storage -> the layer that keeps it first

    frames = [_frames(node) for node in nodes]
    # where each module call that a node runs in ends: the last node of the unbroken run of
    # nodes in that module (a module called three times, a Bottleneck's relu, is three calls)
    call_end: list[dict[str, int]] = [{} for _ in nodes]
    for index in reversed(range(len(nodes))):
        after = call_end[index + 1] if index + 1 < len(nodes) else {}
        call_end[index] = {frame: after.get(frame, index) for frame in frames[index]}

    def new_storage(nbytes: sp.Expr, index: int, owner: str) -> int:
        storages.append(Storage(sp.sympify(nbytes), index, index, owner))
        return len(storages) - 1

    for index, node in enumerate(nodes):
        arguments = [n for n in _flat((node.args, node.kwargs)) if isinstance(n, torch.fx.Node)]
        for argument in arguments:
            value = values.get(argument.name)
            if value is not None and value.storage is not None:
                storage = storages[value.storage]
                last = len(nodes) if node.op == "output" else index
                # a module called with a tensor made outside it holds that tensor (its
                # argument, the caller's variable) until the call returns, as eager Python does
                entered = frames[index] - frames[storage.produced]
                last = max([last] + [call_end[index][frame] for frame in entered])
                storage.last_use = max(storage.last_use, last)
        if node.op == "placeholder":
            if not values:
                nbytes = BATCH * analysis.input_channels * H * W * size
                values[node.name] = _Value(new_storage(nbytes, index, "input"), False)
                storages[-1].last_use = len(nodes)  # the caller holds its input
            continue
        if node.op == "get_attr":
            parameter = _parameter(graph_module, node.target)
            values[node.name] = _Value(None, bool(parameter is not None and
                                                  parameter.requires_grad))
            continue
        if node.op == "output":
            continue
        # every tensor operand, parameters included (no storage of their own to count, but
        # whether they need a gradient decides what the other operands keep: conv(x) * gamma)
        operands = [values[a.name] for a in arguments if a.name in values]
        inputs = [value for value in operands if value.storage is not None]
        layer = layers.get(node.name)
        if layer is None and _reads_sizes(node):  # x.shape, x.size(1): numbers, no tensor
            values[node.name] = _Value(None, False)
            continue
        if layer is None:  # getitem on a tuple, size arithmetic: alias of its first input
            if inputs:
                first = inputs[0]
                part = first.parts[node.args[1]] if (
                    first.parts is not None and node.target is operator.getitem
                    and isinstance(node.args[1], int)) else None
                if part is None:
                    values[node.name] = _Value(first.storage, first.requires_grad,
                                               first.contiguous)
                else:  # one of a layer's separate outputs (an LSTM's h_n)
                    values[node.name] = _Value(_first_storage(part), first.requires_grad,
                                               parts=part if isinstance(part, tuple) else None)
            continue
        module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        parameters = _call_parameters(node, module, graph_module)
        requires_grad = training and (any(v.requires_grad for v in inputs)
                                      or any(p.requires_grad for p in parameters))
        call = Call(layer.cost, module, node, tuple(v.requires_grad for v in operands), training)
        op = (layer.cost.op or layer.kind).rstrip("_")
        output_values = _batch_values(layer.cost)
        contiguous = True
        parts = None
        heads_inner = False
        if inputs and _aliases(call, op, inputs[0]):
            storage = inputs[0].storage
            contiguous = inputs[0].contiguous and op not in STRIDED_OPS
            if op in ("chunk", "split", "unbind", "getitem"):
                contiguous = False
            if inputs[0].heads_inner:
                contiguous = _swaps_dimensions_1_and_2(call.node, op)
        elif not inputs and operands and (op in VIEW_OPS or layer.cost.op in VIEW_OPS):
            storage = None  # a view of a parameter: the parameter's memory
        elif _nested(layer.cost.output):
            # separate tensors ((output, (h_n, c_n))): one storage each, picked by getitem
            parts = map_values(layer.cost.output, functools.partial(
                _part_storage, new_storage, size, index, layer.name))
            storage = _first_storage(parts)
        else:
            storage = new_storage(output_values * size, index, layer.name)
            heads_inner = (op == "scaled_dot_product_attention" and bool(inputs)
                           and not inputs[0].contiguous and len(call.shape()) == 4)
            contiguous = not heads_inner
        values[node.name] = _Value(storage, requires_grad, contiguous, parts, heads_inner)
        row: dict[str, Any] = {}
        if training:
            key, rule = saved_rule(layer.cost, rules)
            saved = rule(call) if requires_grad else Saved(source="no gradient flows here")
            row.update(saves=saved.describe() if requires_grad else "nothing (no gradient)",
                       rule=key, known=saved.known)
            total = sp.Integer(0)
            held = [operands[i].storage for i in saved.inputs if i < len(operands)]
            held += [storage] if saved.output else []
            shared = []
            for number in held:
                if number is not None and number not in kept:
                    kept[number] = layer.name
                    total += storages[number].bytes
                elif number is not None and kept[number] != layer.name:
                    shared.append(kept[number])
            if shared:
                row["saves"] += f" (kept by {', '.join(dict.fromkeys(shared))})"
            new = sp.Integer(0)
            for tensor in saved.new:
                new += tensor.elements * (8 if tensor.dtype == "int64" else size)
            row["saved"] = total + new
            row["new"] = new
            first = layer.cost.inputs if layer.cost.inputs is not None else 0
            # backward holds the output's and the input's gradient; oneDNN's convolution
            # backward on the CPU also reorders both into blocked copies
            gradients = layer.cost.outputs + first
            if layer.kind == "conv":
                gradients += _blocked_copies(module, layer.cost.outputs, first)
            # a tensor computed from parameters alone (no batch dimension): its gradient once
            batched = output_values.has(BATCH) or not layer.cost.outputs
            row["transient"] = ((BATCH if batched else 1) * gradients * size if requires_grad
                                else sp.Integer(0))
        workspace = saved_rule(layer.cost, WORKSPACE_RULES)[1](call, size)
        row["workspace"] = sp.sympify(workspace) if _allocates(call, op, inputs) else 0
        rows[node.name] = row
    returned = [values[a.name].storage for a in _flat((nodes[-1].args,))
                if isinstance(a, torch.fx.Node) and a.name in values] if nodes else []
    rows["(output)"] = {"bytes": sp.Add(*(storages[n].bytes for n in set(returned)
                                          if n is not None))}
    # alive while a layer runs: every storage from the layer that makes it to its last reader
    # (in training, a storage kept for backward to the end of the pass), the new tensors kept
    # so far (statistics, indices, noise) and the layer's workspace
    end = len(nodes)
    kept_so_far = sp.Integer(0)
    for index, node in enumerate(nodes):
        if node.name in rows:
            kept_so_far += rows[node.name].get("new", 0)
            rows[node.name]["live"] = rows[node.name]["workspace"] + kept_so_far + sp.Add(*(
                s.bytes for number, s in enumerate(storages)
                if s.produced <= index <= max(end if number in kept else s.last_use,
                                              s.produced)))
    return rows


def _part_storage(new_storage: Callable[[sp.Expr, int, str], int], size: int, index: int,
                  owner: str, tensor: Any) -> int | None:
    """Return a new storage for one tensor of a layer's separate outputs (None: not a tensor)."""
    if not isinstance(tensor, SymTensor):
        return None
    return new_storage(sp.Mul(*tensor.shape) * size, index, owner)


def _nested(output: Any) -> bool:
    """Return True for a tuple output holding a tuple of tensors (an LSTM's states)."""
    return isinstance(output, tuple) and any(isinstance(item, tuple) for item in output)


def _first_storage(parts: Any) -> int | None:
    """Return the first storage index among nested parts."""
    leaves = [leaf for leaf in flat_values(parts) if leaf is not None]
    return leaves[0] if leaves else None


def _frames(node: torch.fx.Node) -> frozenset[str]:
    """Return the qualified names of the modules whose forward runs `node`."""
    names = {path for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
    if node.op == "call_module":
        parts = str(node.target).split(".")
        names.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return frozenset(names)


def _swaps_dimensions_1_and_2(node: torch.fx.Node, op: str) -> bool:
    """Return True for x.transpose(1, 2), x.swapaxes(1, 2) or x.permute(0, 2, 1, 3)."""
    arguments = list(node.args[1:])
    if op in ("transpose", "swapaxes"):
        return len(arguments) == 2 and {a % 4 for a in arguments if isinstance(a, int)} == {1, 2}
    if op == "permute":
        dims = arguments[0] if len(arguments) == 1 else arguments
        return list(dims) == [0, 2, 1, 3]
    return False


def _allocates(call: Call, op: str, inputs: list[_Value]) -> bool:
    return not (inputs and _aliases(call, op, inputs[0]))


def _aliases(call: Call, op: str, first: _Value) -> bool:
    """Return True when the call's output shares its first input's storage."""
    if op in COPY_WHEN_STRIDED and not first.contiguous:
        return False
    if op in VIEW_OPS or call.cost.op in VIEW_OPS:
        return True
    if op in ("dropout", "stochastic_depth") and (not call.training or not _rate_or_p(call)):
        return True
    return _inplace(call)


def _rate_or_p(call: Call) -> float:
    if call.cost.op == "stochastic_depth":
        return float(call.argument("p", 1, 0.0))
    return _rate(call)


def _call_parameters(node: torch.fx.Node, module: nn.Module | None,
                     graph_module: torch.fx.GraphModule) -> list[nn.Parameter]:
    if module is not None:
        return list(module.parameters())
    found = []
    for argument in node.all_input_nodes:
        if argument.op == "get_attr":
            parameter = _parameter(graph_module, argument.target)
            if parameter is not None:
                found.append(parameter)
    return found


def _parameter(graph_module: torch.fx.GraphModule, target: str) -> nn.Parameter | None:
    try:
        return graph_module.get_parameter(target)
    except AttributeError:
        return None


def _flat(value: Any) -> list:
    found: list = []
    torch.fx.node.map_aggregate(value, found.append)
    return found


# --- what fits -----------------------------------------------------------------------------


def peak_formula(model: MemoryModel, mode: str) -> Callable[[Sequence[tuple[int, int, int]]],
                                                             list[int]]:
    """Return a function (B, H, W) points -> the peak bytes of `mode` at each (compiled once
    per model and mode)."""
    cache = model.__dict__.setdefault("_peaks", {})
    if mode not in cache:
        cache[mode] = _peak_formula(model, mode)
    return cache[mode]


def _peak_formula(model: MemoryModel, mode: str) -> Callable[[Sequence[tuple[int, int, int]]],
                                                              list[int]]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "training":  # the phases compiled apart: a Max of hundreds is slow in sympy
        held = model.held()
        formulas = [held + bytes_ for _, bytes_ in model.training_phases()]
    else:
        rows = model.inference_rows()
        formulas = [model.layers[i].live for i in rows] or [sp.Integer(0)]

    compiled = _compile(formulas, model.substitutions)

    def peak(points: Sequence[tuple[int, int, int]]) -> list[int]:
        return [int(v) for v in compiled(points).max(axis=0)]

    return peak


def largest_batch(model: MemoryModel, budget: int, height: int, width: int,
                  mode: str = "training") -> int:
    """Return the largest batch size whose peak fits `budget` bytes at H x W (0: none fits).

    The peak never falls as B grows (affine pieces joined by Max), so an exact integer search
    on the formulas (doubling, then bisection) finds it in a few dozen evaluations.
    """
    model._check([(1, height, width)])
    peak = peak_formula(model, mode)
    if peak([(1, height, width)])[0] > budget:
        return 0
    low, high = 1, 2
    while peak([(high, height, width)])[0] <= budget:
        low, high = high, 2 * high
        if high > 1 << 62:
            raise ValueError("the peak does not grow with the batch size; every batch fits")
    while high - low > 1:  # peak(low) fits, peak(high) does not
        middle = (low + high) // 2
        if peak([(middle, height, width)])[0] <= budget:
            low = middle
        else:
            high = middle
    return low


def largest_square(model: MemoryModel, budget: int, batch: int, mode: str = "training",
                   limit: int = 1 << 16) -> int:
    """Return the largest square side S (a multiple of the formulas' divisor) whose peak at
    batch `batch` fits `budget` bytes (0: none fits); an exact integer search on the formulas."""
    step = math.lcm(*model.divisor)
    peak = peak_formula(model, mode)
    smallest = _smallest_valid_side(model, step)
    if smallest is None or peak([(batch, smallest, smallest)])[0] > budget:
        return 0
    low, high = smallest // step, smallest // step
    while high * step < limit and peak([(batch, 2 * high * step, 2 * high * step)])[0] <= budget:
        low, high = 2 * high, 2 * high
    high = min(2 * high, limit // step + 1)
    while high - low > 1:  # peak(low) fits, peak(high) does not (or high is past the limit)
        middle = (low + high) // 2
        if peak([(batch, middle * step, middle * step)])[0] <= budget:
            low = middle
        else:
            high = middle
    return low * step


def _smallest_valid_side(model: MemoryModel, step: int) -> int | None:
    from convtally.analysis.accounting import ResolutionError

    for multiple in range(1, 1025):
        side = multiple * step
        try:
            model._check([(1, side, side)])
        except ResolutionError:
            continue
        return side
    return None


# --- rendering -----------------------------------------------------------------------------


def point_label(batch: int, height: int, width: int) -> str:
    """Return 'B=8 @32' (or 'B=8 @32x48')."""
    size = str(height) if height == width else f"{height}x{width}"
    return f"B={batch} @{size}"


def memory_table(model: str | Any, resolutions: Sequence[tuple[int, int]] = ((32, 32),),
                 batches: Sequence[int] = (1, 8, 64), dtype: str = "float32",
                 optimizer: str = "sgd", settings: Mapping[str, int] | None = None,
                 budget: int | None = None, mode: str = "training",
                 exact: bool = False) -> dict[str, Any]:
    """Return the memory report of `model` (a name, spec, module or Analysis) as JSON-ready data.

    Per layer: what it saves for backward and its bytes of parameters, gradients, optimizer
    state and saved activations (formulas and values at every batch x resolution); totals, the
    training peak with its breakdown, the inference peak and its layer, and with `budget` the
    largest batch per resolution and the largest square resolution per batch.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batches)}")
    from convtally.analysis.accounting import Analysis, analyse

    analysis = model if isinstance(model, Analysis) else analyse(
        model, settings, exact=exact, capture="fx", resolutions=list(resolutions))
    memory = memory_model(analysis, dtype, optimizer)
    points = [(b, h, w) for h, w in resolutions for b in batches]
    labels = [point_label(*p) for p in points]
    result = memory.evaluate(points)
    layers = []
    for index, layer in enumerate(memory.layers):
        row = {"name": layer.name, "type": layer.type, "saves": layer.saves,
               "rule": layer.rule, "known": layer.known}
        for part in PARTS:
            row[part] = {
                "formula": str(getattr(layer, part)),
                "values": {label: int(result["layers"][part][index, j])
                           for j, label in enumerate(labels)},
            }
        layers.append(row)
    totals = {part: {"formula": str(memory.total(part)),
                     "values": dict(zip(labels, result["totals"][part]))} for part in PARTS}
    totals["transient"] = {"formula": str(memory.transient()),
                           "values": dict(zip(labels, result["transient"])),
                           "layer": dict(zip(labels, result["transient_layer"]))}
    totals["step_transient"] = {"formula": str(memory.step_transient),
                                "values": dict(zip(labels, result["step_transient"]))}
    totals["training_peak"] = {"formula": str(memory.training_peak()),
                               "values": dict(zip(labels, result["training_peak"])),
                               "at": dict(zip(labels, result["training_at"])),
                               "bound": dict(zip(labels, memory.values(memory.training_bound(),
                                                                        points)))}
    totals["inference_peak"] = {"values": dict(zip(labels, result["inference_peak"])),
                                "layer": dict(zip(labels, result["inference_layer"]))}
    dominant = {}
    for j, label in enumerate(labels):
        parts = {p: result["totals"][p][j] for p in PARTS}
        parts["transient"] = result["transient"][j]
        parts["step temporaries"] = result["step_transient"][j]
        dominant[label] = max(parts, key=parts.get)
    totals["training_peak"]["dominant"] = dominant
    data = {
        "model": analysis.model,
        "hyperparameters": dict(analysis.hyperparameters),
        "dtype": dtype,
        "optimizer": optimizer,
        "mode": mode,
        "assumptions": list(analysis.assumptions),
        "notes": list(memory.notes),
        "points": labels,
        "layers": layers,
        "totals": totals,
    }
    if budget is not None:
        data["budget"] = {
            "bytes": int(budget),
            "mode": mode,
            "largest_batch": {
                (str(h) if h == w else f"{h}x{w}"): largest_batch(memory, budget, h, w, mode)
                for h, w in resolutions
            },
            "largest_square": {str(b): largest_square(memory, budget, b, mode) for b in batches},
        }
    return data


def render_memory(data: Mapping[str, Any], fmt: str) -> str:
    """Return the memory report (memory_table's data) as text, csv, markdown or json."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt not in ("text", "csv", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; use text, csv, markdown or json")
    from convtally.analysis.limits import format_bytes

    labels = data["points"]
    rows = []
    for layer in data["layers"]:
        row = {"layer": layer["name"], "type": layer["type"], "saves": layer["saves"],
               "parameters": layer["parameters"]["values"][labels[0]],
               "saved (bytes)": layer["saved"]["formula"]}
        for label in labels:
            row[f"saved {label}"] = layer["saved"]["values"][label]
        rows.append(row)
    totals = data["totals"]
    total_row = {"layer": "Total", "type": "", "saves": "",
                 "parameters": totals["parameters"]["values"][labels[0]],
                 "saved (bytes)": totals["saved"]["formula"]}
    for label in labels:
        total_row[f"saved {label}"] = totals["saved"]["values"][label]
    rows.append(total_row)
    frame = pd.DataFrame(rows)
    summary = []
    for label in labels:
        parts = {p: totals[p]["values"][label] for p in PARTS}
        summary.append({
            "point": label,
            "parameters": parts["parameters"] + parts["buffers"],
            "gradients": parts["gradients"],
            "optimizer": parts["optimizer"],
            "saved": parts["saved"],
            "transient": totals["transient"]["values"][label],
            "training peak": totals["training_peak"]["values"][label],
            "training peak at": totals["training_peak"]["at"][label],
            "dominant": totals["training_peak"]["dominant"][label],
            "inference peak": totals["inference_peak"]["values"][label],
            "inference peak at": totals["inference_peak"]["layer"][label],
        })
    summary_frame = pd.DataFrame(summary)
    if fmt == "csv":
        return frame.to_csv(index=False) + "\n" + summary_frame.to_csv(index=False)
    header = [
        f"model: {data['model']}" + (
            " (" + ", ".join(f"{k}={v}" for k, v in data["hyperparameters"].items()) + ")"
            if data["hyperparameters"] else ""),
        f"dtype {data['dtype']}, optimizer {data['optimizer']}, mode {data['mode']}",
        "saved: bytes autograd keeps for backward in training, each storage charged to the "
        "first layer that keeps it",
        "training peak = parameters + buffers + optimizer state + the most alive at once in "
        "the step: in the forward pass (what layers keep for backward stays), in the backward "
        "pass (what the layers not yet run keep, the gradients made so far, the layer's output "
        "and input gradients and the network's output) or in the optimizer step: "
        + _short(totals['training_peak']['formula']),
        *data["assumptions"],
        *data["notes"],
    ]
    for label in labels:
        header.append(
            f"{label}: training peak {format_bytes(totals['training_peak']['values'][label])} "
            f"at {totals['training_peak']['at'][label]} "
            f"({totals['training_peak']['dominant'][label]} dominates), inference peak "
            f"{format_bytes(totals['inference_peak']['values'][label])} at "
            f"{totals['inference_peak']['layer'][label]}"
        )
    budget = data.get("budget")
    if budget:
        header.append(f"budget {format_bytes(budget['bytes'])} ({budget['mode']}):")
        for size, batch in budget["largest_batch"].items():
            header.append(f"  at {size}: largest batch {batch}")
        for batch, side in budget["largest_square"].items():
            header.append(f"  at batch {batch}: largest square resolution "
                          f"{f'{side}x{side}' if side else 'none fits'}")
    if fmt == "markdown":
        frame["saved (bytes)"] = frame["saved (bytes)"].map(lambda f: f"`{f}`")
        notes = "\n".join(f"- {line}" for line in header)
        return (f"{notes}\n\n{frame.to_markdown(index=False)}\n\n"
                f"{summary_frame.to_markdown(index=False)}\n")
    from tabulate import tabulate

    tables = [tabulate(f, headers="keys", tablefmt="simple", showindex=False, intfmt=",")
              for f in (frame, summary_frame)]
    return "\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n"


def _short(formula: str, limit: int = 600) -> str:
    """Return a formula, or where it is too long to read its length and where to find it."""
    if len(formula) <= limit:
        return formula
    return f"a Max of {len(formula):,} characters (the whole formula is in --format json)"


# --- the witnesses: what PyTorch keeps and allocates ---------------------------------------


def _tensor_pointers(network: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr()
            for t in [*network.parameters(), *network.buffers()]}


def _training_arguments() -> dict[Any, int]:
    functions = {F.batch_norm: 5, F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2,
                 F.alpha_dropout: 2, F.feature_alpha_dropout: 2}
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return functions
    return {**functions, stochastic_depth: 3}


def _in_training(graph: torch.fx.Graph) -> torch.fx.Graph:
    """Return a copy of an eval-mode trace whose functional calls train: a module's forward
    that passes `self.training` on (timm's BatchNormAct2d, torchvision's StochasticDepth) was
    traced with training=False, which the network in training mode would not pass."""
    copied = copy.deepcopy(graph)
    positions = _training_arguments()
    for node in copied.nodes:
        position = positions.get(node.target) if node.op == "call_function" else None
        if position is None:
            continue
        if node.kwargs.get("training") is False:
            node.kwargs = {**node.kwargs, "training": True}
        elif len(node.args) > position and node.args[position] is False:
            node.args = (*node.args[:position], True, *node.args[position + 1:])
    return copied


def measure_saved(network: nn.Module, x: torch.Tensor, per_node: bool = False,
                  graph: torch.fx.GraphModule | None = None) -> tuple[int, dict[str, int]]:
    """Return (total, node name -> bytes) autograd saves in one training-mode forward pass.

    Each storage is counted once (by data_ptr), charged to the first node that saves it;
    parameters and buffers are left out. With `per_node` the network runs node by node: the
    nodes of `graph` when given (an analysis' traced graph, so the names are its layers' even where
    training mode would trace other nodes, as inception_v3's auxiliary head), else of a
    training-mode trace (analysis.tracing.trace). The network's modes and buffers
    (BatchNorm's running statistics) are restored afterwards.
    """
    from convtally.analysis.tracing import rebound, trace

    modes = {module: module.training for module in network.modules()}
    buffers = {name: buffer.clone() for name, buffer in network.named_buffers()}
    excluded = _tensor_pointers(network)
    seen: dict[int, int] = {}
    per: dict[str, int] = {}
    current = ["(forward)"]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in excluded or pointer in seen or storage.nbytes() == 0:
            return tensor
        seen[pointer] = storage.nbytes()
        per[current[0]] = per.get(current[0], 0) + storage.nbytes()
        return tensor

    class Runner(torch.fx.Interpreter):
        def run_node(self, node):  # noqa: D102 - torch.fx's hook
            current[0] = node.name
            return super().run_node(node)

    try:
        network.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if not per_node:
                output = network(x)
            else:
                module = (trace(network) if graph is None
                          else rebound(graph, network, _in_training(graph.graph)))
                output = Runner(module).run(x)
        del output
    finally:
        for module, mode in modes.items():
            module.train(mode)
        with torch.no_grad():
            for name, buffer in network.named_buffers():
                buffer.copy_(buffers[name])
    return sum(seen.values()), per


def _profiled_peak(function: Callable[[], Any]) -> int:
    """Return the peak of the CPU allocations made while `function` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_forward_peak(network: nn.Module, shape: Sequence[int],
                         dtype: str = "float32") -> int:
    """Return the measured peak bytes of an inference forward pass (input included), CPU."""
    runner = copy.deepcopy(network).eval().to(DTYPES[dtype])

    def forward() -> None:
        with torch.no_grad():
            x = torch.zeros(*shape, dtype=DTYPES[dtype])
            runner(x)

    return _profiled_peak(forward)


def measure_training_peak(network: nn.Module, shape: Sequence[int], optimizer: str = "sgd",
                          dtype: str = "float32") -> int:
    """Return the measured peak bytes of one training step: what is held before it (parameters,
    buffers, optimizer state) plus the profiler's peak of the step's allocations, CPU."""
    runner = copy.deepcopy(network).train().to(DTYPES[dtype])
    trainable = [p for p in runner.parameters() if p.requires_grad]
    optim = make_optimizer(trainable, optimizer)

    def step() -> None:
        x = torch.randn(*shape, dtype=DTYPES[dtype])
        output = runner(x)
        output = output["out"] if isinstance(output, dict) else output
        output.float().mean().backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # the optimizer allocates its state on the first step
    held = sum(t.untyped_storage().nbytes() for t in [*runner.parameters(), *runner.buffers()])
    held += sum(t.untyped_storage().nbytes() for state in optim.state.values()
                for t in state.values() if isinstance(t, torch.Tensor))
    return held + _profiled_peak(step)


def make_optimizer(parameters: Sequence[nn.Parameter], name: str) -> torch.optim.Optimizer:
    """Return the optimizer `name` (sgd, momentum, adam, adamw) over `parameters`."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=1e-3)
    if name == "momentum":
        return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=1e-3)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
