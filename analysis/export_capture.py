"""The export rung: torch.export's ATen graph, counted with the same rules as the fx rung.

`torch.export` (non-strict) runs the model with PyTorch's own symbolic shapes, so it captures
forwards that torch.fx cannot trace (control flow on values it can evaluate, asserts). Each
ATen op goes through a small adapter onto a rule of `analysis.rules` (the same function rules
the fx rung uses for F.conv2d, F.linear, torch.matmul, ...); the output shape of every op is
PyTorch's own (the graph's `val` metadata), turned into sympy in H and W. Each row is named by
the module that ran the op (the graph's `nn_module_stack`). With static shapes the same
interpreter counts one resolution: the concrete rung for models fx cannot trace either.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import sympy as sp
import torch
from convtally.analysis import rules
from convtally.analysis.accounting import (
    H,
    Layer,
    OutOfTime,
    W,
    _finish,
    _first_input,
    _new_parameters,
    _Prepared,
    concrete_analysis,
    counted,
    pinned_away,
    refuse_reads_outside,
    track_ranged_storage,
)
from convtally.analysis.conventions import Convention
from convtally.analysis.meta_shapes import MetaShapes
from convtally.analysis.rules import BATCH, LayerCost, ParameterTensor, SymTensor, UnsupportedLayer
from convtally.analysis.tracing import module_scope, state_kept
from torch import nn

aten = torch.ops.aten


def _routing(x: Any, *args, **kwargs) -> LayerCost:
    """View, permute, slice, cat, split, dropout in eval, ...: no arithmetic."""
    return LayerCost("routing", x if isinstance(x, SymTensor) else None)


def _unary(x: SymTensor, *args, **kwargs) -> LayerCost:
    return rules.unary_elementwise(x)


def _norm(op: str, weight_index: int) -> Callable[..., LayerCost]:
    def rule(x: SymTensor, *args, **kwargs) -> LayerCost:
        weight = args[weight_index] if len(args) > weight_index else kwargs.get("weight")
        return LayerCost("norm", SymTensor(x.shape), connections=x.per_example, op=op,
                         affine=weight is not None)

    return rule


def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        return _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return rules.functional_conv(x, weight, bias, stride, padding, dilation, groups)


def _conv_transpose(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                    dilation=1) -> LayerCost:
    count = len(weight.shape) - 2
    c_in, c_out_per_group = weight.shape[0], weight.shape[1]
    kernel = sp.Mul(*weight.shape[2:])
    return LayerCost(
        "conv", None, connections=x.per_example * c_out_per_group * kernel,
        bias_connections=sp.Integer(0), op=f"conv_transpose{count}d",
        macs_per_output=c_in / groups * kernel, extra=(("has_bias", int(bias is not None)),),
    )


def _max_pool(x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False) -> LayerCost:
    return rules._pool(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")


def _avg_pool(x, kernel_size, stride=(), padding=0, ceil_mode=False, *args) -> LayerCost:
    return rules._pool(x, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d")


def _adaptive(op: str) -> Callable[..., LayerCost]:
    def rule(x: SymTensor, output_size: Any) -> LayerCost:
        return rules._adaptive_pool(x, output_size, op)

    return rule


def _upsample(mode: str, antialias: bool = False) -> Callable[..., LayerCost]:
    per_output = {"nearest": 1, "bilinear": 4, "bicubic": 16}[mode]
    op = f"upsample_{mode}_aa" if antialias else f"upsample_{mode}"  # as rules._interpolate

    def rule(x: SymTensor, *args, **kwargs) -> LayerCost:
        # the output shape comes from the graph; the count per output from the mode
        return LayerCost("upsample", None, op=op, extra=(("per_output", sp.Integer(per_output)),))

    return rule


def _softmax(x: SymTensor, dim: int, *args) -> LayerCost:
    return rules.softmax(x, dim)


def _einsum(equation: str, operands: Sequence[SymTensor], *args) -> LayerCost:
    return rules.einsum(equation, *operands)


def _mean(x: SymTensor, dim: Any = None, keepdim: bool = False, *args, **kwargs) -> LayerCost:
    return rules.mean(x, dim, keepdim)


def _batch_norm(x, weight, bias, *args, **kwargs) -> LayerCost:
    # the first bool after bias is `training` (batch_norm, _native_batch_norm_legit[.no_stats]);
    # _native_batch_norm_legit_no_training has none
    training = next((a for a in args if isinstance(a, bool)), False)
    return LayerCost("norm", SymTensor(x.shape), connections=x.per_example,
                     op="batch_norm_training" if training else "batch_norm",
                     affine=weight is not None)


def _vector_norm(x: SymTensor, *args, **kwargs) -> LayerCost:
    """linalg_vector_norm / norm (F.normalize's norm): 1 per input value; the output shape is
    the graph's; fvcore and FlopCounterMode count none."""
    return LayerCost("norm", None, connections=x.per_example, op="vector_norm")


def _dropout(x, p=0.5, train=False) -> LayerCost:
    return rules.functional_dropout(x, p, train)


UNARY_OPS = (
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid",
    "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "leaky_relu",
    "leaky_relu_", "hardtanh", "hardtanh_", "mish", "mish_", "softplus", "exp", "sqrt", "rsqrt",
    "erf", "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "log", "sin", "cos",
    "reciprocal", "square", "prelu", "celu", "selu", "log_sigmoid", "sign", "floor", "round",
    "cumsum", "bitwise_not", "logical_not",
)
BINARY_OPS = ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "pow", "maximum",
              "minimum", "where", "rsub", "floor_divide",
              # comparisons (Swin's attention mask: mask != 0), one per output like where
              "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or")
ROUTING_OPS = (
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "unflatten",
    "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "slice", "select",
    "unsqueeze", "squeeze", "expand", "expand_as", "view_as", "reshape_as", "clone",
    "contiguous", "alias", "detach", "meshgrid", "one_hot",
    "_to_copy", "to", "pad", "constant_pad_nd", "roll", "flip", "pixel_shuffle",
    "pixel_unshuffle", "repeat", "lift_fresh_copy", "zeros_like", "ones_like", "full_like",
    "narrow", "index_select", "masked_fill", "type_as", "new_zeros", "new_ones", "zeros",
    "ones", "full", "arange", "empty", "movedim", "swapaxes", "clamp_max_", "copy_", "fill_",
    "channel_shuffle", "native_channel_shuffle", "dropout", "feature_dropout", "identity",
    "index", "gather", "index_put", "index_put_", "_unsafe_index", "scalar_tensor", "sym_size",
    "new_empty", "new_full", "empty_like", "masked_fill_", "tril", "triu", "zero_", "zero",
    "eye", "tile", "repeat_interleave", "im2col",
)

# OpOverloadPacket name -> rule; the adapters reuse analysis.rules (the fx rung's rules)
ATEN_RULES: dict[str, Callable[..., LayerCost]] = {
    **{name: _unary for name in UNARY_OPS},
    **{name: rules.binary_elementwise for name in BINARY_OPS},
    **{name: _routing for name in ROUTING_OPS},
    "conv1d": rules.functional_conv,
    "conv2d": rules.functional_conv,
    "conv3d": rules.functional_conv,
    "convolution": _convolution,
    "conv_transpose1d": _conv_transpose,
    "conv_transpose2d": _conv_transpose,
    "conv_transpose3d": _conv_transpose,
    "linear": rules.functional_linear,
    "matmul": rules.matmul,
    "bmm": rules.matmul,
    "mm": rules.matmul,
    "addmm": rules.addmm,
    "baddbmm": rules.baddbmm,
    "einsum": _einsum,
    "scaled_dot_product_attention": rules.scaled_dot_product_attention,
    "softmax": _softmax,
    "_softmax": _softmax,
    "log_softmax": _softmax,
    "layer_norm": _norm("layer_norm", 1),
    "group_norm": _norm("group_norm", 1),
    "rms_norm": _norm("rms_norm", 1),
    "instance_norm": _norm("instance_norm", 0),
    "batch_norm": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm,
    "_native_batch_norm_legit": _batch_norm,
    "_native_batch_norm_legit_functional": _batch_norm,
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _adaptive("adaptive_avg_pool2d"),
    "adaptive_max_pool2d": _adaptive("adaptive_max_pool2d"),
    "mean": _mean,
    "sum": rules.reduction,
    "amax": rules.reduction,
    "upsample_nearest2d": _upsample("nearest"),
    "upsample_bilinear2d": _upsample("bilinear"),
    "upsample_bicubic2d": _upsample("bicubic"),
    # antialias=True (naflexvit resizes its position embedding so), as F.interpolate's rule
    "_upsample_bilinear2d_aa": _upsample("bilinear", antialias=True),
    "_upsample_bicubic2d_aa": _upsample("bicubic", antialias=True),
    "glu": rules.glu,
    "addcmul": rules.addcmul,
    "addcdiv": rules.addcmul,
    "linalg_vector_norm": _vector_norm,
    "norm": _vector_norm,
    "col2im": rules.fold,  # F.fold's op, the same arguments
    "max": rules.extremum("max"),  # aten.max.dim: (values, indices); .default: one value
    "min": rules.extremum("min"),
    "dropout": _dropout,
    "alpha_dropout": _dropout,
    "feature_alpha_dropout": _dropout,
}


def aten_rule(target: Any) -> Callable[..., LayerCost] | None:
    """Return the rule for an ATen op (by its packet name), or None."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", "")
    return ATEN_RULES.get(name)


def _op_name(target: Any) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


# --- shapes: PyTorch's symbolic sizes as sympy in H, W ----------------------------------------


class _Sizes:
    """Converts PyTorch SymInts (torch's sympy, symbols s0, s1, ...) into sympy in H and W."""

    def __init__(self, height: Any, width: Any):
        self.mapping = {}
        self.same = False
        for value, symbol in ((height, H), (width, W)):
            if isinstance(value, torch.SymInt):
                if value.node.expr in self.mapping:  # export found H == W
                    self.same = True
                    continue
                self.mapping[value.node.expr] = symbol
        self.converted: dict[sp.Expr, sp.Expr] = {}  # a graph repeats few distinct sizes


    def expr(self, value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            return self.convert(value.node.expr)
        if isinstance(value, bool) or not isinstance(value, int):
            return value
        return sp.Integer(value)

    def convert(self, expression: sp.Expr) -> sp.Expr:
        converted = self.converted.get(expression)
        if converted is None:
            converted = self.converted[expression] = self._convert(expression)
        return converted

    def _convert(self, expression: sp.Expr) -> sp.Expr:
        from torch.utils._sympy import functions as torch_functions

        expression = expression.xreplace(self.mapping)

        def floor_div(a, b):
            return sp.floor(a / b)

        replacements = {
            torch_functions.FloorDiv: floor_div,
            torch_functions.CleanDiv: lambda a, b: a / b,
            torch_functions.IntTrueDiv: lambda a, b: a / b,
            torch_functions.FloatTrueDiv: lambda a, b: a / b,
            torch_functions.CeilDiv: lambda a, b: sp.ceiling(a / b),
            torch_functions.CeilToInt: sp.ceiling,
            torch_functions.FloorToInt: sp.floor,
            torch_functions.TruncToInt: sp.floor,  # sizes are never negative
            torch_functions.ToFloat: lambda a: a,
            torch_functions.PowByNatural: lambda a, b: a**b,
            torch_functions.Mod: lambda a, b: a - b * sp.floor(a / b),
            torch_functions.PythonMod: lambda a, b: a - b * sp.floor(a / b),
        }
        for function, replacement in replacements.items():
            expression = expression.replace(
                lambda e, f=function: isinstance(e, f),
                lambda e, r=replacement: r(*e.args),
            )
        # any other function of torch's symbolic shapes is refused here, not left to crash the
        # evaluator later (mobilevit's CeilToInt did, with a NameError)
        foreign = {
            type(node).__name__ for node in sp.preorder_traversal(sp.sympify(expression))
            if type(node).__module__.startswith("torch")
            or (isinstance(node, sp.Function) and not isinstance(node, (sp.floor, sp.ceiling)))
        }
        if foreign:
            raise UnsupportedLayer(
                f"a size uses {', '.join(sorted(foreign))} of torch's symbolic shapes, which "
                "has no exact integer form here"
            )
        unknown = expression.free_symbols - {H, W}
        if unknown:
            raise UnsupportedLayer(
                f"a size depends on {', '.join(sorted(map(str, unknown)))}, not on H and W only"
            )
        return sp.sympify(expression)

    def tensor(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            shape = tuple(self.expr(d) for d in value.shape)
            return SymTensor((BATCH, *shape[1:]) if shape and shape[0] == 1 else shape)
        if isinstance(value, (tuple, list)):
            return type(value)(self.tensor(v) for v in value)
        return self.expr(value)


# --- export and interpretation ---------------------------------------------------------------


# torch logs a failing op's whole traceback at ERROR level while it exports (a model that
# fails at the size asked for: timm hiera at 200x168 printed 49 lines before the one-line
# refusal); the refusal says why in one line
_EXPORT_LOGGERS = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes",
                   "torch._dynamo", "torch.export")


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """Silence the named loggers below CRITICAL for the duration, then restore their levels."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export(network: nn.Module, channels: int, size: tuple[int, int], dynamic: bool):
    """Return torch.export's program for `network` on a 1 x C x H x W input."""
    from torch.export import Dim

    x = torch.zeros(1, channels, *size)
    shapes = ({2: Dim.AUTO, 3: Dim.AUTO},) if dynamic else None
    with warnings.catch_warnings(), _quiet_loggers(_EXPORT_LOGGERS):
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(network, (x,), dynamic_shapes=shapes, strict=False)
        except Exception as error:  # torch.export raises many types; one line says why
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"torch.export failed ({type(error).__name__}: {first[:160]})"
            ) from None


def _inline_wrapped_bodies(program) -> None:
    """Put the bodies of `with torch.autocast(...)` / `torch.set_grad_enabled` blocks, which
    export keeps as a call of a sub-graph (wrap_with_autocast(..., submod, *args)), back into
    the graph, so that their ops are counted like the others (timm's EfficientViT attention)."""
    graph, owner = program.graph, program.graph_module
    for node in list(graph.nodes):
        if node.op != "call_function" or not _op_name(node.target).startswith("wrap_with_"):
            continue
        at = next(i for i, a in enumerate(node.args)
                  if isinstance(a, torch.fx.Node) and a.op == "get_attr")
        body = getattr(owner, node.args[at].target)
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            results = graph.graph_copy(body.graph, dict(zip(placeholders, node.args[at + 1:])))
        results = results if isinstance(results, (tuple, list)) else (results,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise UnsupportedLayer(f"{node.name}: a wrapped block's result used whole")
            user.replace_all_uses_with(results[user.args[1]])
            graph.erase_node(user)
        submodule = node.args[at]
        graph.erase_node(node)
        if not submodule.users:
            graph.erase_node(submodule)


def interpret_exported(
    program, convention: Convention, allow_unknown: bool, network: torch.nn.Module | None = None
) -> tuple[list[Layer], set[str]]:
    """Return one row per ATen op of `program` (routing ops included), counted by the rules,
    and the parameters the rows own; `network`, the exported module, names the module that ran
    an op where the fx rung counts that module (nn.Dropout) otherwise than the op."""
    _inline_wrapped_bodies(program)
    signature = program.graph_signature
    parameters = signature.inputs_to_parameters
    buffers = {**signature.inputs_to_buffers, **signature.inputs_to_lifted_tensor_constants}
    state = program.state_dict
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"
                   and n.name not in parameters and n.name not in buffers]
    if len(user_inputs) != 1:
        raise ValueError(f"expected one image input, the exported graph has {len(user_inputs)}")
    image = user_inputs[0].meta["val"]
    sizes = _Sizes(image.shape[2], image.shape[3])
    env: dict[str, Any] = {}
    layers: list[Layer] = []
    owned: set[str] = set()
    seen: Counter = Counter()
    checks: list = []
    ranged_storage: dict[str, str] = {}  # node -> the node whose storage its values are in
    for node in program.graph.nodes:
        if node.op == "placeholder":
            value = node.meta["val"]
            if node.name in parameters:
                target = parameters[node.name]
                env[node.name] = ParameterTensor(
                    tuple(sp.Integer(d) for d in value.shape), target=target,
                    numel=state[target].numel(),
                )
            elif node.name in buffers:
                env[node.name] = ParameterTensor(tuple(sp.Integer(d) for d in value.shape),
                                                 target=buffers[node.name], numel=0)
            else:
                env[node.name] = sizes.tensor(value)
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            raise UnsupportedLayer(f"exported node {node.name} ({node.op}) is not an op call")
        value = node.meta.get("val")
        if node.target is operator.getitem:
            env[node.name] = env[node.args[0].name][node.args[1]]
            continue
        if _op_name(node.target) == "_assert_scalar":  # a runtime check on sizes
            condition = node.args[0]
            if isinstance(condition, torch.fx.Node):
                checks.append(_condition(sizes, condition.meta.get("val")))
            continue
        if not _has_tensor(value):  # size arithmetic: no row
            env[node.name] = _size_value(sizes, value)
            continue
        args = torch.fx.node.map_aggregate(
            node.args, lambda n: env[n.name] if isinstance(n, torch.fx.Node) else n
        )
        kwargs = torch.fx.node.map_aggregate(
            node.kwargs, lambda n: env[n.name] if isinstance(n, torch.fx.Node) else n
        )
        output = sizes.tensor(value)
        op = _op_name(node.target)
        label = _label(node, op, seen)
        rule = aten_rule(node.target)
        known = rule is not None
        if rule is None:
            if not allow_unknown:
                raise UnsupportedLayer(
                    f"no rule for {label} (aten.{op}) in the exported graph; add one in "
                    "analysis/export_capture.py ATEN_RULES or pass --allow-unknown"
                )
            cost = LayerCost("unknown", output, op=op)
        else:
            try:
                cost = rule(*args, **kwargs)
            except UnsupportedLayer as error:
                raise UnsupportedLayer(f"{label} (aten.{op}): {error}") from None
        if op in _DROPOUT_OPS and network is not None:
            module = _running_module(node, network)
            if module is not None and rules.module_rule(module) is rules.dropout:
                # nn.Dropout's own op: counted as the fx rung counts the module (1 connection per
                # output under the default), where F.dropout in evaluation is the identity
                cost = rules.dropout(module, {}, args[0])
        cost = _with_output(cost, output)
        output, bounds = _ranged(op, args, kwargs, output, sizes)
        if ranged_storage or getattr(output, "value_range", None) is not None:
            # an exported graph may keep in-place ops (mvitv2's `dist += offset` is aten.add_)
            track_ranged_storage(node, output, env, ranged_storage, writes=op.endswith("_"),
                                 fresh=op in ("add", "sub", "mul", "div", "neg"))
        weights = _new_parameters(args, owned)
        cost = replace(
            cost, op=cost.op or op, via="aten", weights=cost.weights + weights,
            parameters=cost.weights + weights,
            inputs=_first_input(args, {}) if cost.inputs is None else cost.inputs,
        )
        env[node.name] = output
        shape = output.shape[1:] if isinstance(output, SymTensor) else ()
        layers.append(Layer(
            name=label, type=f"aten.{op}", kind=cost.kind, node=node.name,
            output_shape=tuple(sp.sympify(d) for d in shape),
            **counted(cost, known, convention), outputs=cost.outputs,
            cost=cost, known=known, requirements=(), bounds=bounds,
        ))
    _apply_checks(layers, [c for c in checks if c is not None], sizes)
    return layers, owned


# ATen op -> the fx rung's value-range rule it follows (in-place ops an exported graph keeps,
# aten.add_, forget ranges through track_ranged_storage)
_RANGE_KEYS = {
    "unsqueeze": "unsqueeze", "view": "view", "_unsafe_view": "view", "reshape": "reshape",
    "expand": "expand", "permute": "permute", "transpose": "transpose", "t": "transpose",
    "clone": "clone", "alias": "view", "slice": "view", "select": "view", "squeeze": "view",
    "add": "add", "sub": "sub", "mul": "mul", "to": "to", "_to_copy": "to",
    "add_": "add_", "sub_": "sub_", "mul_": "mul_",
    "neg": "neg", "abs": "abs", "rsub": "rsub", "floor_divide": operator.floordiv,
    "flip": "flip", "roll": "roll", "clamp": "clamp",
}


def _ranged(op: str, args: tuple, kwargs: dict, output: Any, sizes: _Sizes
            ) -> tuple[Any, tuple[tuple[sp.Expr, str], ...]]:
    """Return (output with the range of its values, the margins of a table read): positions
    from aten.arange through the fx rung's value-range rules, checked where aten.index reads
    a table with them."""
    def symbolic(value: Any) -> Any:  # a size scale torch.export keeps as a SymFloat
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            try:
                return sizes.convert(value.node.expr)
            except UnsupportedLayer:
                return None
        return value

    args = tuple(symbolic(a) for a in args)
    if op == "arange" and isinstance(output, SymTensor):
        start, end, step = ((0, *args, 1) if len(args) == 1 else (*args, 1))[:3]
        if all(isinstance(v, (int, sp.Expr)) and not isinstance(v, bool)
               for v in (start, end, step)) and sp.sympify(step).is_positive:
            length = sp.ceiling(sp.sympify(end - start) / step)
            return replace(output, value_range=(sp.sympify(start),
                                                sp.sympify(start + (length - 1) * step))), ()
        return output, ()
    if op == "index" and len(args) == 2 and isinstance(args[0], SymTensor):
        bounds = tuple(
            bound for position, index in enumerate(args[1]) if isinstance(index, SymTensor)
            for bound in rules.index_bounds(index, args[0].shape[position], position))
        return output, bounds
    key = _RANGE_KEYS.get(op)
    if key is None or not any(getattr(a, "value_range", None) is not None for a in args):
        return output, ()
    return rules.with_value_range(key, args, kwargs, output), ()


def _size_value(sizes: _Sizes, value: Any) -> Any:
    try:
        return sizes.tensor(value) if value is not None else None
    except UnsupportedLayer:
        return None


def _condition(sizes: _Sizes, value: Any) -> Any:
    if isinstance(value, torch.SymBool):
        try:
            return sizes.convert(value.node.expr)
        except UnsupportedLayer:
            return None
    return None


def _apply_checks(layers: list[Layer], checks: list, sizes: _Sizes) -> None:
    """Turn the graph's runtime size checks into refusals (a fixed size) or requirements."""
    for check in checks:
        if check is sp.true:
            continue
        if isinstance(check, sp.Eq):
            difference = sp.simplify(check.lhs - check.rhs)
            for symbol, name in ((H, "H"), (W, "W")):
                solutions = sp.solve(difference, symbol) if difference.has(symbol) else []
                if len(solutions) == 1 and solutions[0].is_number:
                    raise ValueError(
                        f"the model's forward requires {name} == {solutions[0]} (a torch.export "
                        "runtime check)"
                    )
            if layers:
                first = layers[0]
                layers[0] = replace(first, requirements=(
                    *first.requirements, (check.lhs, check.rhs, "a torch.export runtime check")
                ))
    if sizes.same and layers:
        first = layers[0]
        layers[0] = replace(first, requirements=(
            *first.requirements, (H, W, "torch.export guard: the model needs H == W"),
        ))


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


# nn.Dropout, nn.Dropout2d/3d, nn.AlphaDropout, nn.FeatureAlphaDropout
_DROPOUT_OPS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"})


def _running_module(node: torch.fx.Node, network: torch.nn.Module) -> torch.nn.Module | None:
    """Return the innermost module of `network` that ran an exported op, None if unknown."""
    if not node.meta.get("nn_module_stack"):
        return None
    try:
        return network.get_submodule(module_scope(node))
    except AttributeError:
        return None


def _label(node: torch.fx.Node, op: str, seen: Counter) -> str:
    scope = module_scope(node)
    name = f"{scope}.{op}" if scope else op
    seen[name] += 1
    return name if seen[name] == 1 else f"{name}:{seen[name]}"


def _with_output(cost: LayerCost, output: Any) -> LayerCost:
    """Return `cost` with the graph's output shape, counts that follow it filled in."""
    cost = replace(cost, output=output)
    extra = dict(cost.extra)
    if "per_output" in extra:  # upsampling: counts per output value
        cost = replace(cost, connections=cost.outputs * extra["per_output"])
    if cost.kind == "conv" and "has_bias" in extra:  # transposed: bias per output value
        cost = replace(cost, bias_connections=cost.outputs * extra["has_bias"])
    return cost


# --- the rungs -------------------------------------------------------------------------------

PROBE = (64, 64)  # the size the dynamic export traces at (H, W stay symbolic)


def analyse_exported(prepared: _Prepared, convention: Convention, exact: bool,
                     allow_unknown: bool, resolutions: Sequence[tuple[int, int]] | None = None):
    """Return the Analysis from torch.export with dynamic H, W (formulas in H, W)."""
    _images_only(prepared)
    probe = tuple(resolutions[0]) if resolutions else PROBE
    runs_at_twice = _fixed_size_on_meta(prepared, probe)
    program = export(prepared.network, prepared.channels, probe, dynamic=True)
    image = _image(program)
    # a SymInt whose expression is a number was specialised by a guard (timm crossvit's
    # `if H != 240` at 240: its formulas were constants, wrong at 248 by the resize it skipped)
    fixed = [name for name, d in zip("HW", image.shape[2:], strict=True)
             if not isinstance(d, torch.SymInt) or d.node.expr.is_number]
    if fixed:
        raise ValueError(
            f"torch.export fixed {' and '.join(fixed)} to {probe[0]}x{probe[1]}: the model's "
            "forward holds only at that size"
        )
    if not runs_at_twice:
        _runs_at_another_size(prepared, probe)
    layers, owned = interpret_exported(program, convention, allow_unknown, prepared.network)
    analysis = _finish(prepared, None, layers, convention, exact, owned)
    analysis.capture = "export"
    analysis.graph_module = None
    analysis.export_program = program
    guards = _guards(program)
    analysis.assumptions.extend(guards)
    analysis.branches = _branch_guards(program, probe)
    analysis.assumptions.extend(text for _, _, text in analysis.branches)
    return analysis


def _image(program) -> Any:
    """Return the fake tensor of the program's input image (its user input: not a parameter,
    buffer or lifted constant, which swin_t's exported graph puts first)."""
    user = set(program.graph_signature.user_inputs)
    return next(n for n in program.graph.nodes
                if n.op == "placeholder" and n.name in user).meta["val"]


def _images_only(prepared: _Prepared) -> None:
    """Refuse an input that is not C x H x W (the ATen rules and guards name H and W)."""
    if len(prepared.axes) != 2:
        shape = "x".join(map(str, ("C", *prepared.axes)))
        raise NotImplementedError(
            f"the export rung counts CxHxW inputs, not {shape}; the fx and concrete rungs "
            "count it (--capture fx or concrete)"
        )


def _fixed_size_on_meta(prepared: _Prepared, probe: tuple[int, int]) -> bool:
    """Refuse, before exporting, a model whose meta-device build runs at the probe size but not
    at twice it (a ViT's size assert): the same answer _runs_at_another_size gives after the
    export, without the export (seconds to minutes) or a forward pass at 4x the pixels. Return
    whether the meta build ran at twice the size (then the real one does too: meta tensors
    refuse only what reads values, so _runs_at_another_size has nothing left to find)."""
    if prepared.meta_network() is None:
        return False
    other = (2 * probe[0], 2 * probe[1])

    def failure(size: tuple[int, int]) -> Exception | None:
        try:
            with torch.no_grad(), MetaShapes(), state_kept(prepared.meta):
                prepared.meta(torch.zeros(1, prepared.channels, *size, device="meta"))
        except OutOfTime:  # auto's budget for this rung, not the model's answer
            raise
        except Exception as error:  # the model's own check, or what meta tensors cannot do
            return error
        return None

    error = failure(other)  # first: a model that runs there needs no second forward pass
    if error is None:
        return True
    # the model's own size check (torch._assert, assert) is the answer; anything else may be
    # what meta tensors cannot do, so the probe size must run for the size to be the cause
    if not isinstance(error, AssertionError) and failure(probe) is not None:
        return False  # meta cannot run it at all: the check after the export decides
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(
        f"at {other[0]}x{other[1]}, twice {probe[0]}x{probe[1]}, the model fails "
        f"({first[:120]}): its input size is fixed"
    )


def _runs_at_another_size(prepared: _Prepared, probe: tuple[int, int]) -> None:
    """Refuse formulas for a model that runs at the probe size only (a check export dropped)."""
    other = (2 * probe[0], 2 * probe[1])
    try:
        with torch.no_grad(), state_kept(prepared.network):  # a cache it fills stays as it was
            prepared.network(torch.zeros(1, prepared.channels, *other))
    except Exception as error:  # the model's own check, whatever its type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"the model runs at {probe[0]}x{probe[1]} but not at {other[0]}x{other[1]} "
            f"({first[:120]}): its input size is fixed"
        ) from None


def _guards(program) -> list[str]:
    lines = []
    image = _image(program)
    names = {}
    for value, symbol in zip(image.shape[2:], "HW", strict=True):
        if isinstance(value, torch.SymInt):
            names[value.node.expr] = symbol
    for expression, bounds in program.range_constraints.items():
        name = names.get(expression)
        if name is None:
            continue
        upper = bounds.upper
        upper_text = "" if str(upper) in ("int_oo", "oo") else f" and at most {upper}"
        lines.append(f"torch.export guard: {name} at least {bounds.lower}{upper_text}")
    return lines


def _branch_guards(program, probe: tuple[int, int]) -> tuple[tuple[sp.Expr, str, str], ...]:
    """Return the conditions on H, W that torch.export's trace took for granted, as the fx
    rung's branch conditions (lhs - rhs, relation, text): the guards its symbolic shapes
    recorded (a branch on a size, a size that is not 1), which the exported program keeps
    only as ranges where they are ranges. Refuse a guard that pins the input size: an
    equality that fails at twice and at four times the probe (efficientvit_m0's last stage
    equal to its window: the graph holds at 193..224 only, and gave wrong counts at 448)."""
    image = _image(program)
    environment = getattr(getattr(image, "fake_mode", None), "shape_env", None)
    if environment is None:
        return ()
    sizes = _Sizes(*image.shape[2:])
    at_probe = dict(zip((H, W), probe, strict=True))
    conditions = {}
    for guard in environment.guards:
        try:
            condition = sizes.convert(guard.expr)
        except UnsupportedLayer:
            continue  # a guard on no size of the image (another input's, a value's)
        if condition in (sp.true, True) or not isinstance(condition, sp.core.relational.Relational):
            continue
        if not condition.free_symbols or condition.subs(at_probe) is not sp.true:
            continue  # not about H, W; or not a condition the probe met (never recorded so)
        difference = sp.expand(condition.lhs - condition.rhs)
        text = (f"{condition.lhs} {condition.rel_op} {condition.rhs} (a torch.export guard, "
                f"traced at {probe[0]}x{probe[1]})")
        pinned = pinned_away(difference, (H, W), probe) if condition.rel_op == "==" else ""
        if pinned:
            raise ValueError(f"torch.export's trace pins the input size: {text} holds at "
                             f"neither {pinned}")
        conditions[(difference, condition.rel_op)] = text
    return tuple((difference, relation, text)
                 for (difference, relation), text in conditions.items())


def analyse_exported_concrete(prepared: _Prepared, convention: Convention, allow_unknown: bool,
                              resolutions: Sequence[tuple[int, int]]):
    """Return the Analysis counted from a static-shape export at each resolution."""
    _images_only(prepared)
    per_resolution: dict[tuple[int, int], list[Layer]] = {}
    programs = {}
    owned: set[str] = set()
    for height, width in resolutions:
        program = export(prepared.network, prepared.channels, (height, width), dynamic=False)
        programs[(height, width)] = program
        per_resolution[(height, width)], owned = interpret_exported(
            program, convention, allow_unknown, prepared.network
        )
        refuse_reads_outside(prepared.name, per_resolution[(height, width)], (height, width))
    analysis = concrete_analysis(prepared, None, per_resolution, convention, owned)
    analysis.capture_note = "torch.fx cannot trace it; counted from torch.export at each size"
    analysis.export_programs = programs  # verify runs each size's graph
    return analysis
