"""The capture ladder: each rung on a model only it can handle, and the rungs agreeing."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from convtally.analysis import accounting, tracing
from convtally.analysis.accounting import H, ResolutionError, analyse
from convtally.analysis.conventions import preset
from convtally.analysis.formatting import render
from convtally.analysis.verification import verify
from torch import nn


def fvcore_total(network: nn.Module, size: tuple[int, int]) -> int:
    from fvcore.nn import FlopCountAnalysis

    # fvcore's default call (grad mode on: MultiheadAttention takes its unfused path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = FlopCountAnalysis(network, torch.zeros(1, 3, *size))
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        return int(counter.total())


class SizeBranch(nn.Module):
    """Control flow on the input size, behind len() of a shape: torch.fx cannot trace it (not
    even at a probe size), torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)) * self.gamma
        if len(x.shape) == 4 and x.shape[-1] > 8:
            x = self.pool(x)
        return self.head(x.mean((2, 3)))


class ProbeBranch(SizeBranch):
    """A branch and an assert on the input size that fx traces at a probe size."""

    def forward(self, x):
        torch._assert(x.shape[-2] % 2 == 0, "H must be even")
        x = torch.relu(self.conv(x)) * self.gamma
        if -x.shape[-2] % 4:  # a number tested for truth (not taken at 32)
            x = x * 2
        if x.shape[-1] > 8:
            x = self.pool(x)
        return self.head(x.mean((2, 3)))


def test_fx_rung_decides_a_branch_on_sizes_at_the_probe_size():
    """fx traces the branch taken at the first size asked for and requires its condition (and
    the assert's) wherever the formulas are evaluated; sizes that branch the other way are
    refused in one line; asked for both sides, auto refuses, saying why at each rung."""
    network = ProbeBranch().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)],
                       exact=True)
    assert analysis.capture == "fx" and analysis.symbolic
    assert "traced at 32x32" in analysis.capture_note
    assert {text.split(" (")[0] for _, _, text in analysis.branches} == {
        "Mod(H, 2) == 0", "W > 8", "Mod(3*H, 4) == 0"}
    for size in [(32, 32), (16, 24), (12, 9)]:
        totals = analysis.totals_at([size])
        assert totals["connections"][0] == fvcore_total(network, size)
        assert totals["weights"][0] == sum(p.numel() for p in network.parameters())
    # verify runs the graph traced at the probe over the real weights
    from convtally.analysis.verification import verify

    assert not verify(analysis, [(32, 32), (16, 24)]).mismatches
    with pytest.raises(ResolutionError, match="takes another branch at 16x8: its forward "
                       "tests W > 8"):
        analysis.totals_at([(16, 8)])
    with pytest.raises(ResolutionError, match="tests Mod\\(H, 2\\) == 0"):
        analysis.totals_at([(15, 16)])
    # torch.export traces one branch too (its guard W > 8 is a condition of its formulas,
    # where it used to answer 16x8 with the pooled branch's outputs), and the concrete rung
    # counts one graph: asked for both sides at once, auto says so; each alone is counted
    with pytest.raises(ValueError, match=r"export: ProbeBranch takes another branch at 16x8: "
                       r"its forward tests W > 8 \(a torch.export guard.*analyse each "
                       r"resolution on its own"):
        analyse(network, convention=preset("fvcore"), resolutions=[(32, 32), (16, 8)])
    alone = analyse(network, convention=preset("fvcore"), resolutions=[(16, 8)])
    assert alone.totals_at([(16, 8)])["connections"][0] == fvcore_total(network, (16, 8))
    assert not verify(alone, [(16, 8)]).mismatches


class WindowOrWhole(nn.Module):
    """efficientvit_m0's attention in miniature: a stage that equals its window (7) attends as
    a whole, any other size doubles; the trace at 224 holds at 193..224 only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=32, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[2] == 7:
            return y * 2
        return y * y + 1


class AtLeastWindow(WindowOrWhole):
    def forward(self, x):
        y = self.conv(x)
        if y.shape[2] >= 7:
            return y * 2
        return y * y + 1


def test_the_export_rung_refuses_a_branch_its_guards_pin_to_one_size():
    """torch.export (Dim.AUTO) keeps such a guard out of its ranges and graph: formulas from
    it were claimed for every H and were wrong at 448 (efficientvit_m0: 314,492,480 against
    fvcore's 304,845,056). Its symbolic shapes still record the guard; the rung reads it."""
    with pytest.raises(ValueError, match=r"torch.export's trace pins the input size: "
                       r"floor\(H/32 - 1/32\) \+ 1 == 7 \(a torch.export guard, traced at "
                       r"224x224\) holds at neither 448x448 nor 896x896"):
        analyse(WindowOrWhole().eval(), capture="export", resolutions=[(224, 224)])


def test_the_export_rungs_guards_are_conditions_where_its_formulas_hold():
    network = AtLeastWindow().eval()
    exported = analyse(network, convention=preset("fvcore"), capture="export",
                       resolutions=[(224, 224)])
    assert exported.capture == "export"
    assert any(">= 7 (a torch.export guard" in text for text in exported.assumptions)
    for size in [(224, 224), (448, 320)]:
        assert exported.totals_at([size])["connections"][0] == fvcore_total(network, size)
    with pytest.raises(ResolutionError, match=r"takes another branch at 64x64: .* torch.export "
                       r"guard.*or --capture concrete"):
        exported.totals_at([(64, 64)])
    # asked for both sides, auto says why neither symbolic trace answers them (the concrete
    # rung counts one graph, which runs other layers at each); each alone is counted
    with pytest.raises(ValueError, match=r"export: AtLeastWindow takes another branch at 64x64"):
        analyse(network, convention=preset("fvcore"), resolutions=[(224, 224), (64, 64)])
    small = analyse(network, convention=preset("fvcore"), resolutions=[(64, 64)])
    assert small.totals_at([(64, 64)])["connections"][0] == fvcore_total(network, (64, 64))


def test_auto_does_not_export_a_branch_fx_found_pins_the_size(monkeypatch):
    from convtally.analysis import export_capture

    def no_export_rung(*args, **kwargs):
        raise AssertionError("the export rung was entered")

    monkeypatch.setattr(export_capture, "analyse_exported", no_export_rung)
    network = WindowOrWhole().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(224, 224)])
    assert analysis.capture == "concrete"
    assert ("export: not tried, since torch.export takes the same branch at 224x224"
            in analysis.capture_note)
    assert analysis.totals_at([(224, 224)])["connections"][0] == fvcore_total(network, (224, 224))


@pytest.mark.parametrize("by_name", [False, True])
def test_the_concrete_rung_counts_the_graph_fx_traced_at_the_probe(monkeypatch, by_name):
    """fx traced the pinned branch at 224 and refused it for other sizes; at 224 that graph is
    the one the concrete rung needs, so it is counted without tracing the forward again."""
    from convtally.analysis import accounting
    from convtally.models.registry import ModelSpec

    traced = []
    original = accounting.trace
    monkeypatch.setattr(accounting, "trace", lambda *args, **kwargs: traced.append(
        kwargs) or original(*args, **kwargs))
    model = (ModelSpec(name="window", factory=WindowOrWhole)
             if by_name else WindowOrWhole().eval())
    analysis = analyse(model, convention=preset("fvcore"), resolutions=[(224, 224)])
    assert analysis.capture == "concrete" and "at each size" in analysis.capture_note
    assert not any(kwargs.get("concrete") for kwargs in traced)
    assert analysis.size_graphs[(224, 224)].meta["size_only"] == (224, 224)
    assert analysis.totals_at([(224, 224)])["connections"][0] == fvcore_total(
        WindowOrWhole().eval(), (224, 224))


def test_a_pinned_branch_is_refused_before_the_formulas_are_simplified(monkeypatch):
    """The refusal needs the branch conditions only: simplifying every row first was a sixth
    of timm efficientvit_m0's analysis, thrown away."""
    from convtally.analysis import accounting

    def simplified(*args, **kwargs):
        raise AssertionError("the rows were simplified before the pinned branch was refused")

    monkeypatch.setattr(accounting, "_apply_divisibility", simplified)
    with pytest.raises(accounting.PinnedBranch, match="its input size is pinned"):
        analyse(WindowOrWhole().eval(), capture="fx", resolutions=[(224, 224)])


class PinsThenCallsAnUnknownLayer(WindowOrWhole):
    """WindowOrWhole's pinned branch, then a module without a rule."""

    def __init__(self):
        super().__init__()
        self.unknown = nn.LocalResponseNorm(2)  # a torch.nn leaf without a rule

    def forward(self, x):
        y = self.conv(x)
        if y.shape[2] == 7:
            y = y * 2
        return self.unknown(y)


def test_a_pinned_branch_is_refused_where_the_forward_meets_it():
    """The layers after a branch that pins the size are not counted (three quarters of timm
    efficientvit_m0's symbolic count, which the concrete rung counted again): the branch is the
    fx rung's refusal, before a layer after it that the rules do not know."""
    from convtally.analysis import accounting

    network = PinsThenCallsAnUnknownLayer().eval()
    with pytest.raises(accounting.PinnedBranch, match=r"its input size is pinned: .* == 7 \(the "
                       r"forward branches on it; traced at 224x224\)"):
        analyse(network, capture="fx", resolutions=[(224, 224)])
    with pytest.raises(accounting.UnsupportedLayer,
                       match=r"no rule for unknown \(LocalResponseNorm\)"):
        analyse(network, capture="fx", resolutions=[(256, 256)])  # not taken there: no pin


class CachesItsBias(WindowOrWhole):
    """Keeps a computed bias in a dict in evaluation, as timm's efficientvit_msra does, and
    branches on a stage equal to 7 (the size pinned: fx refuses, the concrete rung counts)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4, 1, 1))
        self.cache = {}

    def forward(self, x):
        y = self.conv(x)
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        if y.shape[2] == 7:
            return y + self.cache["bias"]
        return y * y


def test_a_trace_leaves_no_proxy_in_the_models_state_for_the_next_trace():
    """The fx rung's trace stored a proxy in the cache; the concrete rung's trace of the same
    meta build then failed on it and exported at each size (efficientvit_m0: 2.7 s)."""
    network = CachesItsBias().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(224, 224)])
    assert analysis.capture == "concrete"
    assert analysis.capture_note.endswith("torch.fx traced it at each size (its forward reads "
                                          "sizes as numbers)")
    assert analysis.totals_at([(224, 224)])["connections"][0] == fvcore_total(
        CachesItsBias().eval(), (224, 224))
    with torch.device("meta"):
        meta = CachesItsBias().eval()
    for _ in range(2):
        traced = tracing.trace(meta, torch.zeros(1, 3, 224, 224, device="meta"), branching=True)
        assert meta.cache == {} and len(traced.graph.nodes) > 3


class PinnedSize(SizeBranch):
    """An assert that pins the size through a floor (visformer's 'H // 2 == 112'): no formula
    in H, W, whatever fx can trace."""

    def forward(self, x):
        torch._assert(x.shape[-1] // 2 == 16, "expects 32x32 images")
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_an_assert_that_pins_the_size_leaves_fx_for_a_fixed_size_count():
    network = PinnedSize().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete" and not analysis.symbolic
    assert ("fx: its input size is pinned: floor(W/2) == 16 (the forward asserts it) holds at "
            "neither 448x448 nor 896x896") in analysis.capture_note
    assert analysis.totals_at([(32, 32)])["connections"][0] == fvcore_total(network, (32, 32))


def test_export_rung_handles_control_flow_on_sizes():
    network = SizeBranch().eval()
    analysis = analyse(network, convention=preset("fvcore"))
    assert analysis.capture == "export" and analysis.symbolic
    assert "fx: cannot trace" in analysis.capture_note
    assert analysis.total("connections").has(H)
    for size in [(32, 32), (48, 64)]:
        totals = analysis.totals_at([size])
        assert totals["connections"][0] == fvcore_total(network, size)
        assert totals["weights"][0] == sum(p.numel() for p in network.parameters())


class RecordsRealInputs(SizeBranch):
    def __init__(self):
        super().__init__()
        self.real_sizes = []

    def forward(self, x):
        if x.device.type != "meta":
            self.real_sizes.append(tuple(x.shape[2:]))
        return super().forward(x)


def test_export_rung_runs_no_real_forward_pass_where_the_meta_build_ran_at_twice_the_size():
    """The meta copy running at twice the traced size shows the size is not fixed; a real
    forward pass there (4x the pixels: most of gemma4_vit's 80 s at 1536x1536) adds nothing."""
    network = RecordsRealInputs().eval()
    analysis = analyse(network, convention=preset("fvcore"), capture="export",
                       resolutions=[(32, 32)])
    assert analysis.capture == "export" and analysis.symbolic
    assert (64, 64) not in network.real_sizes
    assert analysis.totals_at([(48, 64)])["connections"][0] == fvcore_total(network, (48, 64))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.norm(x.permute(0, 2, 3, 1)).mean((1, 2))
        return self.fc(x)


@pytest.mark.parametrize("convention", ["default", "fvcore", "torch"])
def test_module_rules_and_aten_rules_agree(convention):
    """The same layers, counted by the fx rung's module rules and the export rung's ATen rules."""
    network = Small().eval()
    fx = analyse(network, convention=preset(convention), capture="fx")
    exported = analyse(network, convention=preset(convention), capture="export")
    sizes = [(32, 32), (64, 48)]
    assert fx.totals_at(sizes) == exported.totals_at(sizes)
    by_kind = {}
    for analysis in (fx, exported):
        values = analysis.evaluate([(32, 32)])
        counts: dict[str, int] = {}
        for index, layer in enumerate(analysis.layers):
            if layer.kind in ("conv", "linear", "norm"):
                counts[layer.kind] = counts.get(layer.kind, 0) + int(
                    values["connections"][index, 0]
                )
        by_kind[analysis.capture] = counts
    assert by_kind["fx"] == by_kind["export"]


class Drops(nn.Module):
    """Dropout as a module (nn.Dropout, nn.Dropout2d, the alpha dropouts, and a subclass that
    keeps its forward) and as a function in evaluation (the identity)."""

    class KeepsForward(nn.Dropout):
        pass

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.1)
        self.drop = nn.Dropout(0.5)
        self.kept = self.KeepsForward(0.2)
        self.alpha = nn.AlphaDropout(0.1)
        self.feature_alpha = nn.FeatureAlphaDropout(0.1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.feature_alpha(self.drop2d(self.conv(x)))
        x = nn.functional.dropout(x, 0.3, training=False).mean((2, 3))
        return self.alpha(self.kept(self.fc(self.drop(x))))


@pytest.mark.parametrize("convention", ["default", "fvcore", "torch"])
def test_dropout_counts_alike_in_the_fx_and_export_rungs(convention):
    """nn.Dropout is one element-wise row under the default in both rungs (torch.export records
    its aten.dropout, which F.dropout in evaluation also records, and counts 0)."""
    from convtally.analysis.export_capture import analyse_exported_concrete

    network, sizes = Drops().eval(), [(8, 8), (12, 10)]
    fx = analyse(network, convention=preset(convention), capture="fx")
    exported = analyse(network, convention=preset(convention), capture="export")
    static = analyse_exported_concrete(accounting._prepare(network, None), preset(convention),
                                       False, sizes)
    assert fx.totals_at(sizes) == exported.totals_at(sizes) == static.totals_at(sizes)
    if convention == "default":  # one connection per output of each module, none for F
        dropped = {layer.name: str(layer.connections) for layer in exported.layers
                   if "dropout" in layer.type}
        assert dropped == {"drop2d.feature_dropout": "4*H*W", "dropout": "0",
                           "feature_alpha.feature_alpha_dropout": "4*H*W",
                           "drop.dropout": "4", "kept.dropout": "3", "alpha.alpha_dropout": "3"}


class ResizedEmbedding(nn.Module):
    """Resizes a learned 4x4 embedding to the feature map with antialiasing (naflexvit's
    position embedding), then adds it."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.embedding = nn.Parameter(torch.zeros(1, 8, 4, 4))

    def forward(self, x):
        x = self.conv(x)
        return x + nn.functional.interpolate(self.embedding, size=x.shape[2:], mode=self.mode,
                                             antialias=True, align_corners=False)


@pytest.mark.parametrize("convention", ["default", "fvcore", "torch"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_interpolation_counts_alike_in_module_and_aten_rules(convention, mode):
    network = ResizedEmbedding(mode).eval()
    exported = analyse(network, convention=preset(convention), capture="export")
    concrete = analyse(network, convention=preset(convention), capture="concrete",
                       resolutions=[(32, 32), (64, 48)])
    assert exported.symbolic
    sizes = [(32, 32), (64, 48)]
    assert exported.totals_at(sizes) == concrete.totals_at(sizes)
    if convention == "fvcore":
        assert exported.totals_at(sizes)["connections"] == [
            fvcore_total(network, size) for size in sizes]


def tiny_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=32,
        num_heads=2,
    ).eval()


def test_concrete_rung_counts_a_vit_with_a_fixed_size():
    network = tiny_vit()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete" and not analysis.symbolic
    assert "doesn't match model" in analysis.capture_note or "fixed" in analysis.capture_note
    totals = analysis.totals_at([(32, 32)])
    assert totals["weights"][0] == sum(p.numel() for p in network.parameters())
    assert totals["connections"][0] == fvcore_total(network, (32, 32))
    with pytest.raises(ResolutionError, match=r"counted concretely at 32x32, not at 64x64"):
        analysis.evaluate([(64, 64)])
    text = render(analysis, [(32, 32)], "text")
    assert "capture: concrete (counted at 32x32" in text
    assert "unavailable" in text


def test_torchvision_vit_concrete_at_its_crop():
    import torchvision

    network = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete"
    totals = analysis.totals_at([(32, 32)])
    assert totals["weights"][0] == sum(p.numel() for p in network.parameters())
    assert totals["connections"][0] == fvcore_total(network, (32, 32))


def test_strict_refuses_and_default_marks_incomplete():
    from convtally.analysis.rules import UnsupportedLayer

    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LocalResponseNorm(2))
    with pytest.raises(UnsupportedLayer, match="no rule for 1"):
        analyse(network, capture="fx")
    analysis = analyse(network, capture="fx", allow_unknown=True)
    assert not analysis.complete
    data = analysis.to_dict([(16, 16)], ["16"])
    assert data["complete"] is False and data["unknown_layers"] == ["1 (LocalResponseNorm)"]


def test_timm_reference_resolves():
    pytest.importorskip("timm")
    from convtally.models.registry import resolve

    spec = resolve("timm:convnext_atto")
    assert spec.name == "timm:convnext_atto"
    with pytest.raises(ValueError, match="unknown timm model 'nosuch'"):
        resolve("timm:nosuch")


def test_torch_symbolic_functions_become_exact_integer_forms():
    """torch.export's CeilToInt, FloorDiv, Mod, ... map onto floor/ceiling (mobilevit's
    CeilToInt once crashed the evaluator); an unmapped one is refused, not left to crash."""
    import numpy as np
    import sympy as sp
    from convtally.analysis.accounting import H, W
    from convtally.analysis.evaluation import IntegerEvaluator
    from convtally.analysis.export_capture import _Sizes
    from convtally.analysis.rules import UnsupportedLayer
    from torch.utils._sympy import functions as torch_functions

    sizes = _Sizes(0, 0)  # plain ints: no SymInt to map
    s0, s1 = sp.symbols("s0 s1", integer=True, positive=True)
    sizes.mapping = {s0: H, s1: W}
    expression = (torch_functions.CeilToInt(s0 / 3) + torch_functions.FloorDiv(s1, 4)
                  + torch_functions.PythonMod(s0, 5))
    converted = sizes.convert(expression)
    values = IntegerEvaluator([converted])(
        np.array([7, 8, 30], dtype=object), np.array([9, 12, 31], dtype=object))[0]
    assert list(values) == [-(-h // 3) + w // 4 + h % 5 for h, w in ((7, 9), (8, 12), (30, 31))]
    with pytest.raises(UnsupportedLayer, match="Max"):
        sizes.convert(torch_functions.Max(s0, s1))


class CachesATracedValue(nn.Module):
    """Keeps a derived tensor in a dict keyed by str(device), as timm's EfficientFormer does;
    under fx the key is a Proxy's name, so a second trace finds the first trace's node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.conv(x) + self.cache[key].view(1, -1, 1, 1)


def test_a_second_trace_of_a_module_that_caches_a_traced_value_counts_the_same():
    """The first trace's proxy no longer stays in the cache (it was refused: 'reads ... from
    an earlier trace'): each trace starts from the module's own state."""
    from convtally.analysis.tracing import trace

    network = CachesATracedValue()
    first = trace(network)
    second = trace(network)
    assert network.cache == {}
    assert first.code == second.code
    analysis = analyse(CachesATracedValue(), capture="auto", resolutions=[(32, 32)])
    assert analysis.totals_at([(32, 32)])["weights"][0] == 4 * 3 * 9 + 4 + 4


class CachesInItsClass(nn.Module):
    """Keeps a derived tensor in a dict of its class (no module state to put back): a second
    trace reads the first trace's node."""

    cache: dict[str, torch.Tensor] = {}

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.bias * 2
        return x + self.cache["bias"].view(1, -1, 1, 1)


def test_a_graph_that_reads_an_earlier_traces_node_is_refused():
    """A node of an earlier trace among a call's arguments is refused with the node that reads
    it, plainly and on the branching trace alike."""
    from convtally.analysis.tracing import trace

    network = CachesInItsClass()
    try:
        trace(network)
        with pytest.raises(ValueError, match=r"again: add reads view_\d+ from an earlier trace"):
            trace(network)
        with pytest.raises(ValueError, match=r"again: add reads view_\d+ from an earlier trace"):
            trace(network, torch.zeros(1, 4, 8, 8, device="meta"))
    finally:
        CachesInItsClass.cache.clear()


SWIN_FUNCTIONS = ("_patch_merging_pad", "_get_relative_position_bias", "shifted_window_attention")


@pytest.mark.parametrize("allow_unknown", [True, False])
@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_fx_rule_and_aten_rules_agree(version, allow_unknown, monkeypatch):
    """The fx rung counts torchvision's shifted_window_attention with one rule; without that
    rule the concrete rung recounts the graph through the export rung's ATen rules (the mask's
    != and, in v2, the in-place zero_ of the key bias included). Both equal fvcore and
    FlopCounterMode, attention module by attention module."""
    from convtally.analysis import peers, rules
    from torchvision.models import swin_transformer as swin

    blocks = {} if version == 1 else {"block": swin.SwinTransformerBlockV2,
                                      "downsample_layer": swin.PatchMergingV2}

    def build():
        return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 2],
                                    num_heads=[2, 2], window_size=[4, 4], num_classes=10,
                                    **blocks).eval()

    sizes = [(64, 64), (36, 44)]  # 36x44: windows padded, an odd size merged
    fx = analyse(build(), exact=True)
    assert fx.capture == "fx" and fx.symbolic
    for name in SWIN_FUNCTIONS:
        monkeypatch.delitem(rules.OPTIONAL_FUNCTIONS, f"torchvision.models.swin_transformer.{name}")
        monkeypatch.delitem(rules.FUNCTION_RULES, getattr(swin, name), raising=False)

    def per_attention_module(analysis, size):
        values = analysis.evaluate([size])["connections"][:, 0]
        counts: dict[str, int] = {}
        for index, layer in enumerate(analysis.layers):
            if ".attn." in layer.name:
                module = layer.name[: layer.name.index(".attn") + len(".attn")]
                counts[module] = counts.get(module, 0) + int(values[index])
        return counts

    for size in sizes:  # one at a time: the ATen graph pads at 36x44 only
        aten = analyse(build(), capture="concrete", resolutions=[size],
                       allow_unknown=allow_unknown)
        assert aten.capture == "concrete" and aten.complete
        assert any(layer.name.endswith("attn.linear") for layer in aten.layers)  # ATen rows
        for tool, run in (("fvcore", peers.run_fvcore), ("torch", peers.run_torch)):
            fx_counted, aten_counted = (a.with_convention(preset(tool)) for a in (fx, aten))
            assert per_attention_module(fx_counted, size) == per_attention_module(
                aten_counted, size)
            expected = run(build(), torch.zeros(1, 3, *size)).total
            assert fx_counted.totals_at([size])["connections"][0] == expected, (tool, size)
            assert aten_counted.totals_at([size])["connections"][0] == expected, (tool, size)


class LiftedConstant(nn.Module):
    """A plain tensor attribute is a lifted constant in torch.export's graph, placed before the
    input image (as swin_t's are); a branch on the size keeps fx out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = torch.tensor([2.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] > 8:
            x = x * 1
        return self.conv(x) * self.scale


def test_export_rung_finds_the_image_after_a_lifted_constant():
    network = LiftedConstant().eval()
    analysis = analyse(network, convention=preset("fvcore"), capture="export",
                       resolutions=[(32, 32)])
    assert analysis.capture == "export" and analysis.symbolic
    for size in ((32, 32), (40, 24)):
        assert analysis.totals_at([size])["connections"][0] == fvcore_total(network, size)


FIXED_SIZE = '''
import torch
from torch import nn

BUILDS = []


class Fixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        torch._assert(x.shape[2] == 32, "expects 32x32 images")
        torch._assert(x.shape[3] == 32, "expects 32x32 images")
        return self.head(self.conv(x).flatten(1))


def build():
    network = Fixed()
    BUILDS.append(next(network.parameters()).device.type)
    return network
'''


def test_a_fixed_size_model_is_counted_without_real_weights_or_an_export(
        tmp_path, monkeypatch):
    """fx's refusal on the meta build is final (a ValueError), the meta build shows the size
    is fixed before torch.export is tried, and the concrete rung counts on the meta build:
    real weights are made only when something runs the network (verify)."""
    import importlib

    from convtally.analysis import export_capture
    from convtally.analysis.verification import verify

    (tmp_path / "fixed_net.py").write_text(FIXED_SIZE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("fixed_net")

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export was called")

    monkeypatch.setattr(export_capture, "export", no_export)
    analysis = analyse("fixed_net:build", convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete"
    # fx found the assert, which fails at twice the size: the export rung is not even entered
    assert ("export: not tried, since at 64x64, twice 32x32, the forward's assert fails"
            in analysis.capture_note)
    assert module.BUILDS == ["meta"]
    totals = analysis.totals_at([(32, 32)])
    network = module.build()
    assert totals["weights"][0] == sum(p.numel() for p in network.parameters())
    assert totals["connections"][0] == fvcore_total(network.eval(), (32, 32))
    assert not verify(analysis, [(32, 32)]).mismatches
    assert module.BUILDS == ["meta", "cpu", "cpu"]  # the test's own build, then verify's
    with pytest.raises(ValueError, match=r"at 64x64, twice 32x32, the model fails \(expects "
                                         r"32x32 images\): its input size is fixed"):
        analyse("fixed_net:build", capture="export", resolutions=[(32, 32)])


class PinnedStage(nn.Module):
    """Asserts its stage size as botnet26t does (floor(H/4) == 8: a size, not H itself)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.conv(x)
        torch._assert(x.shape[2] == 8, "expects an 8x8 stage")
        torch._assert(x.shape[3] == 8, "expects an 8x8 stage")
        return self.head(x.flatten(1))


@pytest.mark.parametrize("side", [32, 35])
def test_a_stage_size_the_forward_asserts_is_counted_concretely_without_the_export_rung(
        monkeypatch, side):
    """fx's pinned assert fails at twice the size, where the export rung would run the model
    first and refuse: auto skips that rung (a meta forward pass at four times the pixels)."""
    from convtally.analysis import export_capture

    def no_export_rung(*args, **kwargs):
        raise AssertionError("the export rung was entered")

    monkeypatch.setattr(export_capture, "analyse_exported", no_export_rung)
    network = PinnedStage().eval()
    with pytest.raises(ValueError, match=r"its input size is pinned: .* == 8 \(the forward "
                                         r"asserts it\) holds at neither"):
        analyse(network, capture="fx")
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(side, side)])
    assert analysis.capture == "concrete"
    assert (f"export: not tried, since at {2 * side}x{2 * side}, twice {side}x{side}, the "
            "forward's assert fails") in analysis.capture_note
    assert analysis.totals_at([(side, side)])["connections"][0] == fvcore_total(
        network, (side, side))


class ResizesFirst(nn.Module):
    """Resizes an input of another size before asserting its own (as crossvit does): the
    assert holds on the branch taken at the traced size only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x):
        if x.shape[2] != 32 or x.shape[3] != 32:
            x = nn.functional.interpolate(x, size=(32, 32))
        torch._assert(x.shape[2] == 32, "expects 32x32 images")
        return self.conv(x)


def test_the_export_rung_refuses_a_size_its_guards_specialise():
    """At 32 the forward skips its resize: torch.export guards H == 32, W == 32 and keeps
    the sizes as SymInts whose value is that number. Its formulas were constants (crossvit's
    count was the same at 248, which resizes, as at 240, which does not)."""
    with pytest.raises(ValueError, match=r"torch.export fixed H and W to 32x32"):
        analyse(ResizesFirst().eval(), capture="export", resolutions=[(32, 32)])


def test_a_branch_that_pins_the_size_before_an_assert_skips_the_export_rung(monkeypatch):
    """The branch is refused where the fx rung meets it, before the assert is counted."""
    from convtally.analysis import export_capture
    from convtally.analysis.accounting import PinnedBranch

    def no_export_rung(*args, **kwargs):
        raise AssertionError("the export rung was entered")

    monkeypatch.setattr(export_capture, "analyse_exported", no_export_rung)
    network = ResizesFirst().eval()
    with pytest.raises(PinnedBranch, match=r"its input size is pinned: H == 32 \(the forward "
                       r"branches on it; traced at 32x32\) holds at neither 64x64 nor 128x128"):
        analyse(network, capture="fx", resolutions=[(32, 32)])
    at_its_size = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert at_its_size.capture == "concrete"
    assert ("export: not tried, since torch.export takes the same branch at 32x32, whose guard "
            "pins the input size" in at_its_size.capture_note)
    assert at_its_size.totals_at([(32, 32)])["connections"][0] == fvcore_total(network, (32, 32))
    # at another size the resize is the branch taken, and the assert holds on it: formulas
    resized = analyse(network, convention=preset("fvcore"), resolutions=[(40, 48)])
    assert resized.capture == "fx" and resized.symbolic
    for size in [(40, 48), (64, 64)]:
        assert resized.totals_at([size])["connections"][0] == fvcore_total(network, size)


class ResizesThenAssertsItsGrid(ResizesFirst):
    """ResizesFirst's branch, then an assert on the convolution's grid (a floor of H): at 32
    both pin the size; the branch is the reason given, so auto does not export."""

    def forward(self, x):
        if x.shape[2] != 32 or x.shape[3] != 32:
            x = nn.functional.interpolate(x, size=(32, 32))
        x = self.conv(x)
        torch._assert(x.shape[2] == 8, "expects an 8x8 grid")
        return x


def test_a_pinned_branch_is_the_reason_before_a_pinned_assert(monkeypatch):
    from convtally.analysis import export_capture
    from convtally.analysis.accounting import PinnedBranch

    def no_export_rung(*args, **kwargs):
        raise AssertionError("the export rung was entered")

    monkeypatch.setattr(export_capture, "analyse_exported", no_export_rung)
    network = ResizesThenAssertsItsGrid().eval()
    with pytest.raises(PinnedBranch):
        analyse(network, capture="fx", resolutions=[(32, 32)])
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete"
    assert ("export: not tried, since torch.export takes the same branch at 32x32"
            in analysis.capture_note)
    assert analysis.totals_at([(32, 32)])["connections"][0] == fvcore_total(network, (32, 32))


READS_A_CONSTANT = '''
import torch
from torch import nn


class ReadsAConstant(nn.Module):
    """A plain tensor attribute read with .item() in forward: torch.fx runs it as a constant,
    which a meta build cannot (no data), and the real build can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        return self.conv(x) * self.scale.item()


def build():
    return ReadsAConstant()
'''


def test_a_trace_that_fails_on_meta_tensors_only_is_retried_on_the_real_build(
        tmp_path, monkeypatch):
    (tmp_path / "reads_a_constant.py").write_text(READS_A_CONSTANT)
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis = analyse("reads_a_constant:build", capture="fx")
    assert analysis.capture == "fx"
    assert analysis.totals_at([(8, 8)])["weights"] == [3 * 4 * 9 + 4]


def test_a_fixed_size_module_given_directly_is_counted_without_an_export(
        tmp_path, monkeypatch):
    """A module the caller built has no meta build: a meta copy (its data never copied) finds
    the fixed size and counts the concrete rows; the caller's module stays as it was."""
    import importlib

    from convtally.analysis import export_capture

    (tmp_path / "fixed_module.py").write_text(FIXED_SIZE)
    monkeypatch.syspath_prepend(str(tmp_path))
    network = importlib.import_module("fixed_module").build().eval()

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export was called")

    monkeypatch.setattr(export_capture, "export", no_export)
    traced = []
    monkeypatch.setattr(accounting, "trace", lambda module, *args, **kwargs: traced.append(
        module) or tracing.trace(module, *args, **kwargs))
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "concrete" and "its input size is fixed" in analysis.capture_note
    assert traced == [network]  # the concrete rung counts the graph the fx rung traced
    assert analysis.totals_at([(32, 32)])["connections"][0] == fvcore_total(network, (32, 32))
    assert analysis.network is network
    assert not any(p.is_meta for p in network.parameters())


class ReadsSizesAsNumbers(nn.Module):
    """int() and len() of traced sizes: torch.fx refuses both; a trace at one size reads them
    there, as a forward pass does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x)
        batch, channels = x.shape[0], x.shape[1]
        tokens = x.flatten(2)
        side = int(tokens.shape[2] ** 0.5)
        grid = tokens.reshape(batch, channels, side, side)
        if len(grid.shape) == 4:
            grid = torch.relu(grid).mean((2, 3))
        return self.fc(grid)


def test_concrete_rung_traces_a_forward_fx_refuses_at_each_size_without_an_export(monkeypatch):
    from convtally.analysis import export_capture

    network = ReadsSizesAsNumbers().eval()
    with pytest.raises(ValueError, match="cannot trace ReadsSizesAsNumbers with torch.fx"):
        analyse(network, capture="fx")

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export was called")

    monkeypatch.setattr(export_capture, "export", no_export)
    sizes = [(32, 32), (64, 64), (48, 48)]
    analysis = analyse(network, convention=preset("fvcore"), capture="concrete",
                       resolutions=sizes)
    assert analysis.capture == "concrete" and analysis.complete
    totals = analysis.totals_at(sizes)
    for index, size in enumerate(sizes):
        assert totals["connections"][index] == fvcore_total(network, size)
        assert totals["weights"][index] == sum(p.numel() for p in network.parameters())
    assert [layer.type for layer in analysis.layers][:1] == ["Conv2d"]


class CachesBySize(ProbeBranch):
    """A module registered twice (tied), a plain tensor attribute and a cache the forward
    fills, as timm's attention-bias caches are filled per device."""

    def __init__(self):
        super().__init__()
        self.tied = self.conv
        self.cache: dict[str, int] = {}
        self.scale = torch.tensor(2.0)

    def forward(self, x):
        self.cache["calls"] = self.cache.get("calls", 0) + 1
        return super().forward(x) * self.scale


def test_meta_copy_of_a_callers_module_keeps_its_structure_and_leaves_it_untouched():
    """The copy the branching trace runs: the same parameters and buffers by name and shape,
    on the meta device, one module where the caller registered one twice; the caller's
    module, its cache included, as it was; the counts those of a deep copy's."""
    network = CachesBySize().eval()
    copied = accounting._meta_copy(network)
    assert [(n, p.shape) for n, p in copied.named_parameters()] == [
        (n, p.shape) for n, p in network.named_parameters()]
    assert all(p.is_meta for p in [*copied.parameters(), *copied.buffers()])
    assert copied.tied is copied.conv and copied.conv is not network.conv
    assert copied.cache is not network.cache and copied.scale is network.scale
    in_training = CachesBySize().train()
    assert not any(module.training for module in accounting._meta_copy(in_training).modules())
    assert all(module.training for module in in_training.modules())
    analysis = analyse(network, convention=preset("fvcore"), capture="fx",
                       resolutions=[(32, 32)])
    # torch.fx's plain trace (refused) ran the caller's forward and was undone; the trace at
    # the probe size ran the copy
    assert analysis.capture == "fx" and network.cache == {}
    assert not any(p.is_meta for p in network.parameters())
    sizes = [(32, 32), (24, 40)]
    assert analysis.totals_at(sizes) == analyse(
        copied, convention=preset("fvcore"), capture="fx", resolutions=[(32, 32)]
    ).totals_at(sizes)
    for height, width in sizes:
        assert analysis.totals_at([(height, width)])["connections"][0] == fvcore_total(
            network, (height, width))


class RatioBranch(nn.Module):
    """timm MViTv2's `max(k / q, 1.0)`: a branch on a ratio of sizes against a float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = self.conv(x)
        if max(x.shape[2] / x.shape[3], 1.0) > 1.0:
            x = self.pool(x)
        return x


def test_a_branch_against_a_whole_float_prints_the_whole_number():
    analysis = analyse(RatioBranch().eval(), resolutions=[(64, 32)])
    assert analysis.capture == "fx"
    assert "floor(H/4)/floor(W/4) > 1 (the forward branches on it; traced at 64x32)" in (
        analysis.assumptions)
    assert not any("1.000" in text for text in analysis.assumptions)


class FailsBeforeItsBranch(nn.Module):
    """timm bat_resnext26ts at 200x168: a product whose sizes do not agree at that size comes
    before a branch on a size computed from it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.table = nn.Parameter(torch.zeros(64, 6))  # 4 channels x 4 x 4: a 4x4 input only

    def forward(self, x):
        y = self.conv(x).flatten(1) @ self.table
        if y.shape[-1] > 4:
            return y.sum(-1)
        return y.mean(-1)


def test_a_forward_that_fails_at_the_probe_is_refused_as_failing_there():
    network = FailsBeforeItsBranch().eval()
    with pytest.raises(ValueError, match=r"^fx: FailsBeforeItsBranch cannot run at 8x8: matmul "
                                         r"fails there \(RuntimeError: .*\); ask for a size it "
                                         "runs at"):
        analyse(network, resolutions=[(8, 8)])
    assert analyse(network, resolutions=[(4, 4)]).totals_at([(4, 4)])["weights"][0] == 16 + 384


class AddsAFixedEmbedding(nn.Module):
    """timm hiera at 200x168: a position embedding for 4x4 tokens added to the tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.position = nn.Parameter(torch.zeros(1, 16, 4))

    def forward(self, x):
        return (self.conv(x).flatten(2).transpose(1, 2) + self.position).mean(1)


def test_a_failing_export_logs_nothing_and_says_why_in_one_line(caplog):
    from convtally.analysis.export_capture import export

    with caplog.at_level("DEBUG"), pytest.raises(ValueError, match=r"^torch.export failed "
                                                 r"\(RuntimeError: .*broadcast"):
        export(AddsAFixedEmbedding().eval(), 3, (20, 24), dynamic=False)
    assert [r.getMessage() for r in caplog.records
            if r.name.startswith("torch") and r.levelno >= logging.WARNING] == []
    assert logging.getLogger("torch._subclasses.fake_tensor").level == logging.NOTSET


class ScalesPositions(nn.Module):
    """timm samvit's relative coordinates: float positions, scaled, cast .long() to index a
    table; at a counted size they are a real float tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.table = nn.Parameter(torch.zeros(7, 4))

    def forward(self, x):
        x = self.conv(x)
        q = x.shape[2]
        coords = torch.arange(q, dtype=torch.float32)[:, None] * 0.5
        return x.mean((2, 3)) + self.table[coords.long()].sum()


def test_float_positions_cast_to_an_index_are_checked_at_a_counted_size():
    """Their range was followed for integer tensors only: at 64x64 the count was given where
    the forward reads row 7 of a table of 7."""
    from tests.analysis.test_indexing_rules import runs

    network = ScalesPositions().eval()
    counted = analyse(network, capture="concrete", resolutions=[(16, 16), (52, 20)])
    assert counted.capture == "concrete"
    assert not verify(counted, [(16, 16), (52, 20)]).mismatches
    assert not runs(network, (64, 64))
    with pytest.raises(ResolutionError, match="cannot run at 64x64: .*its index reaches 7 in "
                                              "dimension 0 of size 7"):
        analyse(network, capture="concrete", resolutions=[(64, 64)])


class ReadsItsSizeAsNumber(nn.Module):
    """Reads a size as a Python number (samvit's int(2 * max(q, k) - 1)) and pools over a
    window of that many positions: traced at one size, the graph holds that size's number."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        side = int(x.shape[-1])
        return self.head(nn.functional.avg_pool2d(x, side).flatten(1))


class ReadsItsChannelsAsNumber(nn.Module):
    """Reads its channel count as a Python number: the same at every input size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        channels = int(x.shape[1])
        return self.head(x.mean((2, 3)).view(-1, channels))


def test_a_size_read_as_a_number_pins_the_formulas_and_skips_the_export_rung(monkeypatch):
    """torch.fx refused int() of a traced size, and auto then spent samvit's 15 s in torch.export
    (which guards the size int() reads, and refuses so). The number read at the probe is now a
    condition: equal there, it pins the input size, and the concrete rung counts that size from
    the same graph."""
    from convtally.analysis import export_capture
    from convtally.analysis.accounting import PinnedBranch

    network = ReadsItsSizeAsNumber().eval()
    with pytest.raises(ValueError, match="pins the input size"):  # what auto no longer tries
        analyse(network, capture="export", resolutions=[(32, 32)])

    def no_export_rung(*args, **kwargs):
        raise AssertionError("the export rung was entered")

    monkeypatch.setattr(export_capture, "analyse_exported", no_export_rung)
    with pytest.raises(PinnedBranch, match=r"its input size is pinned: floor\(W/4\) == 8 \(the "
                       r"forward reads it as a number; traced at 32x32\) holds at neither "
                       r"64x64 nor 128x128"):
        analyse(network, capture="fx", resolutions=[(32, 32)])
    for size in [(32, 32), (48, 40)]:
        counted = analyse(network, convention=preset("fvcore"), resolutions=[size])
        assert counted.capture == "concrete"
        assert "export: not tried, since torch.export takes the same branch" in (
            counted.capture_note)
        assert counted.totals_at([size])["connections"][0] == fvcore_total(network, size)
        assert verify(counted, [size]).mismatches == []


def test_a_number_read_that_is_no_size_leaves_formulas_for_every_size():
    network = ReadsItsChannelsAsNumber().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "fx" and analysis.symbolic and not analysis.branches
    for size in [(32, 32), (17, 45)]:
        assert analysis.totals_at([size])["connections"][0] == fvcore_total(network, size)


class ReadsItsBatchAsNumber(ReadsItsChannelsAsNumber):
    """Reads the batch size as a Python number and views by it."""

    def forward(self, x):
        x = self.conv(x)
        batch = int(x.shape[0])
        return self.head(x.mean((2, 3)).view(batch, -1))


class BranchesOnItsBatch(ReadsItsChannelsAsNumber):
    """Branches on a batch of one (a forward pass of a single image takes another path)."""

    def forward(self, x):
        x = self.conv(x)
        if x.shape[0] == 1:
            x = x * 2
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("network_type", [ReadsItsBatchAsNumber, BranchesOnItsBatch])
def test_a_condition_on_the_batch_size_is_a_note_at_batch_one_not_a_pinned_size(network_type):
    """Every row is counted per example at batch size one, the probe's: B == 1 holds there.
    It was taken for an equality that pins the input size (its formulas refused, the model
    exported at each size)."""
    network = network_type().eval()
    analysis = analyse(network, convention=preset("fvcore"), resolutions=[(32, 32)])
    assert analysis.capture == "fx" and analysis.symbolic and not analysis.branches
    assert any("B == 1 holds at batch size 1, where the rows are counted" in text
               for text in analysis.assumptions)
    for size in [(32, 32), (24, 40)]:
        assert analysis.totals_at([size])["connections"][0] == fvcore_total(network, size)
