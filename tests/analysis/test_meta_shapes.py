"""MetaShapes answers as PyTorch's meta kernels do: shape, dtype and layout, or PyTorch's error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convtally.analysis import meta_shapes
from convtally.analysis.meta_shapes import MetaShapes
from hypothesis import given, settings
from hypothesis import strategies as st


def meta(*shape: int, dtype: torch.dtype = torch.float32,
         channels_last: bool = False) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    return tensor.to(memory_format=torch.channels_last) if channels_last else tensor


def outcome(call) -> tuple:
    """Return what a call gives: (shape, dtype, strides of the dimensions longer than 1), or
    the error's type and message."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - the error itself is compared
        return (type(error), str(error))
    return (tuple(result.shape), result.dtype,
            tuple(s for n, s in zip(result.shape, result.stride(), strict=True) if n > 1))


def answered(call) -> tuple:
    """Return (outcome with MetaShapes, whether a rule gave the result, PyTorch's kernel not
    run)."""
    by_rule = []
    rules = dict(meta_shapes.RULES)

    def recorded(rule):
        def wrapper(*args, **kwargs):
            result = rule(*args, **kwargs)
            by_rule.append(result is not None)
            return result
        return wrapper

    meta_shapes.RULES.update({func: recorded(rule) for func, rule in rules.items()})
    try:
        with MetaShapes():
            result = outcome(call)
    finally:
        meta_shapes.RULES.update(rules)
    return result, any(by_rule)


x4 = meta(2, 8, 6, 5)
CALLS = {
    "relu": lambda: F.relu(x4), "relu_inplace": lambda: F.relu(x4, True),
    "gelu": lambda: F.gelu(meta(2, 7, 16)), "gelu_tanh": lambda: F.gelu(x4, approximate="tanh"),
    "hardswish_channels_last": lambda: F.hardswish(meta(2, 8, 6, 5, channels_last=True)),
    "silu_transposed": lambda: F.silu(meta(2, 7, 16).transpose(1, 2)),
    "relu_of_a_slice": lambda: F.relu(meta(2, 8, 6, 5)[:, :4]),
    "leaky_relu": lambda: F.leaky_relu(x4, 0.2), "elu": lambda: F.elu(x4, 1.0, False),
    "hardtanh": lambda: F.hardtanh(x4, -1.0, 1.0), "dropout": lambda: F.dropout(x4, 0.1, False),
    "sigmoid": lambda: torch.sigmoid(x4), "tanh_method": lambda: x4.tanh(),
    "linear": lambda: F.linear(meta(2, 7, 16), meta(32, 16), meta(32)),
    "linear_no_bias": lambda: F.linear(meta(5, 16), meta(3, 16)),
    "linear_wrong_features": lambda: F.linear(meta(2, 7, 15), meta(32, 16), meta(32)),
    "linear_wrong_bias": lambda: F.linear(meta(2, 7, 16), meta(32, 16), meta(31)),
    "layer_norm": lambda: F.layer_norm(meta(2, 7, 16), (16,), meta(16), meta(16)),
    "layer_norm_two_dims": lambda: F.layer_norm(meta(2, 7, 16), (7, 16)),
    "layer_norm_wrong_shape": lambda: F.layer_norm(meta(2, 7, 16), (15,)),
    "layer_norm_transposed": lambda: F.layer_norm(meta(2, 16, 7).transpose(1, 2), (16,)),
    "group_norm_channels_last": lambda: F.group_norm(meta(2, 8, 6, 5, channels_last=True), 4),
    "batch_norm_transposed": lambda: F.batch_norm(meta(2, 5, 8).transpose(1, 2), meta(8),
                                                  meta(8)),
    "dropout_training_transposed": lambda: F.dropout(meta(2, 5, 8).transpose(1, 2), 0.1, True),
    "batch_norm": lambda: F.batch_norm(x4, meta(8), meta(8), meta(8), meta(8)),
    "batch_norm_channels_last": lambda: F.batch_norm(
        meta(2, 8, 6, 5, channels_last=True), meta(8), meta(8)),
    "batch_norm_wrong_channels": lambda: F.batch_norm(x4, meta(7), meta(7)),
    "group_norm": lambda: F.group_norm(x4, 4, meta(8), meta(8)),
    "group_norm_indivisible": lambda: F.group_norm(x4, 3),
    "add_residual": lambda: x4 + meta(2, 8, 6, 5),
    "add_broadcast_scale": lambda: x4 * meta(8, 1, 1),
    "add_scalar_right": lambda: 1 + x4, "mul_int_scalar": lambda: meta(3, 4, dtype=torch.long) * 2,
    "mul_int_by_float": lambda: meta(3, 4, dtype=torch.long) * 0.5,
    "add_alpha": lambda: torch.add(x4, x4, alpha=2), "sub_method": lambda: x4.sub(x4),
    "add_mismatch": lambda: x4 + meta(2, 7, 6, 5),
    "add_layouts_differ": lambda: x4 + meta(2, 8, 6, 5, channels_last=True),
    "mul_smaller_first": lambda: meta(8, 1, 1) * x4,
    "add_smaller_first_transposed": lambda: meta(1, 8) + meta(2, 8, 6).transpose(1, 2),
    "add_both_broadcast": lambda: meta(1, 3, 1) + meta(2, 1, 1),
    # is_contiguous() but strided otherwise in a size-1 dimension: PyTorch lays it out (1, 2)
    "add_both_broadcast_permuted": lambda: meta(1, 3, 1) + meta(1, 1, 2).permute(2, 1, 0),
    "interpolate_bicubic": lambda: F.interpolate(x4, size=(9, 4), mode="bicubic"),
    "interpolate_channels_last": lambda: F.interpolate(
        meta(2, 8, 6, 5, channels_last=True), size=(3, 3)),
    "interpolate_channels_last_1x1": lambda: F.interpolate(  # is_contiguous() all the same
        meta(2, 8, 1, 1, channels_last=True), size=(3, 3)),
    # PyTorch's errors: recompute_scale_factor with a size, a size of bools, bool - bool, a
    # fractional alpha on integers
    "interpolate_recompute_with_size": lambda: F.interpolate(x4, size=3,
                                                             recompute_scale_factor=True),
    "interpolate_bool_size": lambda: F.interpolate(x4, size=[True, True]),
    "sub_bools_broadcast": lambda: torch.sub(meta(1, 8, dtype=torch.bool),
                                             meta(2, 8, dtype=torch.bool)),
    "add_integers_fractional_alpha": lambda: torch.add(meta(1, 8, dtype=torch.long),
                                                       meta(2, 8, dtype=torch.long), alpha=0.5),
    "attention": lambda: F.scaled_dot_product_attention(meta(2, 3, 10, 8), meta(2, 3, 12, 8),
                                                         meta(2, 3, 12, 5)),
    "attention_timm_heads": lambda: F.scaled_dot_product_attention(
        *meta(2, 10, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)),
    "attention_mask": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 12, 8), meta(2, 3, 12, 8), attn_mask=meta(10, 12)),
    "attention_bool_mask": lambda: F.scaled_dot_product_attention(
        meta(2, 10, 8), meta(2, 10, 8), meta(2, 10, 8), meta(1, 10, 10, dtype=torch.bool)),
    "attention_causal": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 10, 8), meta(2, 3, 10, 8), is_causal=True),
    "attention_causal_rectangular": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 12, 8), meta(2, 3, 12, 8), is_causal=True),
    "attention_mask_and_causal": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 10, 8), meta(2, 3, 10, 8), meta(10, 10), is_causal=True),
    "attention_wrong_mask": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 12, 8), meta(2, 3, 12, 8), attn_mask=meta(10, 11)),
    "attention_wrong_width": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 12, 7), meta(2, 3, 12, 8)),
    "attention_wrong_length": lambda: F.scaled_dot_product_attention(
        meta(2, 3, 10, 8), meta(2, 3, 12, 8), meta(2, 3, 11, 8)),
}


@pytest.mark.parametrize("name", CALLS)
def test_each_call_gives_what_pytorchs_meta_kernel_gives(name):
    call = CALLS[name]
    assert answered(call)[0] == outcome(call)


def test_the_rules_answer_the_common_calls_without_pytorchs_kernels():
    """The element-wise calls, norms and linear of a transformer block are answered by a rule
    (what makes the meta forward fast); a layout PyTorch decides is left to it."""
    for name in ("relu", "gelu", "linear", "layer_norm", "batch_norm", "add_residual",
                 "add_scalar_right", "attention_timm_heads", "attention_mask",
                 "mul_smaller_first", "interpolate_bicubic"):
        _, by_rule = answered(CALLS[name])
        assert by_rule, name
    assert not answered(lambda: torch.cat([x4, x4], 1))[1]


dims = st.lists(st.integers(1, 4), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(left=dims, right=dims, layout=st.booleans(), op=st.sampled_from(["add", "mul", "sub"]),
       dtype=st.sampled_from([torch.float32, torch.int64, torch.bfloat16]))
def test_binary_calls_match_pytorch_for_any_shapes(left, right, layout, op, dtype):
    a = meta(*left, dtype=dtype)
    if layout and a.dim() == 4:
        a = a.to(memory_format=torch.channels_last)
    b = meta(*right)
    call = lambda: getattr(torch, op)(a, b)  # noqa: E731
    assert answered(call)[0] == outcome(call)


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), data=st.data(),
       op=st.sampled_from(["add", "mul", "sub"]),
       dtype=st.sampled_from([torch.float32, torch.int64]))
def test_binary_calls_on_two_layouts_of_one_shape_match_pytorch(shape, data, op, dtype):
    """Each operand a permutation of a new tensor (a transpose, a channels-last map): where
    the first one's strides decide the result's layout the rule answers, as PyTorch lays it."""
    operands = []
    for operand_dtype in (dtype, torch.float32):
        order = data.draw(st.permutations(range(len(shape))))
        stored = meta(*[shape[axis] for axis in order], dtype=operand_dtype)
        operands.append(stored.permute([order.index(axis) for axis in range(len(shape))]))
    a, b = operands
    assert list(a.shape) == list(b.shape) == shape
    call = lambda: getattr(torch, op)(a, b)  # noqa: E731
    given, by_rule = answered(call)
    assert given == outcome(call)
    assert by_rule or 1 in shape  # without size-1 dimensions, every such pair is the rule's


@settings(max_examples=200, deadline=None)
@given(dims=st.integers(1, 3), mode=st.sampled_from(
           ["nearest", "nearest-exact", "area", "linear", "bilinear", "bicubic", "trilinear"]),
       size=st.one_of(st.none(), st.integers(0, 5), st.lists(st.integers(1, 5), min_size=1,
                                                              max_size=3)),
       scale=st.sampled_from([None, 2.0, 0.5]), align_corners=st.sampled_from([None, False, True]),
       antialias=st.booleans(), layout=st.booleans(), empty=st.booleans())
def test_interpolate_matches_pytorch_for_any_arguments(dims, mode, size, scale, align_corners,
                                                       antialias, layout, empty):
    """Shapes and layout, or PyTorch's own error: a mode for another rank, align_corners with
    nearest, a size of the wrong length or zero, both size and scale, an empty input."""
    x = meta(2, 3, *(0 if empty else 4,) * dims)
    if layout and dims == 2:
        x = x.to(memory_format=torch.channels_last)
    call = lambda: F.interpolate(x, size, scale, mode, align_corners,  # noqa: E731
                                 antialias=antialias)
    assert answered(call)[0] == outcome(call)


class PositionEmbedding(torch.nn.Module):
    """Patches plus a learned embedding for 16 of them: runs at 16x16 (4x4 patches) only."""

    def __init__(self):
        super().__init__()
        self.patches = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.position = torch.nn.Parameter(torch.zeros(1, 16, 8))
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.patches(x).flatten(2).transpose(1, 2) + self.position)


@pytest.mark.parametrize("build,side", [(PositionEmbedding, 16), ("hiera_tiny_224", 224)])
def test_a_model_that_fails_at_twice_its_size_fails_as_it_does_without_the_rules(build, side):
    """The export rung's size check runs the meta build under MetaShapes: the shape error the
    model meets at another size (hiera's position embedding) is PyTorch's own error."""
    if isinstance(build, str):
        timm = pytest.importorskip("timm")
        build = lambda: timm.create_model("hiera_tiny_224")  # noqa: E731
    with torch.device("meta"):
        network = build().eval()
    with torch.no_grad():
        twice = outcome(lambda: network(meta(1, 3, 2 * side, 2 * side)))
        once = outcome(lambda: network(meta(1, 3, side, side)))
        assert isinstance(twice[0], type) and issubclass(twice[0], RuntimeError)
        assert isinstance(once[0], tuple)  # it runs at its own size
        with MetaShapes():
            assert outcome(lambda: network(meta(1, 3, 2 * side, 2 * side))) == twice
            assert outcome(lambda: network(meta(1, 3, side, side))) == once


@settings(max_examples=200, deadline=None)
@given(dims=st.integers(1, 3), groups=st.sampled_from([1, 2]), channels=st.integers(1, 3),
       out=st.integers(1, 3), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.sampled_from([0, 1, 2, "same", "valid", (1, 0)]), dilation=st.integers(1, 2),
       size=st.integers(1, 9), bias=st.booleans(), wrong_channels=st.booleans())
def test_convolutions_match_pytorch_for_any_arguments(dims, groups, channels, out, kernel, stride,
                                                      padding, dilation, size, bias,
                                                      wrong_channels):
    """Shapes, or PyTorch's own error: too small an input, 'same' with a stride, channels that
    do not match the weight's (times the groups)."""
    convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    x = meta(2, channels * groups + int(wrong_channels), *(size,) * dims)
    weight = meta(out * groups, channels, *(kernel,) * dims)
    if isinstance(padding, tuple):
        padding = padding[:1] * dims if dims > 1 else padding[:1]
    call = lambda: convolution(x, weight, meta(out * groups) if bias else None,  # noqa: E731
                               stride, padding, dilation, groups)
    assert answered(call)[0] == outcome(call)


def test_a_convolution_is_answered_by_its_rule():
    assert answered(lambda: F.conv2d(x4, meta(4, 8, 3, 3), meta(4), 2, 1))[1]
