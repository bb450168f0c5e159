"""Subclasses that override forward, timm's 'SAME' padding and weight standardisation, list
indexing, norms and addcmul, batch-mixing ops: each checked against the running network and
the tools (the cases that kept timm's nfnet, nasnet, pnasnet, csatv2 and every BatchNormAct2d
model from being counted exactly)."""

from __future__ import annotations

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from convtally.analysis import rules
from convtally.analysis.accounting import H, analyse, answer_every_resolution
from convtally.analysis.memory import measure_saved
from convtally.analysis.rules import BATCH, SymTensor, UnsupportedLayer
from torch import nn
from torchvision.ops import StochasticDepth

from tests.analysis.test_accounting import assert_matches_running_network
from tests.analysis.test_conventions import preset_problems, tool_results
from tests.analysis.test_memory import assert_saved_matches_autograd


class BatchNormRelu(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm2d whose forward adds an activation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class PlainConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: Conv2d's rule still applies."""


class NormActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PlainConv(3, 8, 3, padding=1)
        self.norm = BatchNormRelu(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def test_a_subclass_that_overrides_forward_is_traced_into():
    """Its activation is a row (a leaf with BatchNorm2d's rule lost it), its counts are the
    running network's; a subclass that keeps forward stays one row with the base's rule."""
    network = NormActNet().eval()
    analysis = analyse(network)
    names = [layer.name for layer in analysis.layers]
    assert "conv" in names and "norm.act" in names and "norm.batch_norm" in names
    assert_matches_running_network(analysis, network, 3, [(16, 16), (20, 24)])
    assert next(layer for layer in analysis.layers if layer.name == "conv").type == "PlainConv"
    values = analysis.totals_at([(16, 16)])
    assert values["outputs"][0] == 8 * 16 * 16 * 3 + 8 + 4  # conv, batch_norm, relu, mean, head


def test_overriding_subclasses_save_what_autograd_saves_in_training():
    """The eval-mode trace passes training=False to F.batch_norm; the memory check trains."""
    assert_saved_matches_autograd(analyse(NormActNet().eval()), [(2, 16, 16), (3, 20, 24)])


class DepthNet(nn.Module):
    """torchvision's StochasticDepth passes self.training on: frozen False in an eval trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        return x.mean(1, keepdim=True) + self.drop(self.conv(x))


def test_the_memory_check_runs_the_analysis_graph_in_training():
    analysis = analyse(DepthNet().eval())
    x = torch.randn(2, 3, 16, 16)
    plain, _ = measure_saved(analysis.network, x)
    torch.manual_seed(0)
    total, per_node = measure_saved(analysis.network, x, per_node=True,
                                    graph=analysis.graph_module)
    assert total == plain
    assert per_node["stochastic_depth"] == 2 * 4  # the noise, one float per example


# --- timm's 'SAME' padding and weight standardisation --------------------------------------

try:  # timm is the optional `zoo` extra; only these tests need it
    import timm.layers as timm_layers
    import timm.layers.pool2d_same as pool2d_same
except ImportError:  # pragma: no cover - CI installs the extra
    timm_layers = None
needs_timm = pytest.mark.skipif(timm_layers is None, reason="timm (the zoo extra) not installed")


class SameNet(nn.Module):
    """TensorFlow-style 'SAME' convolutions and pools, and a standardised convolution."""

    def __init__(self):
        super().__init__()
        self.conv = timm_layers.Conv2dSame(3, 8, 3, stride=2)
        self.pool = pool2d_same.MaxPool2dSame(3, stride=2)
        self.average = pool2d_same.AvgPool2dSame(3, stride=2)
        self.standardised = timm_layers.ScaledStdConv2dSame(8, 16, 5, stride=2)
        self.one = timm_layers.Conv2dSame(16, 16, 1, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.average(self.pool(self.conv(x)))
        return self.head(self.one(self.standardised(x)).mean((2, 3)))


@needs_timm
@pytest.mark.parametrize("size", [(64, 64), (67, 61), (96, 75)])
def test_same_padding_is_exact_at_odd_and_even_sizes(size):
    network = SameNet().eval()
    analysis = analyse(network, capture="fx", exact=True)
    assert analysis.capture == "fx" and analysis.symbolic
    assert_matches_running_network(analysis, network, 3, [size])
    theirs = tool_results(lambda: SameNet(), 3, *size, tools=("fvcore", "torch"))
    assert preset_problems(analysis, theirs, *size) == []


@needs_timm
def test_same_padding_output_is_ceil_of_size_over_stride():
    x = SymTensor((BATCH, sp.Integer(3), H, H))
    padded = rules.same_padding(x, (3, 3), (2, 2)).output.shape[-1]
    for size in range(5, 40):
        expected = torch.nn.functional.pad(torch.zeros(1, 1, size, size),
                                           timm_layers.padding.pad_same_arg(
                                               [size, size], [3, 3], [2, 2])).shape[-1]
        assert padded.subs(H, size) == expected
    assert rules.same_padding(x, (1, 1), (2, 2)).output.shape[-1] == H
    at_nine = rules.same_padding(SymTensor((BATCH, 3, sp.Integer(9), sp.Integer(9))), 2, 4)
    assert at_nine.output.shape[-2:] == (10, 10)  # max((3 - 1) * 4 + 2 - 9, 0) = 1


def test_same_padding_without_a_closed_form_is_refused_in_one_line():
    x = SymTensor((BATCH, sp.Integer(3), H, H))
    with pytest.raises(UnsupportedLayer, match=r"2-wide window .* stride 4 .*--capture concrete"):
        rules.same_padding(x, 2, 4)


@needs_timm
def test_weight_standardisation_counts_as_fvcore_and_saves_its_weight_once():
    """fvcore counts batch_norm in training (the weight's statistics) at 5 per value; autograd
    keeps the standardised weight once, whatever the batch."""
    network = SameNet().eval()
    analysis = analyse(network, exact=True)
    row = next(layer for layer in analysis.layers if layer.name == "standardised.batch_norm")
    assert row.cost.op == "batch_norm_training"
    assert_saved_matches_autograd(analysis, [(2, 64, 64), (3, 67, 61)])


# --- indexing with a list, norms, addcmul, batch mixing, declared input channels -----------


class GatherNormNet(nn.Module):
    """csatv2's zigzag gather (x[:, :, list]), ConvNeXt-V2's global response norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 2, stride=2)
        self.order = [3, 0, 2, 1]
        self.gamma = nn.Parameter(torch.zeros(1, 16, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, 16, 1, 1))
        self.head = nn.Linear(16 * 4, 4)

    def forward(self, x):
        x = self.conv(x)
        norm = x.norm(p=2, dim=(2, 3), keepdim=True)
        x = torch.addcmul(self.beta, self.gamma, x * (norm / (norm.mean(1, keepdim=True) + 1e-6)))
        pooled = F.adaptive_avg_pool2d(x, 2).flatten(2)[:, :, self.order]
        return self.head(pooled.flatten(1))


def test_list_indexing_norms_and_addcmul_match_the_running_network_and_tools():
    network = GatherNormNet().eval()
    analysis = analyse(network)
    assert_matches_running_network(analysis, network, 3, [(16, 16), (24, 20)])
    names = {layer.name: layer for layer in analysis.layers}
    assert names["getitem"].output_shape == (16, 4)
    assert names["norm"].cost.op == "vector_norm"
    assert sp.expand(names["addcmul"].connections - 3 * 16 * names["conv"].outputs / 16) == 0
    theirs = tool_results(lambda: GatherNormNet(), 3, 16, 24, tools=("fvcore", "torch"))
    assert preset_problems(analysis, theirs, 16, 24) == []


def test_a_list_of_booleans_is_refused():
    x = SymTensor((BATCH, sp.Integer(4)))
    with pytest.raises(UnsupportedLayer, match="list of non-integers"):
        rules.getitem(x, (slice(None), [True, False, True, True]))


class MixingNet(nn.Module):
    """csatv2's scalar attention: (B, N) @ (N, B) mixes the examples of a batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 4, stride=4)

    def forward(self, x):
        tokens = self.conv(x).flatten(1)  # (B, N)
        mixed = (tokens @ tokens.transpose(-1, -2)).softmax(-1) @ tokens  # (B, N)
        return mixed.sum(1, keepdim=True)


def test_ops_that_mix_the_batch_are_counted_at_batch_one_and_say_so():
    network = MixingNet().eval()
    analysis = analyse(network)
    assert any("mix examples across the batch" in note and "batch size 1" in note
               for note in analysis.assumptions)
    theirs = tool_results(lambda: MixingNet(), 3, 16, 32, tools=("fvcore",))
    assert preset_problems(analysis, theirs, 16, 32) == []
    # the exact form made from the same rows (a size off the divisibility) counts them so too
    exact = answer_every_resolution(analysis, [(18, 30)], lambda: analyse(network, exact=True))
    assert exact.exact and any("mix examples across the batch" in note
                               for note in exact.assumptions)
    assert exact.totals_at([(18, 30)]) == analyse(MixingNet().eval(), exact=True).totals_at(
        [(18, 30)])


class PermutesTheBatch(nn.Module):
    """timm's attention: q, k, v permuted to (3, B, heads, N, head_dim) moves the batch to the
    second dimension; no example is mixed with another."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (B, N, 8)
        b, n, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_a_batch_moved_past_the_first_dimension_is_not_called_mixed():
    analysis = analyse(PermutesTheBatch().eval())
    assert not any("mix examples" in note for note in analysis.assumptions)
    permute = next(layer for layer in analysis.layers if layer.type == "permute")
    assert str(permute.outputs) == "3*H*W/2"  # (3, B, 2, H*W/16, 4): 3 * 2 * 4 per token
    theirs = tool_results(lambda: PermutesTheBatch(), 3, 16, 32, tools=("fvcore", "torch"))
    assert preset_problems(analysis, theirs, 16, 32) == []
    assert any("mix examples" in note for note in analyse(MixingNet().eval()).assumptions)


class DeclaredInput(nn.Module):
    """A first convolution that reads a transform of the image, not the image (csatv2)."""

    pretrained_cfg = {"input_size": (3, 16, 16)}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.conv(F.pixel_unshuffle(x, 2))


def test_declared_input_channels_win_over_the_first_convolution():
    analysis = analyse(DeclaredInput().eval())
    assert analysis.input_channels == 3
    assert analysis.totals_at([(16, 16)])["outputs"][0] == 12 * 8 * 8 + 4 * 8 * 8


# --- the export rung's wrapped blocks, Python functions on concrete sizes, time budgets ------


class AutocastOff(nn.Module):
    """timm's EfficientViT: attention in `with torch.autocast(enabled=False)`, after a branch
    on a size that torch.fx cannot take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        tokens = x.flatten(2).transpose(1, 2)
        if x.shape[-1] > 1:
            with torch.autocast(device_type="cpu", enabled=False):
                tokens = (tokens @ tokens.transpose(1, 2)).softmax(-1) @ tokens
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("capture", ["export", "auto"])
def test_the_export_rung_counts_the_body_of_an_autocast_block(capture):
    """The export rung counts the block's body; auto now stops at fx, which traces the branch
    at 32x32 (floor(W/4) > 1 then required) and counts the same."""
    analysis = analyse(AutocastOff().eval(), capture=capture, resolutions=[(32, 32)])
    if capture == "export":
        assert "aten.softmax" in [layer.type for layer in analysis.layers]
    else:
        assert analysis.capture == "fx"
        assert [text.split(" (")[0] for _, _, text in analysis.branches] == ["floor(W/4) > 1"]
    theirs = tool_results(lambda: AutocastOff(), 3, 32, 32, tools=("fvcore",))
    assert preset_problems(analysis, theirs, 32, 32) == []


class GridFromSize(nn.Module):
    """DeepSeek's ViT builds a position grid with torch.arange of the patch count."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        x = self.conv(x)
        torch._assert(x.shape[-1] % 2 == 0, "even patches")
        grid = torch.arange(x.shape[-1], dtype=x.dtype)
        return (x + grid).mean((2, 3))


def test_python_functions_get_python_ints_on_concrete_sizes():
    analysis = analyse(GridFromSize().eval(), capture="concrete", resolutions=[(32, 32)])
    assert analysis.totals_at([(32, 32)])["weights"][0] == 8 * 3 * 16 + 8


def test_a_time_budget_stops_a_block_and_restores_an_outer_timer():
    import signal
    import time

    from convtally.analysis.accounting import OutOfTime, _time_budget

    started = time.monotonic()
    with pytest.raises(OutOfTime, match="sleeping ran past 0.2 s"):
        with _time_budget(0.2, "sleeping"):
            time.sleep(5)
    assert time.monotonic() - started < 2
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with _time_budget(0.2, "sleeping"):
            pass
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < remaining <= 30
        with _time_budget(60, "longer than the outer timer"):  # the outer one decides
            assert signal.getitimer(signal.ITIMER_REAL)[0] > 25
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_a_time_budget_stops_a_block_whose_first_alarm_is_swallowed():
    """An alarm that lands in a weakref callback run by the garbage collector is printed as
    'Exception ignored in ...' and lost; the budget's alarm repeats, so the next one stops
    the block (davit's export ran on for minutes past its 60 s)."""
    import time

    from convtally.analysis.accounting import OutOfTime, _time_budget

    started = time.monotonic()
    swallowed = []
    with pytest.raises(OutOfTime):
        with _time_budget(0.2, "sleeping"):
            try:
                time.sleep(5)
            except OutOfTime as error:  # as Python does with an exception in a callback
                swallowed.append(error)
            time.sleep(30)
    assert swallowed and time.monotonic() - started < 7


def test_a_view_size_without_a_closed_form_is_refused_not_simplified_for_minutes():
    h = sp.Symbol("h", integer=True, positive=True)
    nested = sp.floor(h / 3)
    for _ in range(4):
        nested = sp.floor((sp.Mod(nested + 5, 7) + nested) / 2) + sp.Mod(3 * nested, 5)
    x = SymTensor((BATCH, nested, nested + 1))
    with pytest.raises(UnsupportedLayer, match="does not reduce to a closed form.*concrete"):
        rules.view(x, nested + 2, -1)


class TangledView(nn.Module):
    """A reshape whose -1 size is a quotient of nested floors and remainders (hieradet's pooled
    windows in miniature): no closed form in H, W; it runs only at some sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        b, _, h, _ = x.shape
        n = h // 3
        for _ in range(4):
            n = ((n + 5) % 7 + n) // 2 + (3 * n) % 5
        return x.reshape(b, n + 2, -1)


def test_auto_counts_a_size_without_a_closed_form_concretely_without_waiting_on_export(
        monkeypatch):
    """hieradet_small spent auto's 90 s export budget before its one-second concrete count:
    export meets the same floors and remainders, so auto does not try it; --capture export
    still does."""
    from convtally.analysis import export_capture
    from convtally.analysis.rules import NoClosedForm

    exported = []

    def refuse(*args, **kwargs):
        exported.append(args)
        raise RuntimeError("torch.export stand-in")

    monkeypatch.setattr(export_capture, "analyse_exported", refuse)
    network = TangledView().eval()
    with pytest.raises(NoClosedForm):
        analyse(network, capture="fx")
    sizes = [(36, 36), (30, 30)]
    analysis = analyse(network, resolutions=sizes)
    assert analysis.capture == "concrete" and not exported
    assert "export: not tried" in analysis.capture_note
    assert_matches_running_network(analysis, network, 3, sizes)
    with pytest.raises(RuntimeError, match="stand-in"):
        analyse(network, capture="export", resolutions=sizes)
    assert exported


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_export_budget_is_refused_in_one_line(monkeypatch, value):
    monkeypatch.setenv("CONVTALLY_EXPORT_SECONDS", value)
    with pytest.raises(ValueError, match="CONVTALLY_EXPORT_SECONDS must be a positive number"):
        analyse(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_the_export_budget_follows_the_environment(monkeypatch):
    from convtally.analysis import accounting

    seen = []
    real = accounting._time_budget
    monkeypatch.setattr(accounting, "_time_budget",
                        lambda seconds, what: seen.append(seconds) or real(seconds, what))
    monkeypatch.setenv("CONVTALLY_EXPORT_SECONDS", "12.5")
    from tests.analysis.test_capture import SizeBranch

    analysis = analyse(SizeBranch().eval())
    assert analysis.capture == "export" and seen == [12.5]
