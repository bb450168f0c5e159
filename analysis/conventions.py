"""Counting conventions as data: which terms go into weights and connections.

A convention is a table of rules. Each rule says how one kind of layer is counted, as a sum of
coefficient x quantity (the quantities a `LayerCost` exposes: macs, outputs, inputs, ...), plus
bias terms that count only when the convention counts biases. Rules are looked up by the most
specific key first:

    "op@via", "kind@via", "*@via", "op", "kind", "*"

where `op` is the operation (relu, max_pool2d, upsample_bilinear, add, ...), `kind` the layer
kind (conv, norm, activation, ...) and `via` how it was called (module, F, torch, Tensor,
operator, ...). The presets reproduce what fvcore, ptflops, thop, torchinfo and PyTorch's
FlopCounterMode count; each rule names the source file that says so. The three switches of
docs/counting.md (biases, BatchNorm weights, element-wise layers) still apply on top of any preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import sympy as sp
from convtally.analysis.rules import LayerCost

ELEMENTWISE_KINDS = frozenset({"norm", "activation", "elementwise"})
# how a call reached its op when it is not a module call (rules.call_via)
FUNCTION_VIAS = ("F", "torch", "Tensor", "operator", "function")

Terms = tuple[tuple[str, sp.Rational], ...]


@dataclass(frozen=True)
class Rule:
    """How one kind of layer is counted: sum of coefficient x quantity, bias terms apart."""

    terms: Terms = ()
    bias: Terms = (("bias", sp.Integer(1)),)  # counted only when biases are in connections
    source: str = ""  # the file (and function) of the tool that counts this way

    def count(self, cost: LayerCost, with_bias: bool) -> sp.Expr:
        """Return the count for `cost`, with the bias terms when `with_bias`."""
        main, bias = self.parts(cost)
        return main + bias if with_bias else main

    def parts(self, cost: LayerCost) -> tuple[sp.Expr, sp.Expr]:
        """Return (count without bias terms, bias terms) for `cost`."""
        main = sp.Add(*(c * cost.quantity(q) for q, c in self.terms))
        bias = sp.Add(*(c * cost.quantity(q) for q, c in self.bias))
        return sp.sympify(main), sp.sympify(bias)

    def formula(self) -> str:
        """Return the rule as text, e.g. '2*outputs' or 'macs [+ bias]'."""
        main = _terms_text(self.terms) or "0"
        return f"{main} [+ {_terms_text(self.bias)}]" if self.bias else main


def _terms_text(terms: Terms) -> str:
    text = ""
    for quantity, coefficient in terms:
        sign = "-" if coefficient < 0 else "+"
        magnitude = abs(coefficient)
        term = quantity if magnitude == 1 else f"{magnitude}*{quantity}"
        text += f" {sign} {term}" if text else ("-" if sign == "-" else "") + term
    return text


def count(source: str = "", bias: Mapping[str, int] | None = None, **terms: int) -> Rule:
    """Return a Rule counting sum(terms[q] * q) (+ the bias terms, default 1*bias)."""
    bias = {"bias": 1} if bias is None else bias
    return Rule(
        tuple((q, sp.Rational(c)) for q, c in terms.items()),
        tuple((q, sp.Rational(c)) for q, c in bias.items()),
        source,
    )


def zero(source: str = "") -> Rule:
    """Return a Rule that counts nothing, bias included."""
    return Rule((), (), source)


def _table(rules: Mapping[str, Rule]) -> Mapping[str, Rule]:
    return MappingProxyType(dict(rules))


# --- the tables ----------------------------------------------------------------------------

DESIGN = "docs/counting.md (the default counting convention)"
FVCORE = "https://github.com/facebookresearch/fvcore/blob/main/fvcore/nn/"
PTFLOPS = "https://github.com/sovrasov/flops-counter.pytorch/blob/master/ptflops/"
THOP = "https://github.com/Lyken17/pytorch-OpCounter/blob/master/thop/"
TORCHINFO = "https://github.com/TylerYep/torchinfo/blob/main/torchinfo/"
TORCH = "https://github.com/pytorch/pytorch/blob/main/torch/"

ALL_WEIGHTS = _table({"*": Rule((("weights", sp.Integer(1)),), (), "every learnable parameter")})

DEFAULT_RULES = _table({"*": count(DESIGN, macs=1)})

# fvcore 0.1.5: FlopCountAnalysis traces with torch.jit and counts only the aten ops that have
# a handle in flop_count.py _DEFAULT_SUPPORTED_OPS (one "flop" per multiply-add); every other
# op (max/avg pooling, activations, add/mul, mean, cat, dropout, ...) counts 0.
FVCORE_RULES = _table(
    {
        "conv2d": count(
            FVCORE + "jit_handles.py conv_flop_count: batch * prod(w) * prod(out[2:])", macs=1
        ),
        "conv_transpose2d": count(
            FVCORE + "jit_handles.py conv_flop_count (transposed): prod(w) * prod(x[2:])", macs=1
        ),
        "conv2d_mode": zero(
            FVCORE + "flop_count.py: padding='same'/'valid' runs aten::_convolution_mode, "
            "which has no handle"
        ),
        **{
            f"conv{n}d": count(FVCORE + "jit_handles.py conv_flop_count (any dimension)", macs=1)
            for n in (1, 3)
        },
        **{
            f"conv_transpose{n}d": count(FVCORE + "jit_handles.py conv_flop_count (transposed)",
                                         macs=1)
            for n in (1, 3)
        },
        **{
            f"conv{n}d_mode": zero(FVCORE + "flop_count.py: aten::_convolution_mode has no handle")
            for n in (1, 3)
        },
        "matmul": count(
            FVCORE + "jit_handles.py matmul_flop_jit / bmm_flop_jit: prod(a.shape) * b.shape[-1]",
            left_macs=1,
        ),
        "addmm": count(FVCORE + "jit_handles.py addmm_flop_jit: the product only", macs=1),
        "baddbmm": zero(FVCORE + "flop_count.py: aten::baddbmm has no handle"),
        "einsum": count(
            FVCORE + "jit_handles.py einsum_flop_jit: numpy einsum_path optimal flop / 2",
            einsum_fvcore=1,
        ),
        "multihead_attention": count(
            FVCORE + "jit_handles.py linear_flop_jit + bmm_flop_jit: F.multi_head_attention_"
            "forward's in/out projections (aten::linear) and its two aten::bmm",
            linear_macs=1,
            attention_bmm_macs=1,
        ),
        "shifted_window_attention": count(
            FVCORE + "jit_handles.py linear_flop_jit + matmul_flop_jit: torchvision Swin's "
            "two aten::linear and two aten::matmul (Q·K^T, A·V)",
            bias={},
            linear_macs=1,
            attention_macs=1,
        ),
        "instance_norm": count(
            FVCORE + "jit_handles.py norm_flop_counter(1): 4 per input, 5 when affine",
            inputs=4,
            affine_inputs=1,
        ),
        "linear": count(FVCORE + "jit_handles.py linear_flop_jit: prod(x) * out", macs=1),
        **{
            op: zero(FVCORE + "flop_count.py _DEFAULT_SUPPORTED_OPS: aten::lstm has no handle")
            for op in ("lstm", "lstm_projected")
        },
        "batch_norm": count(
            FVCORE + "jit_handles.py batchnorm_flop_jit (eval): 1 per input, 2 when affine",
            inputs=1,
            affine_inputs=1,
        ),
        "batch_norm_training": count(
            FVCORE + "jit_handles.py batchnorm_flop_jit (training): norm_flop_counter(1), 4 per "
            "input, 5 when affine",
            inputs=4,
            affine_inputs=1,
        ),
        "group_norm": count(
            FVCORE + "jit_handles.py norm_flop_counter: 4 per input, 5 when affine",
            inputs=4,
            affine_inputs=1,
        ),
        "layer_norm": count(
            FVCORE + "jit_handles.py norm_flop_counter: 4 per input, 5 when affine",
            inputs=4,
            affine_inputs=1,
        ),
        "upsample_nearest": count(
            FVCORE + "flop_count.py aten::upsample_nearest2d: elementwise_flop_counter(0, 1)",
            outputs=1,
        ),
        "upsample_bilinear": count(
            FVCORE + "flop_count.py aten::upsample_bilinear2d: elementwise_flop_counter(0, 4)",
            outputs=4,
        ),
        "adaptive_avg_pool2d": count(
            FVCORE + "flop_count.py aten::adaptive_avg_pool2d: elementwise_flop_counter(1, 0)",
            inputs=1,
        ),
        "*": zero(
            FVCORE + "flop_count.py _DEFAULT_SUPPORTED_OPS: no handle, not counted (activations, "
            "softmax, scaled_dot_product_attention, rms_norm, element-wise ops, routing)"
        ),
    }
)

# ptflops 0.7.5, pytorch backend: forward hooks on modules whose exact class is in
# pytorch_ops.py MODULES_MAPPING, plus (count_functional=True) patched torch.nn.functional
# functions (pytorch_engine.py patch_functional) and torch/Tensor add, mul, matmul
# (patch_tensor_ops). A module whose forward calls a patched F function is counted twice:
# nn.ReLU.forward calls F.relu, nn.MaxPool2d.forward F.max_pool2d, nn.Upsample.forward
# F.interpolate (torch/nn/modules/*.py). Python operators (x + y, x * y) are not patched.
_PT_OPS = PTFLOPS + "pytorch_ops.py "
_PT_PATCH = " + " + PTFLOPS + "pytorch_engine.py patch_functional (forward calls F.{})"
PTFLOPS_RULES = _table(
    {
        "conv2d@module": count(_PT_OPS + "conv_flops_counter_hook: + bias per output", macs=1),
        "conv2d_mode@module": count(_PT_OPS + "conv_flops_counter_hook", macs=1),
        **{
            f"conv{n}d{mode}@module": count(
                _PT_OPS + "conv_flops_counter_hook (Conv1d/Conv3d): + bias per output", macs=1
            )
            for n in (1, 3)
            for mode in ("", "_mode")
        },
        **{
            f"conv_transpose{n}d@module": count(
                _PT_OPS + "conv_flops_counter_hook(transpose=True): input positions", macs=1
            )
            for n in (1, 3)
        },
        "instance_norm@module": count(
            _PT_OPS + "bn_flops_counter_hook: input numel, x2 when affine",
            inputs=1,
            affine_inputs=1,
        ),
        **{
            f"matmul@{via}": count(
                _PT_OPS + "TENSOR_OPS_MAPPING _matmul_tensor_flops_hook: prod(a) * b[-1] "
                "(torch.matmul/mm/bmm and the Tensor methods; the @ operator is not patched)",
                left_macs=1,
            )
            for via in ("torch", "Tensor")
        },
        "conv_transpose2d@module": count(
            _PT_OPS + "conv_flops_counter_hook(transpose=True): input positions", macs=1
        ),
        "linear@module": count(
            _PT_OPS + "linear_flops_counter_hook: (in*out + out) per row", macs=1
        ),
        "batch_norm@module": count(
            _PT_OPS + "bn_flops_counter_hook: input numel, x2 when affine",
            inputs=1,
            affine_inputs=1,
        ),
        "group_norm@module": count(
            _PT_OPS + "bn_flops_counter_hook: input numel, x2 when affine",
            inputs=1,
            affine_inputs=1,
        ),
        "layer_norm@module": count(
            _PT_OPS + "bn_flops_counter_hook: LayerNorm has no .affine, so input numel", inputs=1
        ),
        "relu@module": count(
            _PT_OPS + "relu_flops_counter_hook" + _PT_PATCH.format("relu"), outputs=1, inputs=1
        ),
        "prelu@module": count(
            _PT_OPS + "relu_flops_counter_hook" + _PT_PATCH.format("prelu"), outputs=1, inputs=1
        ),
        "elu@module": count(
            _PT_OPS + "relu_flops_counter_hook" + _PT_PATCH.format("elu"), outputs=1, inputs=1
        ),
        "gelu@module": count(
            _PT_OPS + "relu_flops_counter_hook" + _PT_PATCH.format("gelu"), outputs=1, inputs=1
        ),
        "relu6@module": count(
            _PT_OPS + "relu_flops_counter_hook (ReLU6.forward calls F.hardtanh: not patched)",
            outputs=1,
        ),
        "leaky_relu@module": count(
            _PT_OPS + "relu_flops_counter_hook (F.leaky_relu is not patched)", outputs=1
        ),
        "silu@module": count(
            PTFLOPS + "pytorch_engine.py patch_functional: F.silu (nn.SiLU has no hook)", inputs=1
        ),
        "softmax@module": count(
            PTFLOPS + "pytorch_engine.py patch_functional: F.softmax (nn.Softmax has no hook)",
            inputs=1,
        ),
        "max_pool2d@module": count(
            _PT_OPS + "pool_flops_counter_hook: input numel" + _PT_PATCH.format("max_pool2d"),
            inputs=2,
        ),
        "avg_pool2d@module": count(
            _PT_OPS + "pool_flops_counter_hook: input numel" + _PT_PATCH.format("avg_pool2d"),
            inputs=2,
        ),
        "adaptive_avg_pool2d@module": count(
            _PT_OPS
            + "pool_flops_counter_hook: input numel"
            + _PT_PATCH.format("adaptive_avg_pool2d"),
            inputs=2,
        ),
        "adaptive_max_pool2d@module": count(
            _PT_OPS
            + "pool_flops_counter_hook: input numel"
            + _PT_PATCH.format("adaptive_max_pool2d"),
            inputs=2,
        ),
        "upsample@module": count(
            _PT_OPS + "upsample_flops_counter_hook: output numel" + _PT_PATCH.format("interpolate"),
            outputs=2,
        ),
        **{
            f"{op}@F": count(_PT_OPS + "FUNCTIONAL_MAPPING _numel_functional_flops_hook", inputs=1)
            for op in (
                "relu",
                "prelu",
                "elu",
                "relu6",
                "gelu",
                "silu",
                "softmax",
                "max_pool2d",
                "avg_pool2d",
                "adaptive_avg_pool2d",
                "adaptive_max_pool2d",
            )
        },
        **{
            f"{op}@module": count(
                _PT_OPS + "rnn_flops per step, layer and direction: w_ih and w_hh numel, "
                "4H gate sums, 6H cell products, both biases (per token: batch * sequence)",
                gate_macs=1,
                gate_values=1,
                cell_values=6,
            )
            for op in ("lstm", "lstm_projected")
        },
        "shifted_window_attention@function": count(
            _PT_OPS + "torchvision Swin's F.softmax (_numel_functional_flops_hook: the scores) "
            "and Tensor.matmul (_matmul_tensor_flops_hook): Q·K^T and A·V in v1, A·V only in "
            "v2, whose Q·K^T is the unpatched @; F.linear is not patched",
            bias={},
            matmul_method_macs=1,
            scores=1,
        ),
        "upsample@F": count(
            _PT_OPS + "_interpolate_functional_flops_hook: output size (or input * scale^2)",
            outputs=1,
        ),
        **{
            f"{op}@{via}": count(
                _PT_OPS + "TENSOR_OPS_MAPPING _elementwise_tensor_flops_hook: broadcast numel",
                outputs=1,
            )
            for op in ("add", "mul")
            for via in ("torch", "Tensor")
        },
        "*": zero(
            _PT_OPS + "MODULES_MAPPING / FUNCTIONAL_MAPPING / TENSOR_OPS_MAPPING: not listed "
            "(x + y, x * y, torch.cat, sigmoid, hardswish, dropout, mean ...)"
        ),
    }
)

PTFLOPS_WEIGHTS = _table(
    {
        "*": Rule(
            (("trainable_weights", sp.Integer(1)),),
            (),
            PTFLOPS + "pytorch_engine.py get_model_parameters_number: parameters with "
            "requires_grad, called or not",
        )
    }
)

# thop 0.1.1: forward hooks on modules whose exact class is in profile.py register_hooks;
# functional calls and Python operators are not seen at all.
_TH_HOOKS = THOP + "vision/basic_hooks.py "
THOP_RULES = _table(
    {
        "lstm@module": count(
            THOP + "rnn_hooks.py count_lstm -> _count_lstm_cell per step and direction: "
            "4 gates of (input + hidden) * hidden + hidden (+ 2 hidden of bias), 4 hidden more",
            bias={},
            gate_macs=1,
            gate_values=1,
            cell_values=4,
            bias_values=1,
        ),
        "lstm_projected@module": count(
            THOP + "rnn_hooks.py count_lstm: proj_size is ignored (hidden_size throughout)",
            bias={},
            unprojected_gate_macs=1,
            gate_values=1,
            cell_values=4,
            bias_values=1,
        ),
        **{
            f"{op}@module": count(
                _TH_HOOKS + "count_convNd -> calc_func.py calculate_conv2d_flops: "
                "output numel * C_in/groups * Kh*Kw, no bias",
                bias={},
                output_macs=1,
            )
            for op in (
                "conv1d", "conv2d", "conv3d", "conv1d_mode", "conv2d_mode", "conv3d_mode",
                "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
            )
        },
        "instance_norm@module": count(
            _TH_HOOKS + "count_normalization: calculate_norm = 2 * numel, x2 when affine",
            inputs=2,
            affine_inputs=2,
        ),
        "linear@module": count(
            _TH_HOOKS + "count_linear: in_features * output numel, no bias", bias={}, macs=1
        ),
        "batch_norm@module": count(
            _TH_HOOKS + "count_normalization: calculate_norm = 2 * numel, x2 when affine",
            inputs=2,
            affine_inputs=2,
        ),
        "layer_norm@module": count(
            _TH_HOOKS + "count_normalization: calculate_norm = 2 * numel, x2 when affine",
            inputs=2,
            affine_inputs=2,
        ),
        "prelu@module": count(_TH_HOOKS + "count_prelu (eval): input numel", inputs=1),
        "softmax@module": count(
            _TH_HOOKS + "count_softmax: rows * (3 * features - 1)", inputs=3, rows=-1
        ),
        "avg_pool2d@module": count(_TH_HOOKS + "count_avgpool: output numel", outputs=1),
        "adaptive_avg_pool2d@module": count(
            _TH_HOOKS + "count_adap_avgpool: (input/output window + 1) * output numel",
            inputs=1,
            outputs=1,
        ),
        "upsample_nearest@module": count(
            THOP + "vision/calc_func.py calculate_upsample: output numel", outputs=1
        ),
        "upsample_bilinear@module": count(
            THOP + "vision/calc_func.py calculate_upsample: 11 * output numel", outputs=11
        ),
        "upsample_bicubic@module": count(
            THOP + "vision/calc_func.py calculate_upsample: (224 + 35) * output numel",
            outputs=259,
        ),
        "*": zero(
            THOP + "profile.py register_hooks: zero_ops (ReLU, ReLU6, MaxPool, Dropout), "
            "count_relu = 0 (LeakyReLU), or no hook (functional calls, operators, GroupNorm, "
            "SiLU, Hardswish, Sigmoid, ...)"
        ),
    }
)
THOP_WEIGHTS = _table(
    {
        "group_norm": zero(THOP + "profile.py register_hooks: GroupNorm has no hook"),
        "rms_norm": zero(THOP + "profile.py register_hooks: RMSNorm has no hook"),
        "multihead_attention": zero(
            THOP + "profile.py register_hooks: MultiheadAttention has no hook"
        ),
        **{
            f"*@{via}": zero(
                THOP + "profile.py: parameters of leaf modules with a hook only (a parameter "
                "read in forward is not counted)"
            )
            for via in FUNCTION_VIAS
        },
        "*@module_subclass": zero(THOP + "profile.py: hooks are looked up by exact class"),
        "*": Rule(
            (("weights", sp.Integer(1)),),
            (),
            _TH_HOOKS + "count_parameters: parameters of hooked modules",
        ),
    }
)

# torchinfo 1.8.0: LayerInfo.calculate_macs on every leaf module call, from the parameters
# named weight and bias only; total_mult_adds sums leaf layers (model_statistics.py).
_TI = TORCHINFO + "layer_info.py calculate_macs: "
TORCHINFO_RULES = _table(
    {
        "conv": count(
            _TI + "'Conv' in class name: param numel * output H*W "
            "(weight: outputs * C_in/groups * Kh*Kw; bias: outputs)",
            output_macs=1,
        ),
        "linear": count(
            _TI + "param numel * output_size[0]: (in*out + out) * batch, whatever the number "
            "of rows after it (B*N rows in the first dimension: N times)",
            bias={"row_bias_params": 1},
            row_params=1,
            row_bias_params=-1,
        ),
        "norm": count(_TI + "param numel * output_size[0] (2 * C for affine BatchNorm)",
                      bias={}, row_params=1),
        **{
            op: count(
                _TI + "RNN parameters (weight_* and bias_*): numel * output_size[:2] (batch * "
                "sequence; an unbatched input's is sequence * features instead)",
                bias={},
                parameter_reads=1,
            )
            for op in ("lstm", "lstm_projected")
        },
        "activation": count(_TI + "param numel * output_size[0] (PReLU's weight; 0 otherwise)",
                            bias={}, row_params=1),
        **{
            f"*@{via}": zero(_TI + "calculate_macs runs on module calls only")
            for via in FUNCTION_VIAS
        },
        "*": zero(_TI + "no weight or bias parameter, or not a module"),
    }
)

# PyTorch's FlopCounterMode: aten mm/addmm/bmm/convolution formulas only, 2 FLOPs per
# multiply-add, no bias; every other op counts 0.
TORCH_RULES = _table(
    {
        "conv": count(
            TORCH + "utils/flop_counter.py conv_flop_count: 2 * prod(out or x spatial) * prod(w)",
            macs=2,
        ),
        "linear": count(
            TORCH + "utils/flop_counter.py mm_flop / addmm_flop: 2 * m * n * k", macs=2
        ),
        "matmul": count(
            TORCH + "utils/flop_counter.py mm_flop / bmm_flop: 2 * multiply-adds "
            "(matmul and einsum decompose to mm/bmm)",
            macs=2,
        ),
        "einsum": count(
            TORCH + "utils/flop_counter.py bmm_flop: einsum decomposes to bmm when an index "
            "is summed (an einsum without one is a mul: 0)",
            einsum_contracted_macs=2,
        ),
        "baddbmm": count(TORCH + "utils/flop_counter.py baddbmm_flop: 2 * the product", macs=2),
        "addmm": count(TORCH + "utils/flop_counter.py addmm_flop: 2 * the product", macs=2),
        "scaled_dot_product_attention": count(
            TORCH + "utils/flop_counter.py: formulas for the flash/efficient/cudnn kernels only; "
            "on the CPU sdpa of 3-d or 4-d q, k, v runs "
            "_scaled_dot_product_flash_attention_for_cpu, which has none (0); any other rank "
            "runs the math path: its Q·K^T and A·V are mm_flop / bmm_flop, 2 * multiply-adds",
            bias={},
            math_path_macs=2,
        ),
        "shifted_window_attention": count(
            TORCH + "utils/flop_counter.py addmm_flop / bmm_flop: torchvision Swin's projections "
            "and its Q·K^T, A·V, 2 * multiply-adds, no bias",
            bias={},
            linear_macs=2,
            attention_macs=2,
        ),
        "lstm": zero(
            TORCH + "utils/flop_counter.py: on the CPU an LSTM without proj_size runs "
            "aten::mkldnn_rnn_layer, which has no formula"
        ),
        "lstm_projected": count(
            TORCH + "utils/flop_counter.py mm_flop / addmm_flop: with proj_size the LSTM "
            "runs as matmuls, 2 * multiply-adds, no bias",
            macs=2,
        ),
        "multihead_attention": zero(
            TORCH + "nn/modules/activation.py MultiheadAttention.forward: in eval under no_grad "
            "the fused torch._native_multi_head_attention runs, which has no formula"
        ),
        "*": zero(TORCH + "utils/flop_counter.py flop_registry: no formula"),
    }
)


@dataclass(frozen=True)
class Convention:
    """What counts: a table of rules per layer kind/op, and the three switches on top."""

    name: str = "default"
    bias_in_connections: bool = False
    batchnorm_in_weights: bool = True
    elementwise_in_connections: bool = True
    bias_in_weights: bool = True  # False: weights without biases, as many papers count them
    connection_rules: Mapping[str, Rule] = field(
        default_factory=lambda: DEFAULT_RULES, hash=False, repr=False
    )
    weight_rules: Mapping[str, Rule] = field(
        default_factory=lambda: ALL_WEIGHTS, hash=False, repr=False
    )
    counts: str = ""  # the tool call whose numbers the preset reproduces
    unit: str = "connections"
    unused_weights: bool = False  # count parameters of modules forward never calls (a row)

    def connection_rule(self, cost: LayerCost) -> tuple[str, Rule]:
        """Return (matching key, rule) for counting `cost`'s connections."""
        return _lookup(self.connection_rules, cost)

    def weight_rule(self, cost: LayerCost) -> tuple[str, Rule]:
        """Return (matching key, rule) for counting `cost`'s weights."""
        return _lookup(self.weight_rules, cost)

    def weights(self, cost: LayerCost) -> sp.Expr:
        """Return the layer's weights under this convention."""
        if cost.kind == "norm" and not self.batchnorm_in_weights:
            return sp.Integer(0)
        weights = self.weight_rule(cost)[1].count(cost, with_bias=False)
        if not self.bias_in_weights and cost.kind != "norm":
            weights -= cost.bias_weights
        return weights

    def connection_parts(self, cost: LayerCost) -> tuple[sp.Expr, sp.Expr]:
        """Return (connections without bias terms, bias terms counted) under this convention."""
        if cost.kind in ELEMENTWISE_KINDS and not self.elementwise_in_connections:
            return sp.Integer(0), sp.Integer(0)
        main, bias = self.connection_rule(cost)[1].parts(cost)
        return main, (bias if self.bias_in_connections else sp.Integer(0))

    def connections(self, cost: LayerCost) -> sp.Expr:
        """Return the layer's connections under this convention."""
        main, bias = self.connection_parts(cost)
        return main + bias

    def describe(self) -> str:
        """Return a one-line statement of the switches, printed with every table."""
        counted = f" layers counted as {self.counts} counts them;" if self.counts else ""
        return (
            f"convention {self.name}:{counted} biases "
            f"{'in' if self.bias_in_connections else 'not in'} "
            f"connections; BatchNorm parameters {'in' if self.batchnorm_in_weights else 'not in'} "
            f"weights; element-wise layers {'in' if self.elementwise_in_connections else 'not in'} "
            "connections" + ("" if self.bias_in_weights else "; biases not in weights")
        )

    def as_dict(self) -> dict:
        """Return the convention as JSON-ready data."""
        return {
            "name": self.name,
            "bias_in_connections": self.bias_in_connections,
            "batchnorm_in_weights": self.batchnorm_in_weights,
            "elementwise_in_connections": self.elementwise_in_connections,
            "bias_in_weights": self.bias_in_weights,
            "counts": self.counts or "docs/counting.md",
            "unit": self.unit,
            "connection_rules": {k: r.formula() for k, r in self.connection_rules.items()},
            "weight_rules": {k: r.formula() for k, r in self.weight_rules.items()},
            "unused_weights": self.unused_weights,
        }


def lookup_keys(cost: LayerCost) -> tuple[str, ...]:
    """Return the rule keys tried for `cost`, most specific first."""
    op, kind, via = cost.op or cost.kind, cost.kind, cost.via or "module"
    return (f"{op}@{via}", f"{kind}@{via}", f"*@{via}", op, kind, "*")


def _lookup(table: Mapping[str, Rule], cost: LayerCost) -> tuple[str, Rule]:
    for key in lookup_keys(cost):
        if key in table:
            return key, table[key]
    raise ValueError(f"no rule for {cost.op or cost.kind} and no '*' rule in the convention")


DEFAULT = Convention()

PRESETS: dict[str, Convention] = {
    "default": DEFAULT,
    "fvcore": Convention(
        "fvcore",
        connection_rules=FVCORE_RULES,
        counts="fvcore FlopCountAnalysis(model, x).total()",
        unit="fvcore flops (multiply-adds)",
        unused_weights=True,  # parameter_count.py: every named parameter
    ),
    "ptflops": Convention(
        "ptflops",
        bias_in_connections=True,
        connection_rules=PTFLOPS_RULES,
        weight_rules=PTFLOPS_WEIGHTS,
        counts="ptflops get_model_complexity_info(model, (C, H, W), as_strings=False)[0]",
        unit="ptflops MACs",
        unused_weights=True,
    ),
    "thop": Convention(
        "thop",
        connection_rules=THOP_RULES,
        weight_rules=THOP_WEIGHTS,
        counts="thop profile(model, inputs=(x,))[0]",
        unit="thop MACs",
    ),
    "torchinfo": Convention(
        "torchinfo",
        bias_in_connections=True,
        connection_rules=TORCHINFO_RULES,
        counts="torchinfo summary(model, input_size=(1, C, H, W)).total_mult_adds",
        unit="torchinfo mult-adds",
        unused_weights=True,  # model_statistics.py: the root's leftover parameters
    ),
    "torch": Convention(
        "torch",
        connection_rules=TORCH_RULES,
        counts="torch.utils.flop_counter.FlopCounterMode total",
        unit="FLOPs (2 per multiply-add)",
    ),
}


def preset(name: str) -> Convention:
    """Return the named preset convention (PRESETS), or raise a one-line ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown convention {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def make_convention(
    bias_in_connections: bool | None = None,
    batchnorm_in_weights: bool | None = None,
    elementwise_in_connections: bool | None = None,
    base: Convention | str = DEFAULT,
    bias_in_weights: bool | None = None,
) -> Convention:
    """Return `base` (a preset or its name) with the given switches (None keeps the base's).

    The result is named 'custom' (or 'NAME+custom' on a preset) when a switch changed it.
    """
    base = preset(base) if isinstance(base, str) else base
    switches = {
        "bias_in_connections": bias_in_connections,
        "batchnorm_in_weights": batchnorm_in_weights,
        "elementwise_in_connections": elementwise_in_connections,
        "bias_in_weights": bias_in_weights,
    }
    convention = replace(base, **{k: v for k, v in switches.items() if v is not None})
    if convention == base:
        return base
    return replace(convention, name="custom" if base.name == "default" else f"{base.name}+custom")
