"""Indexing a constant table (relative-position bias through its index buffer), F.normalize and
negation: the rules that took beit, eva, swin, coatnet and efficientformer off the refusal list,
each checked against the running network, fvcore and FlopCounterMode."""

from __future__ import annotations

import warnings

import pytest
import sympy as sp
import torch
from convtally.analysis.accounting import analyse
from convtally.analysis.conventions import preset
from convtally.analysis.rules import ParameterTensor, SymTensor, UnsupportedLayer, getitem
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


def test_new_ops_under_every_preset_equal_their_tool():
    from convtally.analysis.crosscheck import crosscheck

    result = crosscheck(NewOps().eval(), [(16, 16)])
    assert result.mismatches == []
    tools = {t.tool: t for check in result.resolutions for t in check.tools}
    assert set(tools) == {"fvcore", "ptflops", "thop", "torchinfo", "torch"}
    assert all(t.number == t.preset for t in tools.values())


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
    from convtally.analysis.crosscheck import crosscheck

    network = SizeBuiltOps().eval()
    analysis = analyse(network)
    assert analysis.capture == "fx" and analysis.symbolic
    result = crosscheck(network, [(16, 16), (12, 12)])
    assert result.mismatches == []
    tools = {t.tool for check in result.resolutions for t in check.tools}
    assert tools == {"fvcore", "ptflops", "thop", "torchinfo", "torch"}
    assert all(t.number == t.preset for check in result.resolutions for t in check.tools)
    for name in ("fvcore", "ptflops", "thop", "torchinfo", "torch"):
        counted = analysis.with_convention(preset(name)).evaluate([(16, 16)])["connections"]
        assert all(counted[i, 0] == 0 for i, layer in enumerate(analysis.layers)
                   if layer.type in ("arange", "long", "setitem"))


def test_timm_coordinate_grid_under_every_preset_equals_its_tool(monkeypatch):
    """docs/conventions.md's row for timm's _build_grid (qwen3_vit's and deepseek_vit's rotary
    coordinates over the input's sizes): 0 in every tool, routing in ours."""
    pytest.importorskip("timm")
    from convtally.analysis.crosscheck import crosscheck
    from timm.layers.pos_embed_sincos import _build_grid

    from tests.analysis import test_rules

    monkeypatch.setattr(test_rules, "build_grid", _build_grid)
    network = test_rules.Grid().eval()
    analysis = analyse(network)
    assert analysis.capture == "fx" and analysis.symbolic
    result = crosscheck(network, [(16, 16), (12, 20)])
    assert result.mismatches == []
    tools = {t.tool for check in result.resolutions for t in check.tools}
    assert tools == {"fvcore", "ptflops", "thop", "torchinfo", "torch"}
    assert all(t.number == t.preset for check in result.resolutions for t in check.tools)
    grid = [i for i, layer in enumerate(analysis.layers) if layer.cost.op == "coordinate_grid"]
    assert len(grid) == 1 and analysis.layers[grid[0]].connections == 0  # ours: routing
    for name in ("fvcore", "ptflops", "thop", "torchinfo", "torch"):
        counted = analysis.with_convention(preset(name)).evaluate([(16, 16)])["connections"]
        assert counted[grid[0], 0] == 0
