"""`verify` on every rung of the capture ladder: an export capture (rows are ATen ops) and a
concrete one (counted at each size) are checked row by row against the running graph, and their
totals against fvcore's and FlopCounterMode's own totals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from convtally.analysis import export_capture
from convtally.analysis.accounting import analyse
from convtally.analysis.cli import main
from convtally.analysis.verification import render_verification, verify
from torch import nn

from tests.analysis.test_capture import SizeBranch, fvcore_total, tiny_vit


def torch_total(network: nn.Module, size: tuple[int, int]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(torch.zeros(1, 3, *size))
    return int(counter.get_total_flops())


class FixedSizeBranch(SizeBranch):
    """fx cannot trace it (control flow on a size) and export fixes W: only concrete counts it."""

    def forward(self, x):
        if x.shape[-1] != 32:
            raise ValueError("this network expects W == 32")
        return super().forward(x)


def test_export_capture_verifies_against_the_graph_and_the_tools():
    network = SizeBranch().eval()
    sizes = [(32, 32), (48, 64)]
    analysis = analyse(network, resolutions=sizes[:1])
    assert analysis.capture == "export"
    result = verify(analysis, sizes)
    assert result.mismatches == [] and result.capture == "export"
    conv = [c for c in result.checks if c.type == "aten.conv2d"]
    assert [c.fvcore for c in conv] == [c.connections_formula for c in conv] == [
        8 * 27 * 32 * 32, 8 * 27 * 48 * 64]
    assert all(c.torch_flops == 2 * c.fvcore for c in conv)
    # the shapes at 48x64 come from running the graph there, not from the probe's trace
    pool = next(c for c in result.checks if c.type == "aten.max_pool2d" and c.resolution != "32")
    assert pool.shape_measured == pool.shape_formula == [8, 24, 32]
    gamma = next(c for c in result.checks if c.type == "aten.mul")
    assert gamma.weights_measured == gamma.weights_formula == 8  # read directly in forward
    totals = {(t.tool, t.resolution): t for t in result.totals}
    for (height, width), label in zip(sizes, ("32", "48x64"), strict=True):
        assert totals[("fvcore", label)].tool_total == fvcore_total(network, (height, width))
        assert totals[("fvcore", label)].ours == totals[("fvcore", label)].tool_total
        assert totals[("torch", label)].ours == torch_total(network, (height, width))
    text = render_verification(result, "text")
    assert "capture: export: rows are ATen ops" in text and "total under the torch preset" in text
    assert result.to_dict()["totals"][0]["verdict"] == "ok"


def test_broken_aten_rule_is_caught_per_row_and_in_the_total(monkeypatch):
    original = export_capture.ATEN_RULES["conv2d"]

    def doubled(*args, **kwargs):
        cost = original(*args, **kwargs)
        return replace(cost, connections=cost.connections * 2)

    monkeypatch.setitem(export_capture.ATEN_RULES, "conv2d", doubled)
    result = verify(analyse(SizeBranch().eval(), capture="export"), [(32, 32)])
    problems = [p for c in result.mismatches for p in c.problems]
    assert any(p.startswith("connections") and "!= fvcore" in p for p in problems)
    assert any(p.startswith("total under the fvcore preset") for p in problems)
    assert any(p.startswith("total under the torch preset") for p in problems)


def test_broken_export_weights_are_caught(monkeypatch):
    original = export_capture.ATEN_RULES["linear"]
    monkeypatch.setitem(export_capture.ATEN_RULES, "linear", lambda *a, **k: replace(
        original(*a, **k), weights=original(*a, **k).weights + 1))
    result = verify(analyse(SizeBranch().eval(), capture="export"), [(32, 32)])
    assert [p for c in result.mismatches for p in c.problems] == ["weights 37 != parameters 36"]


def test_concrete_capture_through_fx_verifies():
    network = tiny_vit()
    analysis = analyse(network, resolutions=[(32, 32)])
    assert analysis.capture == "concrete" and analysis.graph_module is not None
    result = verify(analysis, [(32, 32)])
    assert result.mismatches == []
    # the class token is read directly in forward (get_attr): its parameters are its row's
    expand = next(c for c in result.checks if c.layer == "expand")
    assert expand.weights_measured == expand.weights_formula == 32
    # the qkv permute puts the batch dimension second: all 3 x 2 x 5 x 16 values are counted
    permute = next(c for c in result.checks if c.layer == "blocks.0.attn.permute")
    assert permute.outputs_measured == permute.outputs_formula == 480
    totals = {t.tool: t for t in result.totals}
    assert totals["fvcore"].ours == totals["fvcore"].tool_total == fvcore_total(network, (32, 32))
    assert totals["torch"].ours == totals["torch"].tool_total == torch_total(network, (32, 32))


def assert_conv_verified_at(network, analysis, sizes, conv_type):
    """verify finds no mismatch; the conv row at each size equals fvcore's, and the totals
    fvcore's own."""
    result = verify(analysis, sizes)
    assert result.mismatches == []
    conv = [c for c in result.checks if c.type == conv_type]
    assert [c.connections_formula for c in conv] == [c.fvcore for c in conv] == [
        8 * 27 * h * w for h, w in sizes]
    assert [t.tool_total for t in result.totals if t.tool == "fvcore"] == [
        fvcore_total(network, size) for size in sizes]


class IteratesOverATensor(FixedSizeBranch):
    """Iteration over a traced tensor: torch.fx cannot record it at any size; torch.export
    can, at each size."""

    def forward(self, x):
        x = torch.stack([channel * 2 for channel in x[0]])[None]
        return super().forward(x)


def test_concrete_capture_through_export_verifies_at_each_size():
    network = IteratesOverATensor().eval()
    sizes = [(32, 32), (40, 32)]
    analysis = analyse(network, resolutions=sizes)
    assert analysis.capture == "concrete" and analysis.graph_module is None
    assert_conv_verified_at(network, analysis, sizes, "aten.conv2d")


def test_concrete_capture_traced_at_each_size_verifies_each_sizes_own_graph():
    """fx refuses the branch on W for every size at once; traced at each size, each count is
    verified against the graph of its own size, run on the real network."""
    network = FixedSizeBranch().eval()
    sizes = [(32, 32), (40, 32)]
    analysis = analyse(network, resolutions=sizes)
    assert analysis.capture == "concrete" and "at each size" in analysis.capture_note
    assert [g.meta["size_only"] for g in analysis.size_graphs.values()] == sizes
    assert not any(p.is_meta for size in sizes for p in analysis.graph_at(size).parameters())
    assert_conv_verified_at(network, analysis, sizes, "Conv2d")


class CachesATable(nn.Module):
    """timm ConViT's pattern: a table of relative positions built by item assignment from the
    token count and cached in a buffer when the count changes, then a call on the buffer with
    a traced size (`expand(B, ...)`); torch.fx records none of it at every size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.register_buffer("table", torch.zeros(1, 1, 1, 3), persistent=False)
        self.project = nn.Linear(3, 2)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        batch, tokens, _ = x.shape
        if self.table.shape[1] != tokens:
            self.table = self.relative_positions(tokens)
        scores = self.project(self.table.expand(batch, -1, -1, -1)).softmax(-2).sum(-1)
        return scores @ x

    def relative_positions(self, tokens: int) -> torch.Tensor:
        side = int(tokens ** 0.5)
        table = torch.zeros(1, tokens, tokens, 3)
        offsets = torch.arange(side).view(1, -1) - torch.arange(side).view(-1, 1)
        across = offsets.repeat(side, side)
        table[:, :, :, 0] = across.unsqueeze(0)
        table[:, :, :, 2] = (across ** 2).unsqueeze(0)
        return table.to(self.conv.weight.device)


def test_a_table_cached_in_a_buffer_is_counted_by_fx_at_each_size():
    network = CachesATable().eval()
    sizes = [(32, 32), (48, 48)]
    analysis = analyse(network, resolutions=sizes)
    assert analysis.capture == "concrete" and "at each size" in analysis.capture_note
    assert network.table.shape == (1, 1, 1, 3)  # the trace left the buffer as it was
    result = verify(analysis, sizes)
    assert result.mismatches == []
    assert [t.tool_total for t in result.totals if t.tool == "fvcore"] == [
        t.ours for t in result.totals if t.tool == "fvcore"] == [
        fvcore_total(network, size) for size in sizes]
    setitems = [c for c in result.checks if c.type == "setitem"]
    assert len(setitems) == 2 * len(sizes) and all(c.outputs_measured == 0 for c in setitems)
    # the same count once a forward pass has cached the table (no table built in the graph)
    with torch.no_grad():
        network(torch.zeros(1, 3, *sizes[0]))
    cached = analyse(network, resolutions=sizes[:1])
    assert cached.capture == "concrete" and "at each size" in cached.capture_note
    assert not any(layer.type == "setitem" for layer in cached.concrete[sizes[0]])
    assert cached.totals_at(sizes[:1])["connections"] == analysis.totals_at(
        sizes[:1])["connections"]


def test_the_size_checks_leave_a_cache_the_forward_fills_as_it_was():
    """The export rung runs the network at twice the probe size (on the meta build, and the
    real one where meta cannot tell); a cache its forward fills there stays the caller's."""
    from types import SimpleNamespace

    from convtally.analysis.accounting import _meta_copy

    network = CachesATable().eval()
    meta = _meta_copy(network)
    prepared = SimpleNamespace(network=network, meta=meta, meta_network=lambda: meta,
                               channels=3)
    assert export_capture._fixed_size_on_meta(prepared, (32, 32)) is True
    export_capture._runs_at_another_size(prepared, (32, 32))
    assert network.table.shape == meta.table.shape == (1, 1, 1, 3)
    assert network.table.device.type == "cpu" and meta.table.is_meta


class WritesIntoATensor(nn.Module):
    """Item assignment on a traced value, the same at every size: fx records it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        x[:, :4] = x[:, 4:] * 2
        return x.relu()


def test_item_assignment_is_routing_in_the_formulas():
    network = WritesIntoATensor().eval()
    analysis = analyse(network)
    assert analysis.capture == "fx" and analysis.symbolic
    written = next(layer for layer in analysis.layers if layer.type == "setitem")
    assert (written.outputs, written.connections, written.output_shape) == (0, 0, ())
    result = verify(analysis, [(16, 16), (24, 40)])
    assert result.mismatches == []


def test_a_concrete_size_not_counted_is_refused_in_one_line():
    analysis = analyse(FixedSizeBranch().eval(), resolutions=[(32, 32)])
    with pytest.raises(ValueError, match="counted concretely at 32x32, not at 40x32"):
        verify(analysis, [(40, 32)])


def test_cli_verifies_a_concrete_timm_model(capsys):
    pytest.importorskip("timm")
    assert main(["verify", "timm:test_vit3", "--res", "160", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "capture: concrete" in out and "total under the fvcore preset" in out
    assert out.rstrip().endswith("0 mismatch(es)")


class ParameterRead(nn.Module):
    """An fx capture with a parameter read in forward (layer scale): its row owns it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        return (self.conv(x) * self.gamma).mean((2, 3))


def test_fx_parameter_read_in_forward_is_its_rows_witness():
    result = verify(analyse(ParameterRead().eval(), capture="fx"), [(32, 32)])
    mul = next(c for c in result.checks if c.layer == "mul")
    assert mul.weights_measured == mul.weights_formula == 8
    assert not any(p.startswith("weights") for c in result.checks for p in c.problems)


class PatchAttention(nn.Module):
    """Patches, then nn.MultiheadAttention: in eval under no_grad it takes PyTorch's fused fast
    path, which returns (output, None) and which fvcore does not count."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(attended.mean(1))


@pytest.mark.parametrize("capture", ["fx", "concrete"])
def test_multihead_attention_verifies_on_its_fast_path(capture):
    network = PatchAttention().eval()
    analysis = analyse(network, capture=capture, resolutions=[(32, 32), (64, 48)])
    row = next(layer for layer in analysis.layers if layer.type == "MultiheadAttention")
    assert len(row.output_shape) == 2 and row.output_shape[1] == 32  # (tokens, embedding)
    result = verify(analysis, [(32, 32), (64, 48)])
    assert result.mismatches == [], [c.problems for c in result.mismatches]
    check = next(c for c in result.checks if c.type == "MultiheadAttention")
    assert check.outputs_measured == check.outputs_formula == 16 * 32
    assert check.shape_measured == check.shape_formula == [16, 32]
    if capture == "concrete":  # the totals are checked against each tool's own total
        totals = {t.tool: t for t in result.totals}
        assert totals["fvcore"].ours == totals["fvcore"].tool_total > 0
    assert torch.backends.mha.get_fastpath_enabled()  # left as it was


def test_an_export_capture_verifies_with_a_checkpoint(tmp_path):
    """The exported graph runs with verify's copy of the network, the checkpoint loaded (it
    ran with the program's own tensors, the un-loaded ones, and differed from the network)."""
    trained = SizeBranch().eval()
    for parameter in trained.parameters():
        torch.nn.init.normal_(parameter)
    path = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), path)
    analysis = analyse(SizeBranch().eval(), capture="export", resolutions=[(32, 32)])
    result = verify(analysis, [(32, 32)], checkpoint=path)
    assert result.mismatches == [], [c.problems for c in result.mismatches]


def test_a_concrete_count_evaluated_once_follows_its_convention():
    """The rows of a concrete capture are worked out once per convention: a copy under the
    fvcore preset gives fvcore's total, and the default analysis its own, in any order."""
    from convtally.analysis.conventions import preset

    network = FixedSizeBranch().eval()
    analysis = analyse(network, resolutions=[(32, 32)])
    default = analysis.totals_at([(32, 32)])["connections"][0]
    under_fvcore = analysis.with_convention(preset("fvcore"))
    assert under_fvcore.totals_at([(32, 32)])["connections"][0] == fvcore_total(network, (32, 32))
    assert default != fvcore_total(network, (32, 32))
    assert analysis.totals_at([(32, 32)])["connections"][0] == default
    assert analysis.evaluate([(32, 32)])["connections"][:, 0].sum() == default
