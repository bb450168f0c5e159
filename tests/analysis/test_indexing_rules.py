"""Indexing a constant table (relative-position bias through its index buffer), F.normalize and
negation: the rules that took beit, eva, swin, coatnet and efficientformer off the refusal list,
each checked against the running network, fvcore and FlopCounterMode."""

from __future__ import annotations

import operator
import warnings

import pytest
import sympy as sp
import torch
from convtally.analysis.accounting import (
    H,
    PinnedBranch,
    ResolutionError,
    W,
    analyse,
    answer_every_resolution,
)
from convtally.analysis.conventions import preset
from convtally.analysis.rules import (
    ParameterTensor,
    SymTensor,
    UnsupportedLayer,
    getitem,
    with_value_range,
)
from convtally.analysis.verification import verify
from torch import nn

from tests.analysis.test_capture import fvcore_total
from tests.analysis.test_verify_capture import torch_total


class AttentionBias(nn.Module):
    """EfficientFormer's attention bias: a parameter table read through an index buffer."""

    def __init__(self, heads: int = 2, side: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(3, heads, 4, stride=4)
        points = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side),
                                            indexing="ij")).flatten(1)
        offsets = (points[..., :, None] - points[..., None, :]).abs()
        index = offsets[0] * side + offsets[1]
        self.biases = nn.Parameter(torch.randn(heads, side * side))
        self.register_buffer("index", index)  # (16, 16): integer indices into 16 entries

    def forward(self, x):
        x = self.proj(x).flatten(2)  # B x heads x 16 (16x16 input)
        attention = x[..., :, None] * x[..., None, :] + self.biases[:, self.index]
        return attention.softmax(-1).sum((2, 3))


def test_bias_table_indexing_is_counted_and_verified():
    network = AttentionBias().eval()
    analysis = analyse(network, capture="fx")
    index = next(layer for layer in analysis.layers if layer.cost.op == "index")
    assert [int(d) for d in index.output_shape] == [16, 16]  # 2 x 16 x 16, no batch
    assert analysis.totals_at([(16, 16)])["weights"][0] == sum(
        p.numel() for p in network.parameters())
    result = verify(analysis, [(16, 16)])
    assert result.mismatches == []
    row = next(c for c in result.checks if c.layer == index.name)
    assert row.shape_measured == row.shape_formula == [16, 16]
    assert row.outputs_measured == 2 * 16 * 16


class AttentionBiasThroughAView(AttentionBias):
    """Swin's read: the index buffer flattened by a view, the bias shaped back after."""

    def forward(self, x):
        x = self.proj(x).flatten(2)
        bias = self.biases[:, self.index.view(-1)].view(-1, 16, 16)
        attention = x[..., :, None] * x[..., None, :] + bias
        return attention.softmax(-1).sum((2, 3))


@pytest.mark.parametrize("build", [AttentionBias, AttentionBiasThroughAView])
def test_an_index_buffer_is_not_saved_again_for_backward(build):
    """autograd keeps the indices of x[index], but an index buffer (or a view of one) is the
    buffer's memory: nothing new, as the saved-tensor hooks measure."""
    analysis = analyse(build().eval(), capture="fx")
    index = next(layer for layer in analysis.layers if layer.cost.op == "index")
    result = verify(analysis, [(16, 16)])
    assert result.mismatches == []
    row = next(c for c in result.checks if c.layer == index.name)
    assert row.saved_formula == row.saved_measured == 0


def test_boolean_mask_like_index_is_refused():
    table = ParameterTensor((sp.Integer(4), sp.Integer(3)), target="table")
    mask = ParameterTensor((sp.Integer(4),), target="mask")
    with pytest.raises(UnsupportedLayer, match="boolean mask"):
        getitem(table, mask)
    index = SymTensor((sp.Integer(5), sp.Integer(2)))
    assert getitem(table, index).output.shape == (5, 2, 3)
    assert getitem(table, (slice(None), index)).output.shape == (4, 5, 2)
    assert getitem(table, (Ellipsis, slice(1, None))).output.shape == (4, 2)


def timm_model(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def assert_equals_the_tools(network: nn.Module, size: tuple[int, int], capture: str) -> None:
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[size])
    assert analysis.capture == capture and analysis.complete
    totals = analysis.totals_at([size])
    assert totals["weights"][0] == sum(p.numel() for p in network.parameters())
    assert totals["connections"][0] == fvcore_total(network, size)
    ours = analysis.with_convention(preset("torch")).totals_at([size])["connections"][0]
    assert ours == torch_total(network, size)


def test_coatnet_relative_position_bias_is_symbolic():
    """timm's maxxvit reads its bias table through relative_position_index: fx, exact."""
    network = timm_model("test_coatnet")
    assert_equals_the_tools(network, (160, 160), "fx")


def test_vit_relpos_bias_is_counted_at_its_size():
    assert_equals_the_tools(timm_model("test_vit_relpos"), (160, 160), "concrete")


def test_efficientformer_attention_biases_after_a_forward():
    """EfficientFormer caches its attention biases on a forward: counted all the same."""
    network = timm_model("efficientformer_l1", embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 2),
                         num_vit=1)
    with torch.no_grad():
        network(torch.zeros(1, 3, 224, 224))
    assert_equals_the_tools(network, (224, 224), "fx")


def test_swinv2_normalize_is_a_rule():
    """Swin V2's cosine attention normalises q and k (F.normalize): a rule, no unknown rows."""
    network = timm_model("swinv2_tiny_window8_256", depths=(1, 1, 1, 1), embed_dim=32,
                         num_heads=(1, 1, 2, 2), img_size=64, window_size=4)
    assert_equals_the_tools(network, (64, 64), "concrete")


def test_eva_rotary_negation_is_a_rule():
    """EVA's rotary embedding negates half the channels (-x): a rule, no unknown rows."""
    network = timm_model("eva02_tiny_patch14_224", depth=1, img_size=56)
    assert_equals_the_tools(network, (56, 56), "concrete")


class NewOps(nn.Module):
    """The ops docs/conventions.md lists for the ladder: a bias table read through an index,
    x[..., :n], F.normalize and -x, between two convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.arange(16).remainder(7).view(4, 4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        bias = self.table[self.index].permute(2, 0, 1)  # 4 x 4 x 4, no batch
        x = torch.nn.functional.normalize(x, dim=1) + bias.mean()
        return self.head(-x[..., :4])


TOOLS = ("fvcore", "ptflops", "thop", "torchinfo", "torch")


def assert_every_tool_equals_its_preset(network: nn.Module, sizes: list[tuple[int, int]]):
    """Run all five tools on `network` at `sizes`: each tool's own count equals our count under
    its preset."""
    from convtally.analysis.crosscheck import crosscheck

    result = crosscheck(network, sizes)
    assert result.mismatches == []
    assert {t.tool for check in result.resolutions for t in check.tools} == set(TOOLS)
    assert all(t.number == t.preset for check in result.resolutions for t in check.tools)


def test_new_ops_under_every_preset_equal_their_tool():
    assert_every_tool_equals_its_preset(NewOps().eval(), [(16, 16)])


class SizeBuiltOps(nn.Module):
    """The ops docs/conventions.md lists from session 11: positions from torch.arange over a
    size read from the input, cast .long() and read through a table; item assignment; an
    average pool whose window is read from the input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(31, 4))
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        side = x.shape[2]
        distance = torch.arange(side)[:, None] - torch.arange(side)[None, :] + (side - 1)
        x = x + self.table[distance.long()].permute(2, 0, 1)
        x[:, :2] = x[:, 2:] * 2
        window = (x.shape[2] // 4, x.shape[3] // 4)
        return self.head(torch.nn.functional.avg_pool2d(x, window, window))


def test_size_built_ops_under_every_preset_equal_their_tool():
    network = SizeBuiltOps().eval()
    analysis = analyse(network)
    assert analysis.capture == "fx" and analysis.symbolic
    assert_every_tool_equals_its_preset(network, [(16, 16), (12, 12)])
    for name in TOOLS:
        counted = analysis.with_convention(preset(name)).evaluate([(16, 16)])["connections"]
        assert all(counted[i, 0] == 0 for i, layer in enumerate(analysis.layers)
                   if layer.type in ("arange", "long", "setitem"))


def test_timm_coordinate_grid_under_every_preset_equals_its_tool(monkeypatch):
    """docs/conventions.md's row for timm's _build_grid (qwen3_vit's and deepseek_vit's rotary
    coordinates over the input's sizes): 0 in every tool, routing in ours."""
    pytest.importorskip("timm")
    from timm.layers.pos_embed_sincos import _build_grid

    from tests.analysis import test_rules

    monkeypatch.setattr(test_rules, "build_grid", _build_grid)
    network = test_rules.Grid().eval()
    analysis = analyse(network)
    assert analysis.capture == "fx" and analysis.symbolic
    assert_every_tool_equals_its_preset(network, [(16, 16), (12, 20)])
    grid = [i for i, layer in enumerate(analysis.layers) if layer.cost.op == "coordinate_grid"]
    assert len(grid) == 1 and analysis.layers[grid[0]].connections == 0  # ours: routing
    for name in TOOLS:
        counted = analysis.with_convention(preset(name)).evaluate([(16, 16)])["connections"]
        assert counted[grid[0], 0] == 0


RANGED = SymTensor((H,), value_range=(sp.Integer(0), H - 1))  # torch.arange(H)


def runs(network: nn.Module, size: tuple[int, int]) -> bool:
    """Return whether a real forward pass at `size` runs (an index past a table fails)."""
    try:
        with torch.no_grad():
            network(torch.zeros(1, 3, *size))
    except (IndexError, RuntimeError):  # past a table; sizes that do not agree
        return False
    return True


class ReadsATable(SizeBuiltOps):
    """SizeBuiltOps' relative positions read from a table of `rows` rows: it runs up to the
    side whose positions 0..2(side-1) fit."""

    def __init__(self, rows: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(rows, 4))


@pytest.mark.parametrize("rows", [23, 31, 40])
def test_a_size_whose_positions_leave_the_table_is_refused_as_the_forward_fails(rows):
    network = ReadsATable(rows).eval()
    analysis = analyse(network)
    sizes = [(side, side) for side in (4, 8, 12, 16, 20, 24)] + [(12, 24), (24, 8)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes]
    assert not all(analysis.runnable(sizes))  # the check is not vacuous
    last = max(side for side, _ in sizes if runs(network, (side, side)))
    with pytest.raises(ResolutionError, match=(
            rf"getitem:4 \(getitem\) cannot run at {last + 4}x{last + 4}: its index reaches "
            rf"2\*H - 2 in dimension 0 of size {rows}, {2 * (last + 4) - 2 - (rows - 1)} "
            "beyond it")):
        analysis.evaluate([(last + 4, last + 4)])


class PinnedTableRead(ReadsATable):
    """ReadsATable behind a branch on the width equal to `pinned` (efficientvit_m0's stage equal
    to its window): fx refuses formulas there, the concrete rung counts that size alone."""

    def __init__(self, pinned: int):
        super().__init__(31)
        self.pinned = pinned

    def forward(self, x):
        if x.shape[-1] == self.pinned:
            x = x * 2
        return super().forward(x)


@pytest.mark.parametrize("rows", [23, 31])
def test_the_export_rung_refuses_a_size_whose_positions_leave_the_table(rows):
    """aten.arange's range followed through the exported graph (sub, add, to) to aten.index."""
    network = ReadsPositions(lambda s, b: (torch.arange(s)[:, None] - torch.arange(s)[None, :]
                                           + (s - 1)).long())
    network.table = nn.Parameter(torch.randn(rows, 4))
    network.eval()
    analysis = analyse(network, capture="export")
    assert analysis.capture == "export" and any(layer.bounds for layer in analysis.layers)
    sizes = [(side, side) for side in (4, 8, 12, 16, 20)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes]


def test_the_concrete_rung_refuses_a_size_whose_positions_leave_the_table():
    """Counted at one size, a margin is a number: below 0 there, the size is refused as the
    forward fails. The positions torch.arange makes from the size read there have their rows
    (the subtraction and addition on them), so the count equals the formulas' there."""
    network = SizeBuiltOps().eval()
    counted = analyse(network, capture="concrete", resolutions=[(16, 16)])
    formulas = analyse(network)
    assert counted.totals_at([(16, 16)]) == formulas.totals_at([(16, 16)])
    assert [layer.type for layer in counted.layers] == [layer.type for layer in formulas.layers]
    assert not runs(network, (20, 20))
    with pytest.raises(ResolutionError, match=r"SizeBuiltOps cannot run at 20x20: getitem:4 "
                                              r"\(getitem\) cannot run at 20x20: its index "
                                              "reaches 38 in dimension 0 of size 31, 8 beyond it"):
        analyse(network, capture="concrete", resolutions=[(20, 20)])


class TableAndSizePositions(nn.Module):
    """Positions over a table's own rows (a constant at every size) and over the input's width
    (positions read from the input: rows of their own)."""

    def __init__(self, rows: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(rows, 4))

    def forward(self, x):
        x = self.conv(x)
        rows = torch.arange(self.table.shape[0])
        columns = torch.arange(x.shape[-1]) * 2 + 1
        return x + (self.table * rows[:, None]).sum(0)[:, None, None] + columns.float()


class WindowPositions(TableAndSizePositions):
    """Relative positions over the side of a 4x4 window read from the windowed tensor (timm
    samvit's windowed blocks): a number at every input size, read from the input."""

    def __init__(self):
        super().__init__(rows=7)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        windows = x.reshape(b, c, h // 4, 4, w // 4, 4)
        side = windows.shape[-1]
        positions = torch.arange(side)[:, None] - torch.arange(side)[None, :] + (side - 1)
        bias = self.table[positions.long()].permute(2, 0, 1)  # c x 4 x 4
        return (windows + bias[:, None, :, None, :]).reshape(b, c, h, w)


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
@pytest.mark.parametrize(("network_type", "aranges"), [(TableAndSizePositions, 1),
                                                       (WindowPositions, 2)])
def test_a_count_at_one_size_has_the_rows_the_formulas_have_there(network_type, aranges, size):
    """At one size every size read from the input is a number, as a window's side is at every
    size; torch.arange over one has its row (and the arithmetic on its positions too) in both,
    and over a table's own size it is a constant in both."""
    network = network_type().eval()
    formulas = analyse(network)
    counted = analyse(network, capture="concrete", resolutions=[size])
    assert formulas.capture == "fx" and counted.capture == "concrete"
    assert [layer.type for layer in counted.layers] == [layer.type for layer in formulas.layers]
    assert [layer.type for layer in counted.layers].count("arange") == aranges
    assert counted.totals_at([size]) == formulas.totals_at([size])


def test_every_rungs_reason_is_given_when_the_first_refusal_was_a_pinned_branch():
    """auto raised its first error's type again with every rung's reason, and PinnedBranch
    could not be built from a message alone: a TypeError instead of the reasons."""
    with pytest.raises(PinnedBranch, match=(
            r"fx: its input size is pinned: W == 16 .* \| concrete: the network runs other "
            r"layers at 12x12 than at 16x16; analyse each resolution on its own")):
        analyse(PinnedTableRead(16).eval(), resolutions=[(16, 16), (12, 12)])


def test_timm_mvitv2_is_refused_where_its_relative_positions_leave_the_table():
    """mvitv2 sizes its relative-position tables for 224x224: larger inputs index past them
    (the formulas used to give a count at 256x256, where the model raises IndexError)."""
    timm = pytest.importorskip("timm")
    network = timm.create_model("mvitv2_tiny").eval()
    analysis = analyse(network)
    sizes = [(224, 224), (256, 256), (160, 224)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes] == [
        True, False, True]
    with pytest.raises(ResolutionError, match=r"cannot run at 256x256: .*the nearest sizes it "
                                              r"runs at: 224x224, 192x192"):
        answer_every_resolution(analyse(network, resolutions=[(256, 256)]), [(256, 256)],
                                lambda: analyse(network, exact=True))
    # traced at 256 alone (its positions computed there as numbers): 123 > 110
    with pytest.raises(ResolutionError, match=r"its index reaches 123 in dimension 0 of size "
                                              "111, 13 beyond it"):
        analyse(network, capture="concrete", resolutions=[(256, 256)])
    assert analyse(network, capture="export").runnable(sizes) == [True, False, True]


@pytest.mark.parametrize("target, args, expected", [
    (operator.mul, (RANGED, -2), (2 - 2 * H, 0)),
    (operator.mul, (3, RANGED), (0, 3 * H - 3)),
    (operator.add, (2, RANGED), (2, H + 1)),
    (operator.sub, (RANGED, RANGED), (1 - H, H - 1)),
    (operator.iadd, (RANGED, 1.0), (1, H)),  # a whole float adds as an integer
    ("long", (RANGED,), (0, H - 1)),
    ("long", (SymTensor((H,), value_range=(-1, H)),), None),  # toward zero is not floor
    ("long", (SymTensor((H,), value_range=(0, H / 2)),), (0, sp.floor(H / 2))),
    (operator.getitem, (RANGED, (slice(None), None)), (0, H - 1)),
    (operator.getitem, (RANGED, RANGED), None),  # a gather: the values read, not the index
    (operator.mul, (RANGED, RANGED), None),
    (operator.mul, (RANGED, W - H), None),  # a factor of unknown sign
    (operator.neg, (RANGED,), (1 - H, 0)),
    (operator.sub, (H, RANGED), (1, H)),  # c - x
    (torch.rsub, (RANGED, 2), (3 - H, 2)),
    ("abs", (RANGED,), (0, H - 1)),
    (torch.abs, (SymTensor((H,), value_range=(1 - H, 0)),), (0, H - 1)),
    ("abs", (SymTensor((H,), value_range=(-H, H - 1)),), (0, H)),  # |least| is the larger
    ("abs", (SymTensor((H,), value_range=(-2, H - 3)),), None),  # which end is larger: unknown
    (operator.floordiv, (RANGED, 4), (0, sp.floor((H - 1) / 4))),
    (operator.floordiv, (RANGED, -2), (sp.floor((1 - H) / 2), 0)),
    (operator.floordiv, (RANGED, W - H), None),  # a divisor of unknown sign
    (operator.floordiv, (RANGED, RANGED), None),
    ("flip", (RANGED, [0]), (0, H - 1)),
    ("clamp", (RANGED, 0), (0, H - 1)),
    ("clamp", (RANGED, None, 5), None),  # min(H - 1, 5): which is smaller depends on H
    ("clamp", (RANGED, -3, 2 * H), (0, H - 1)),
])
def test_value_ranges_follow_the_arithmetic_on_positions(target, args, expected):
    output = with_value_range(target, args, {}, SymTensor((H,)))
    assert output.value_range == (None if expected is None else tuple(map(sp.sympify,
                                                                          expected)))


def _shifted_in_place(p):
    p += 3
    return p


def _clamped_in_place(p):
    p.clamp_(max=15)
    return p


def _written_through_a_view(p):
    p[None, :].sub_(p.shape[0] // 2)
    return p


def _item_written(p):
    p[0] = 100
    return p


POSITIONS = {  # positions from the side s of the feature map -> whether the range is followed
    "arange": (lambda s, b: torch.arange(s), True),
    "halved, to(long)": (lambda s, b: (torch.arange(s) * 0.5).to(torch.long), True),
    "+= 3": (lambda s, b: _shifted_in_place(torch.arange(s)), True),
    "clamp_": (lambda s, b: _clamped_in_place(torch.arange(s)), False),
    "sub_ through a view": (lambda s, b: _written_through_a_view(torch.arange(s)), False),
    "p[0] = 100": (lambda s, b: _item_written(torch.arange(s)), False),
    "add with alpha": (lambda s, b: torch.add(torch.arange(s), 5, alpha=3), False),
    "to(uint8), which wraps": (lambda s, b: (torch.arange(s) + 250).to(torch.uint8), False),
    "to(float16), which rounds": (
        lambda s, b: (torch.arange(s) + 2047).to(torch.float16).long() - 2047, False),
    "arange over the batch": (lambda s, b: torch.arange(b), False),
    "15 - p": (lambda s, b: 15 - torch.arange(s), True),
    "-p, plus 15": (lambda s, b: -torch.arange(s) + 15, True),
    "torch.rsub": (lambda s, b: torch.rsub(torch.arange(s), 12), True),
    "|p - (s - 1)|": (lambda s, b: (torch.arange(s) - (s - 1)).abs(), True),
    "abs(p - 3)": (lambda s, b: abs(torch.arange(s) - 3), False),  # signs undecided
    "p // 2": (lambda s, b: torch.arange(s) // 2, True),
    "p // -2 + 20": (lambda s, b: torch.arange(s) // -2 + 20, True),
    "flip": (lambda s, b: torch.arange(s).flip(0), True),
    "torch.roll": (lambda s, b: torch.roll(torch.arange(s), 1), True),
    "clamp(min=0) of p + 2": (lambda s, b: (torch.arange(s) + 2).clamp(min=0), True),
    "torch.clamp(p, 0, 20)": (lambda s, b: torch.clamp(torch.arange(s), 0, 20), False),
}


class ReadsPositions(nn.Module):
    def __init__(self, positions):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(16, 4))
        self.positions = positions

    def forward(self, x):
        x = self.conv(x)
        return x + self.table[self.positions(x.shape[2], x.shape[0])].sum()


@pytest.mark.parametrize("name", POSITIONS)
def test_a_size_is_never_refused_where_the_forward_reads_inside_the_table(name):
    """The ranges are sound: an in-place write (into the tensor or a view of it), alpha=, a
    wrapping cast or positions over the batch leave a range unknown (not checked, as before)
    rather than wrong; where a range is followed, the refusals are exactly the failures."""
    positions, followed = POSITIONS[name]
    network = ReadsPositions(positions).eval()
    sizes = [(side, side) for side in (2, 4, 8, 12, 16, 20, 24, 32, 40)]
    analysis = analyse(network)
    assert analysis.capture == "fx"
    predicted = analysis.runnable(sizes)
    real = [runs(network, size) for size in sizes]
    assert all(p or not r for p, r in zip(predicted, real, strict=True))
    if followed:
        assert predicted == real and not all(real)
    else:
        assert not any(layer.bounds for layer in analysis.layers)


@pytest.mark.parametrize("name", [name for name, (_, followed) in POSITIONS.items()
                                  if followed and name != "+= 3"])
def test_the_export_rung_follows_the_ranges_the_fx_rung_follows(name):
    """The same positions through torch.export's ATen graph (aten.rsub, neg, abs, floor_divide,
    flip, roll, clamp): the sizes it refuses are the sizes where the forward fails, and it
    counts what the fx rung counts."""
    network = ReadsPositions(POSITIONS[name][0]).eval()
    analysis = analyse(network, capture="export")
    assert any(layer.bounds for layer in analysis.layers)
    sizes = [(side, side) for side in (2, 4, 8, 12, 16, 20, 24, 32, 40)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes]
    assert not all(analysis.runnable(sizes))
    running = [size for size, ok in zip(sizes, analysis.runnable(sizes), strict=True) if ok]
    assert analysis.totals_at(running) == analyse(network, capture="fx").totals_at(running)
