"""The formulas, evaluated, against the running network: parameters, forward hooks, fvcore."""

from __future__ import annotations

import warnings

import pytest
import sympy as sp
import torch
from convtally.analysis import peers
from convtally.analysis.accounting import (
    H,
    ResolutionError,
    W,
    analyse,
    parse_resolution,
    parse_settings,
)
from convtally.analysis.conventions import make_convention
from convtally.analysis.evaluation import IntegerEvaluator
from convtally.analysis.rules import UnsupportedLayer
from convtally.models.registry import REGISTRY
from torch import nn

K, NF, NC, NIC = sp.symbols("K NF NC NIC", integer=True, positive=True)

SEED_MODELS = ["poolupsample", "convtranspose", "unet"]
SEED_SETTINGS = [{}, {"K": 5, "NF": 8, "NC": 10, "NIC": 1}, {"K": 3, "NF": 16, "NC": 7, "NIC": 2}]
SEED_RESOLUTIONS = [(32, 32), (64, 64), (48, 96)]


def running_network_counts(network: nn.Module, channels: int, height: int, width: int):
    """Measure each leaf module call (output size, parameters) and fvcore's per-module count."""
    calls: dict[str, list[int]] = {}
    names = {m: n for n, m in network.named_modules()}
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.setdefault(names[m], []).append(o[0].numel()))
        for m in network.modules()
        if not list(m.children())
    ]
    x = torch.zeros(1, channels, height, width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network.eval()(x)
        for handle in handles:
            handle.remove()
        by_module = peers.run_fvcore(network, x).per_module
    return calls, by_module


def assert_matches_running_network(analysis, network, channels, resolutions):
    values = analysis.evaluate(resolutions)
    for j, (height, width) in enumerate(resolutions):
        calls, fvcore = running_network_counts(network, channels, height, width)
        seen_calls: dict[str, int] = {}
        checked_conv = 0
        for index, layer in enumerate(analysis.layers):
            module_name = layer.name.split(":")[0]
            if module_name not in calls:
                continue  # a functional layer: no hook to compare with
            call = seen_calls.get(module_name, 0)
            seen_calls[module_name] = call + 1
            assert int(values["outputs"][index, j]) == calls[module_name][call], (
                f"{layer.name} outputs at {height}x{width}"
            )
            if call == 0:
                params = sum(p.numel() for p in network.get_submodule(module_name).parameters())
                assert int(values["weights"][index, j]) == params, f"{layer.name} weights"
            if layer.kind in ("conv", "linear") and fvcore.get(module_name):
                assert int(values["connections"][index, j]) == fvcore[module_name], (
                    f"{layer.name} connections at {height}x{width}"
                )
                checked_conv += 1
        assert checked_conv > 0
        total_params = sum(p.numel() for p in network.parameters())
        assert int(values["weights"][:, j].sum()) == total_params - analysis.unused_weights


@pytest.mark.parametrize(
    "settings", SEED_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "defaults"
)
@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_networks_match_hooks_and_fvcore(name, settings):
    spec = REGISTRY[name]
    analysis = analyse(name, settings)
    network = spec.build(settings)
    assert_matches_running_network(
        analysis, network, spec.input_channel_count(settings), SEED_RESOLUTIONS
    )


@pytest.mark.parametrize("name", SEED_MODELS)
def test_formulas_hold_at_other_hyperparameters(name):
    """Formulas derived at the defaults, evaluated at another setting, fit that network."""
    analysis = analyse(name)
    other = {"K": 5, "NF": 12, "NC": 6, "NIC": 2}
    network = REGISTRY[name].build(other)
    at = {sp.Symbol(s, integer=True, positive=True): v for s, v in other.items()}
    total_weights = analysis.total("weights").subs(at)
    assert total_weights == sum(p.numel() for p in network.parameters())
    calls, fvcore = running_network_counts(network, 2, 64, 64)
    for layer in analysis.layers:
        if layer.name in calls:
            assert layer.outputs.subs({**at, H: 64, W: 64}) == calls[layer.name][0], layer.name
        if layer.kind == "conv" and fvcore.get(layer.name):
            assert layer.connections.subs({**at, H: 64, W: 64}) == fvcore[layer.name], layer.name


def test_poolupsample_first_layers_read_like_the_write_up():
    layers = {layer.name: layer for layer in analyse("poolupsample").layers}
    conv = layers["block0.0"]
    assert sp.simplify(conv.weights - (K**2 * NF * NIC + NF)) == 0
    assert sp.simplify(conv.outputs - NF * H * W) == 0
    assert sp.simplify(conv.connections - K**2 * NF * NIC * H * W) == 0
    pool = layers["block0.1"]
    assert sp.simplify(pool.outputs - NF * (H / 2) * (W / 2)) == 0
    assert pool.output_shape == (NF, H / 2, W / 2)
    assert sp.simplify(layers["block1.2"].weights - 2 * (2 * NF)) == 0
    assert sp.simplify(layers["block3.0"].weights - (NC * NF * K**2 + NC)) == 0


def test_unet_concatenations_add_channels():
    layers = {layer.name: layer for layer in analyse("unet").layers}
    assert layers["cat"].output_shape == (2 * NF, H / 2, W / 2)
    assert layers["cat:2"].output_shape == (NC + NIC, H, W)
    assert layers["cat"].connections == 0


TORCHVISION = {
    "resnet18": [(64, 64), (96, 96), (64, 128)],
    "resnet50": [(64, 64), (96, 96), (128, 128)],
    "vgg16": [(32, 32), (64, 64), (64, 96)],
    "mobilenet_v3_large": [(64, 64), (96, 96), (128, 96)],
    "deeplabv3_resnet50": [(64, 64), (72, 72), (96, 64)],
    "deeplabv3_resnet101": [(64, 64), (80, 80), (96, 96)],
    "lraspp_mobilenet_v3_large": [(64, 64), (80, 80), (96, 112)],
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_match_hooks_and_fvcore(name):
    analysis = analyse(f"torchvision:{name}")
    assert_matches_running_network(analysis, analysis.network, 3, TORCHVISION[name])


def test_exact_mode_keeps_floors_and_holds_at_odd_sizes():
    analysis = analyse("torchvision:resnet18", exact=True)
    assert any(layer.outputs.atoms(sp.floor) for layer in analysis.layers)
    assert_matches_running_network(analysis, analysis.network, 3, [(65, 65), (97, 70)])


def test_divisibility_is_derived_per_layer():
    analysis = analyse("poolupsample")
    assert analysis.divisor == (4, 4)
    assert analysis.assumptions[:2] == ["H divisible by 4", "W divisible by 4"]
    divisors = {layer.name: layer.divisor for layer in analysis.layers}
    assert divisors["block0.0"] == (1, 1)
    assert divisors["block0.1"] == (2, 2)
    assert divisors["block1.1"] == (4, 4)
    assert analyse("torchvision:resnet18").divisor == (32, 32)
    assert analyse("torchvision:deeplabv3_resnet50").divisor == (8, 8)


def test_resolution_breaking_divisibility_names_the_layer():
    analysis = analyse("poolupsample")
    with pytest.raises(
        ResolutionError,
        match=r"expected H divisible by 4 for block1\.1 "
        r"\(MaxPool2d\), got H=30.*try 28 or 32",
    ):
        analysis.evaluate([(30, 32)])
    with pytest.raises(ResolutionError, match=r"W divisible by 2 for block0\.1.*got W=33"):
        analysis.evaluate([(32, 33)])


def test_too_small_input_is_an_error():
    analysis = analyse("torchvision:vgg16", exact=True)
    with pytest.raises(ResolutionError, match="too small"):
        analysis.evaluate([(8, 8)])


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.odd = nn.LocalResponseNorm(2)
        self.tail = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.tail(self.odd(self.conv(x)))


def test_unsupported_layer_names_module_and_type():
    with pytest.raises(
        UnsupportedLayer, match=r"no rule for odd \(LocalResponseNorm\).*--allow-unknown"
    ):
        analyse(Unknown())


def test_allow_unknown_counts_from_the_running_network():
    analysis = analyse(Unknown(), allow_unknown=True)
    odd = next(layer for layer in analysis.layers if layer.name == "odd")
    assert not odd.known
    assert odd.output_shape == (4, H, W)
    assert any("no rule for odd" in a for a in analysis.assumptions)
    assert_matches_running_network(analysis, analysis.network, 3, [(16, 16), (20, 24)])


def test_conventions_switch_terms():
    default = analyse("poolupsample")
    with_bias = analyse("poolupsample", convention=make_convention(bias_in_connections=True))
    no_bn = analyse("poolupsample", convention=make_convention(batchnorm_in_weights=False))
    no_elementwise = analyse(
        "poolupsample", convention=make_convention(elementwise_in_connections=False)
    )
    at = [(32, 32)]
    base = default.evaluate(at)
    # bias edges: one per conv output
    conv_outputs = sum(
        int(base["outputs"][i, 0]) for i, layer in enumerate(default.layers) if layer.kind == "conv"
    )
    assert with_bias.totals_at(at)["connections"][0] == (
        default.totals_at(at)["connections"][0] + conv_outputs
    )
    assert no_bn.totals_at(at)["weights"][0] == 50304 - 2 * (32 + 64 + 32 + 24)
    elementwise = sum(
        int(base["connections"][i, 0])
        for i, layer in enumerate(default.layers)
        if layer.kind in ("norm", "activation")
    )
    assert no_elementwise.totals_at(at)["connections"][0] == (
        default.totals_at(at)["connections"][0] - elementwise
    )
    assert with_bias.convention.name == "custom"


def test_write_up_table_totals_corrected():
    totals = analyse("poolupsample").totals_at([(32, 32), (64, 64)])
    assert totals["weights"] == [50304, 50304]  # the write-up says 50280: block3.0's bias
    assert totals["outputs"] == [217088, 868352]  # as in the write-up


@pytest.mark.parametrize(
    "formula",
    [
        sp.floor((H - 1) / 2) + 1,
        sp.ceiling(H / 3) * sp.floor(W / 5) + H * (H + 1) / 2,
        sp.floor(sp.floor(H / 2 - sp.Rational(1, 2)) / 2) * 7,
    ],
)
def test_integer_evaluator_is_exact(formula):
    import numpy as np

    heights = np.array([1, 7, 8, 33, 224, 10**7 + 3], dtype=object)
    widths = np.array([4, 8, 12, 16, 20, 10**6 + 1], dtype=object)
    got = IntegerEvaluator([formula])(heights, widths)[0]
    for h, w, value in zip(heights, widths, got, strict=True):
        assert value == formula.subs({H: int(h), W: int(w)})


@pytest.mark.parametrize(
    "text,expected", [("32", (32, 32)), ("32x48", (32, 48)), ("64X64", (64, 64))]
)
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["", "x", "32x", "0", "-4", "3x4x5", "a"])
def test_parse_resolution_rejects(text):
    with pytest.raises(ValueError, match="bad resolution"):
        parse_resolution(text)


@pytest.mark.parametrize("item", ["NF", "NF=", "NF=x", "=3", "NF=0"])
def test_parse_settings_rejects(item):
    with pytest.raises(ValueError, match="bad --set"):
        parse_settings([item])


def test_a_convention_given_where_the_settings_go_is_refused():
    from convtally.analysis.conventions import preset

    with pytest.raises(TypeError, match="got Convention; a convention is passed as convention="):
        analyse("poolupsample", preset("fvcore"))


def test_settings_given_with_a_built_network_are_refused_not_ignored():
    network = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"settings \{'NF': 8\} are for a model built by name; "
                       "Sequential is built already"):
        analyse(network, {"NF": 8})
    assert analyse(network, {}).totals_at([(8, 8)]) == analyse(network).totals_at([(8, 8)])


def test_analysis_of_deeplabv3_has_dict_output_and_adaptive_pooling():
    analysis = analyse("torchvision:deeplabv3_resnet50")
    types = {layer.type for layer in analysis.layers}
    assert {"AdaptiveAvgPool2d", "interpolate", "cat"} <= types


def test_an_analysis_does_not_change_once_analysed():
    """Its attributes cannot be set; another convention or network gives a new analysis and
    leaves the first as it was (the rows' raw costs counted again, not changed)."""
    from convtally.analysis.conventions import preset

    analysis = analyse("poolupsample")
    before = analysis.totals_at([(32, 32)])
    for name, value in [("convention", preset("fvcore")), ("layers", []), ("network", None),
                        ("capture", "concrete")]:
        with pytest.raises(AttributeError, match="does not change once analysed"):
            setattr(analysis, name, value)
    fvcore = analysis.with_convention(preset("fvcore"))
    assert fvcore is not analysis and fvcore.convention.name == "fvcore"
    assert all(a.cost is b.cost for a, b in zip(analysis.layers, fvcore.layers))
    assert fvcore.totals_at([(32, 32)]) != before
    with pytest.raises(AttributeError):
        fvcore.convention = analysis.convention
    copy = analysis.with_network(analysis.network, analysis.graph_module)
    assert copy.totals_at([(32, 32)]) == before
    assert analysis.convention.name == "default" and analysis.totals_at([(32, 32)]) == before
