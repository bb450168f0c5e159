"""Layer rules on unusual settings, each checked against the running layer and fvcore."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from convtally.analysis import peers, rules
from convtally.analysis.accounting import analyse
from convtally.analysis.symbols import H, W
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.analysis.test_accounting import assert_matches_running_network


class Zoo(nn.Module):
    """Strides, dilation, groups, 'same'/'valid' padding, ceil_mode, transposed convs."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 4, padding="same", dilation=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.strided = nn.Conv2d(8, 16, 5, stride=3, padding=1)
        self.valid = nn.Conv2d(16, 16, 3, padding="valid", groups=16)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, stride=1, padding=1)
        self.up = nn.ConvTranspose2d(16, 6, 4, stride=2, padding=1, output_padding=1, groups=2,
                                     dilation=1)
        self.up2 = nn.ConvTranspose2d(6, 6, 3, stride=3, dilation=2)
        self.bilinear = nn.Upsample(size=(40, 30), mode="bilinear", align_corners=False)
        self.norm = nn.BatchNorm2d(6, affine=False)
        self.act = nn.LeakyReLU(0.1)
        self.squeeze = nn.AdaptiveAvgPool2d((3, 5))
        self.head = nn.Linear(6 * 15, 10)

    def forward(self, x):
        x = self.valid(self.strided(self.dilated(self.same(x))))
        x = self.avg(self.pool(x))
        x = self.up2(self.up(x))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.act(self.norm(self.bilinear(x)))
        x = x * torch.sigmoid(x) + x
        return self.head(torch.flatten(self.squeeze(x), 1))


@pytest.mark.parametrize("exact", [False, True])
def test_zoo_matches_running_layers(exact):
    analysis = analyse(Zoo(), exact=exact)
    sizes = [(96, 96), (60, 120)] if not exact else [(61, 77), (96, 96), (50, 101)]
    assert_matches_running_network(analysis, analysis.network, 3, sizes)


def test_zoo_adaptive_windows_and_bilinear_connections():
    analysis = analyse(Zoo(), exact=True)
    layers = {layer.name: layer for layer in analysis.layers}
    values = analysis.evaluate([(61, 77)])
    index = {layer.name: i for i, layer in enumerate(analysis.layers)}
    # bilinear to a fixed 40x30: 4 connections per output value
    assert values["connections"][index["bilinear"], 0] == 4 * 6 * 40 * 30
    # adaptive pooling of 40x30 to 3x5: windows [0,14),[13,27),[26,40) and 6 of width 6
    assert values["connections"][index["squeeze"], 0] == 6 * (14 + 14 + 14) * (6 * 5)
    assert layers["norm"].weights == 0  # affine=False


def test_registered_model_with_cat_keeps_symbolic_channels():
    analysis = analyse("unet", {"NF": 5, "NC": 3, "NIC": 2, "K": 5})
    assert_matches_running_network(analysis, analysis.network, 2, [(32, 32), (28, 44)])


def test_zoo_convolutions_match_pytorch_flop_counter():
    """fvcore reports 0 for padding='same'; PyTorch's counter (2 per multiply-add) sees it."""
    analysis = analyse(Zoo())
    values = analysis.evaluate([(96, 96)])
    counts = peers.run_torch(analysis.network, torch.zeros(1, 3, 96, 96)).per_module
    convs = [(i, layer) for i, layer in enumerate(analysis.layers)
             if layer.kind in ("conv", "linear")]
    assert {layer.name for _, layer in convs} == {"same", "dilated", "strided", "valid", "up",
                                                  "up2", "head"}
    for index, layer in convs:
        assert 2 * int(values["connections"][index, 0]) == counts[layer.name], layer.name


@settings(deadline=None, max_examples=60)  # sympy's first calls are slow, not wrong
@given(stride=st.integers(1, 5), offset=st.integers(-3, 3), multiple=st.integers(2, 16),
       heights=st.lists(st.integers(1, 400), min_size=1, max_size=8))
def test_a_size_padded_up_to_a_multiple_is_rewritten_with_the_same_value(
        stride, offset, multiple, heights):
    """rounded_up(a + (n - a % n) % n) is n*ceiling(a/n), equal to the padding PyTorch code
    writes at every size; a remainder that is not such a padding is left as it was."""
    import sympy as sp
    from convtally.analysis.shapes import rounded_up
    from convtally.analysis.symbols import H

    size = sp.floor((H + offset) / stride) + 1
    padded = size + (multiple - size % multiple) % multiple
    rewritten = rounded_up(padded)
    assert not rewritten.has(sp.Mod)
    assert sp.simplify(rewritten / multiple).is_integer
    not_padding = size + (multiple - size % multiple) % multiple + size % 2
    assert rounded_up(not_padding) == not_padding
    for height in heights:
        if (height + offset) >= 0:
            point = {H: height}
            assert rewritten.xreplace(point) == padded.xreplace(point)


class PoolsToAFixedGrid(nn.Module):
    """timm MobileNetV5's fusion: an average pool whose window and stride are read from the
    input size (H // 4), so the output is a 4 x 4 grid at sizes divisible by 4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        window = (x.shape[2] // 4, x.shape[3] // 4)
        return F.avg_pool2d(x, kernel_size=window, stride=window)


@pytest.mark.parametrize("exact", [False, True])
def test_a_pool_window_read_from_the_input_size_has_formulas(exact):
    from convtally.analysis.verification import verify

    analysis = analyse(PoolsToAFixedGrid().eval(), exact=exact)
    assert analysis.capture == "fx" and analysis.symbolic
    pool = next(layer for layer in analysis.layers if layer.type == "avg_pool2d")
    sizes = [(32, 32), (40, 24), (64, 96)] + ([(42, 30)] if exact else [])
    for height, width in sizes:
        values = {H: height, W: width}
        assert [int(d.subs(values)) for d in pool.output_shape] == [8, 4, 4]
        assert int(pool.connections.subs(values)) == 8 * 4 * 4 * (height // 4) * (width // 4)
    assert verify(analysis, sizes).mismatches == []


class RelativePositions(nn.Module):
    """timm MViTv2's pattern: relative positions from torch.arange over the token grid's side
    (a size read from the input), cast to long and read through a table of fixed size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.table = nn.Parameter(torch.randn(63, 4))

    def forward(self, x):
        x = self.conv(x)
        side = x.shape[2]
        distance = torch.arange(side)[:, None] - torch.arange(side)[None, :] + (side - 1)
        return x.mean((2, 3))[:, None, None, :] + self.table[distance.long()]


def test_arange_over_a_size_read_from_the_input_has_formulas():
    from convtally.analysis.verification import verify

    analysis = analyse(RelativePositions().eval())
    assert analysis.capture == "fx" and analysis.symbolic
    ranges = [layer for layer in analysis.layers if layer.type == "arange"]
    assert len(ranges) == 2
    assert [layer.outputs for layer in ranges] == [H / 4, H / 4]  # under H divisible by 4
    result = verify(analysis, [(32, 32), (64, 40), (128, 96)])
    assert result.mismatches == []
    # the indices x[index] keeps for backward, computed in forward: new int64 memory
    read = [c for c in result.checks if c.type == "getitem" and c.saved_measured]
    assert [c.saved_formula for c in read] == [c.saved_measured for c in read] == [
        8 * (side // 4) ** 2 for side in (32, 64, 128)]


build_grid = None  # timm's _build_grid, set by the test (timm is optional)


class Grid(nn.Module):
    """Coordinates over the feature map's size, as qwen3_vit's rotary positions build them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 4, stride=4)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        return x * build_grid([x.shape[1], x.shape[2]], ndim=2)


def test_timm_coordinate_grid_over_the_input_size_has_formulas(monkeypatch):
    """timm's _build_grid (qwen3_vit's and deepseek_vit's rotary positions) over the feature
    map's size: a table of (h, w, 2) coordinates, routing, in formulas that verify."""
    pytest.importorskip("timm")
    from convtally.analysis.verification import verify
    from timm.layers.pos_embed_sincos import _build_grid

    monkeypatch.setitem(globals(), "build_grid", _build_grid)  # a leaf, as timm's own calls
    analysis = analyse(Grid().eval())
    assert analysis.capture == "fx" and analysis.symbolic
    grid = next(layer for layer in analysis.layers if layer.cost.op == "coordinate_grid")
    assert grid.outputs == H * W / 8  # (H/4) x (W/4) x 2, no batch
    assert verify(analysis, [(16, 16), (32, 48)]).mismatches == []


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 64), chunks=st.integers(1, 9), dim=st.sampled_from([1, -3]))
def test_chunk_of_a_known_size_gives_pytorchs_pieces(channels, chunks, dim):
    from convtally.analysis.rules import BATCH, SymTensor, chunk

    pieces = chunk(SymTensor((BATCH, channels, H, W)), chunks, dim).output
    real = torch.zeros(1, channels, 2, 2).chunk(chunks, dim)
    assert [int(piece.shape[1]) for piece in pieces] == [piece.shape[1] for piece in real]
    assert all(piece.shape[2:] == (H, W) for piece in pieces)


class ChunksUnevenly(nn.Module):
    """timm edgenext_xx_small's split transpose block: 88 channels in chunks of 30, 30, 28."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 88, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(30, 30, 3, padding=1) for _ in range(2)])
        self.last = nn.Conv2d(28, 8, 1)

    def forward(self, x):
        first, second, third = self.stem(x).chunk(3, dim=1)
        second = self.convs[1](second + self.convs[0](first))  # a piece added to a conv's output
        return torch.cat([first, second, self.last(third)], 1)


@pytest.mark.parametrize("exact", [False, True])
def test_a_network_that_chunks_channels_unevenly_is_counted_as_it_runs(exact):
    network = ChunksUnevenly().eval()
    analysis = analyse(network, exact=exact)
    assert analysis.capture == "fx"
    assert_matches_running_network(analysis, network, 3, [(16, 16), (20, 12)])
    cat = next(layer for layer in analysis.layers if layer.type == "cat")
    assert str(cat.output_shape[0]) == "68"


@pytest.mark.parametrize("cls", [rules.LayerCost, rules.SymTensor])
def test_a_costs_and_a_tensors_own_init_take_their_fields_in_order_with_their_defaults(cls):
    """LayerCost and SymTensor fill their fields by hand (faster than dataclasses' frozen
    __init__): the same parameters, in the same order, with the same defaults, and every
    field set to what it was given."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, found in zip(parameters, fields, strict=True):
        expected = inspect.Parameter.empty if found.default is dataclasses.MISSING else (
            found.default)
        assert parameter.default == expected and type(parameter.default) is type(expected)
    values = {f.name: object() for f in fields}
    made = cls(**values)
    assert all(getattr(made, name) is value for name, value in values.items())
    assert dataclasses.replace(made, **{fields[0].name: "changed"}) != made


def test_equal_costs_and_tensors_hash_alike_and_a_pickled_tensor_hashes_anew():
    """The hand-written hashes (a tensor's remembered, a cost's over the fields that tell costs
    apart) agree with equality: equal values hash alike, whatever was remembered; a pickled
    tensor carries no remembered hash into another process."""
    import pickle

    import sympy as sp

    batch = rules.BATCH
    first = rules.SymTensor((batch, sp.Integer(4), H))
    hash(first)
    same = rules.SymTensor((batch, sp.Integer(4), H), value_range=(sp.Integer(0), H))
    assert same == first and hash(same) == hash(first)
    costs = [rules.LayerCost("linear", tensor, weights=sp.Integer(12), connections=4 * H,
                             extra=(("rows", H),)) for tensor in (first, same)]
    assert costs[0] == costs[1] and hash(costs[0]) == hash(costs[1])
    assert costs[0] != dataclasses.replace(costs[0], extra=())
    assert "_hash" not in pickle.loads(pickle.dumps(first)).__dict__
