"""Presets: our formulas under each tool's convention equal the tool's own number.

Every number on the tools' side is computed here by the tool itself, with its default call
(fvcore FlopCountAnalysis(m, x).total(), ptflops get_model_complexity_info(m, (C, H, W),
as_strings=False), thop profile(m, inputs=(x,)), torchinfo summary(m, input_size).total_mult_adds,
FlopCounterMode's total), run through analysis.peers (the runners verify and crosscheck use),
and our side is the preset's formulas evaluated at that input: in total, in parameters, and
module by module (totals can hide two errors that cancel).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from convtally.analysis import peers
from convtally.analysis.accounting import H, W, analyse
from convtally.analysis.conventions import (
    DEFAULT,
    PRESETS,
    Convention,
    lookup_keys,
    make_convention,
    preset,
)
from convtally.analysis.rules import BATCH, LayerCost, SymTensor
from convtally.models.registry import resolve
from torch import nn

fvcore_nn = pytest.importorskip("fvcore.nn")
ptflops = pytest.importorskip("ptflops")
thop = pytest.importorskip("thop")
torchinfo = pytest.importorskip("torchinfo")

K, NF, NC, NIC = sp.symbols("K NF NC NIC", integer=True, positive=True)


def tool_results(build: Callable[[], nn.Module], channels: int, height: int, width: int,
                 tools: tuple[str, ...] = peers.TOOLS):
    """Return tool -> what the tool reports (peers.ToolResult), each on a fresh network."""
    x = torch.zeros(1, channels, height, width)
    return {tool: peers.run_tool(tool, build().eval(), x) for tool in tools}


def preset_per_module(analysis, tool: str, height: int, width: int) -> dict[str, int]:
    """Return module name -> our connections under `tool`'s preset, summed over its calls."""
    values = analysis.with_convention(preset(tool)).evaluate([(height, width)])["connections"]
    per_module: dict[str, int] = {}
    for index, layer in enumerate(analysis.layers):
        if layer.cost.via in ("module", "module_subclass"):
            module = layer.name.split(":")[0]
            per_module[module] = per_module.get(module, 0) + int(values[index, 0])
    return per_module


def preset_problems(analysis, results, height: int, width: int) -> list[str]:
    """Return where our presets differ from the tools' `results`: total, parameters, module."""
    problems = []
    for tool, result in results.items():
        totals = analysis.with_convention(preset(tool)).totals_at([(height, width)])
        connections, weights = totals["connections"][0], totals["weights"][0]
        at = f"{tool} at {height}x{width}"
        if result.total != connections:
            problems.append(f"{at}: tool {result.total}, preset {connections}")
        if result.parameters is not None and result.parameters != weights:
            problems.append(f"{at}: parameters {result.parameters}, preset weights {weights}")
        # per layer: totals can hide two errors that cancel
        for module, ours in preset_per_module(analysis, tool, height, width).items():
            counted = (result.per_module or {}).get(module, 0)
            if counted != ours:
                problems.append(f"{at}: {module} tool {counted}, preset {ours}")
    return problems


def assert_presets_match(analysis, build, channels, resolutions):
    """Our preset equals each tool in total, in parameters, and module by module."""
    problems = []
    for height, width in resolutions:
        problems += preset_problems(
            analysis, tool_results(build, channels, height, width), height, width
        )
    assert problems == []


def test_per_layer_comparison_catches_errors_that_cancel():
    """A tool's count moved from one layer to another keeps its total and must still differ."""
    spec = resolve("poolupsample")
    analysis = analyse(spec)
    results = tool_results(spec.build, 3, 32, 32)
    assert preset_problems(analysis, results, 32, 32) == []
    fvcore = results["fvcore"]
    fvcore.per_module["block1.0"] += 1000
    fvcore.per_module["block2.0"] -= 1000
    assert preset_problems(analysis, results, 32, 32) == [
        f"fvcore at 32x32: block1.0 tool {fvcore.per_module['block1.0']}, "
        f"preset {fvcore.per_module['block1.0'] - 1000}",
        f"fvcore at 32x32: block2.0 tool {fvcore.per_module['block2.0']}, "
        f"preset {fvcore.per_module['block2.0'] + 1000}",
    ]


# --- the proof: torchvision CNNs of several families, seed networks, every rule ------------

TORCHVISION = {
    "resnet18": [(224, 224), (96, 128)],  # residual adds, max pool, adaptive pool
    "mobilenet_v3_large": [(224, 224), (96, 96)],  # depthwise, SE, hardswish, F.adaptive pool
    "efficientnet_b0": [(224, 224), (128, 96)],  # SiLU, SE with sigmoid, stochastic depth
    "densenet121": [(224, 224), (96, 96)],  # dense concatenation, F.relu, avg pool
    "shufflenet_v2_x1_0": [(224, 224), (96, 96)],  # channel shuffle, chunk, mean
    "regnet_y_400mf": [(224, 224), (96, 96)],  # group convs, SE, residual adds
    "squeezenet1_0": [(224, 224), (96, 96)],  # fire concatenation, ceil-mode pools, dropout
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_presets_equal_the_tools(name):
    spec = resolve(f"torchvision:{name}")
    analysis = analyse(spec)
    assert_presets_match(analysis, spec.build, 3, TORCHVISION[name])


@pytest.mark.parametrize("name", ["poolupsample", "convtranspose", "unet"])
def test_seed_presets_equal_the_tools(name):
    spec = resolve(name)
    analysis = analyse(spec)
    assert_presets_match(analysis, spec.build, 3, [(32, 32), (64, 64)])


@pytest.mark.parametrize("name", ["poolupsample", "convtranspose", "unet"])
def test_seed_presets_hold_at_other_hyperparameters(name):
    settings = {"K": 5, "NF": 8, "NC": 10, "NIC": 1}
    spec = resolve(name)
    analysis = analyse(spec, settings)
    assert_presets_match(analysis, lambda: spec.build(settings), 1, [(32, 48)])


class Zoo(nn.Module):
    """Every rule at least once: modules, F functions, torch functions, methods, operators."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.same = nn.Conv2d(8, 8, 3, padding="same", bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.bn_plain = nn.BatchNorm2d(8, affine=False)
        self.gn = nn.GroupNorm(4, 8)
        self.relu = nn.ReLU(inplace=True)
        self.acts = nn.Sequential(
            nn.ReLU6(),
            nn.LeakyReLU(),
            nn.PReLU(8),
            nn.ELU(),
            nn.GELU(),
            nn.Sigmoid(),
            nn.Tanh(),
            nn.Hardswish(),
            nn.Hardsigmoid(),
            nn.SiLU(),
            nn.Mish(),
        )
        self.softmax = nn.Softmax(dim=1)
        self.maxpool = nn.MaxPool2d(2)
        self.avgpool = nn.AvgPool2d(3, stride=2, padding=1)
        self.up_nearest = nn.Upsample(scale_factor=2)
        self.up_bilinear = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up_bicubic = nn.Upsample(scale_factor=2, mode="bicubic", align_corners=False)
        self.deconv = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=2)
        self.dropout = nn.Dropout(0.1)
        self.adaptive_avg = nn.AdaptiveAvgPool2d(4)
        self.adaptive_max = nn.AdaptiveMaxPool2d((2, 2))
        self.ln = nn.LayerNorm([4, 4])
        self.row_linear = nn.Linear(4, 3)  # on a 4-d tensor: many rows per example
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 2 * 2 + 8 * 4 * 3, 10)
        self.unused = nn.Linear(5, 5)  # forward never calls it

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        y = self.relu(self.bn_plain(self.same(x)))  # self.relu called a second time
        z = self.gn(self.depthwise(x))
        x = x + y
        x += z
        x = torch.add(x, y)
        x = x.add(z)
        x = x.mul(torch.sigmoid(z))
        x = torch.mul(x, 0.5)
        x = x * y - z / 2
        x = self.acts(x)
        x = self.softmax(x) + F.softmax(x, dim=1)
        x = F.relu(x) + torch.relu(x) + x.relu() + F.relu6(x) + F.silu(x) + F.gelu(x) + F.elu(x)
        x = self.maxpool(x)
        pooled = F.max_pool2d(x, 2) + F.avg_pool2d(x, 2)
        x = torch.cat([self.avgpool(x), pooled], dim=1)
        x = self.up_nearest(self.deconv(x))
        x = self.up_bilinear(x) + F.interpolate(x, scale_factor=2, mode="bilinear")
        x = self.up_bicubic(x) + F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2))
        x = self.dropout(x)
        half = F.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True)
        x = x + F.interpolate(half, size=x.shape[2:], mode="bilinear", antialias=True)
        x = x * (F.adaptive_avg_pool2d(x, 1) + x.mean((2, 3), keepdim=True))
        p = self.adaptive_max(x) + F.adaptive_max_pool2d(x, 2)
        q = self.row_linear(self.ln(self.adaptive_avg(x)))
        return self.fc(torch.cat([self.flatten(p), self.flatten(q)], dim=1))


def test_every_rule_equals_every_tool():
    torch.manual_seed(0)
    network = Zoo()
    analysis = analyse(network)
    assert analysis.unused_weights == 30
    assert_presets_match(analysis, lambda: Zoo(), 3, [(32, 32), (48, 40)])


def test_frozen_parameters_are_not_ptflops_parameters():
    def build():
        network = Zoo()
        for parameter in network.conv.parameters():
            parameter.requires_grad = False
        return network

    analysis = analyse(build())
    assert_presets_match(analysis, build, 3, [(32, 32)])


# --- formulas stay symbolic -----------------------------------------------------------------


def test_thop_total_of_poolupsample_is_a_formula():
    total = analyse("poolupsample", convention=preset("thop")).total("connections")
    # thop: convs as output * C_in * K^2 without bias; BatchNorm 2 * 2 per value (affine);
    # nearest upsampling 1 per output; ReLU and MaxPool 0 (derived by hand from its hooks).
    convs = H * W * K**2 * (NIC * NF + NF**2 / 2 + NF**2 / 8 + NF * NC / 4 + NC**2)
    batch_norms = 4 * H * W * (NF / 4 + 2 * NF / 16 + NF / 4 + NC)
    upsampling = H * W * (NF / 4 + NC)
    assert sp.expand(total - (convs + batch_norms + upsampling)) == 0


def test_every_preset_is_symbolic_in_the_hyperparameters():
    analysis = analyse("unet")
    for name in PRESETS:
        total = analysis.with_convention(preset(name)).total("connections")
        assert total.free_symbols >= {H, W, K, NF, NC, NIC}, name


def test_analyse_with_a_preset_equals_recounting_under_it():
    traced = analyse("convtranspose", convention=preset("torchinfo"))
    recounted = analyse("convtranspose").with_convention(preset("torchinfo"))
    assert sp.expand(traced.total("connections") - recounted.total("connections")) == 0
    assert traced.convention.name == "torchinfo"


# --- the convention machinery ----------------------------------------------------------------


def test_presets_and_their_names():
    assert list(PRESETS) == ["default", "fvcore", "ptflops", "thop", "torchinfo", "torch"]
    assert preset("default") is DEFAULT
    with pytest.raises(ValueError, match=r"unknown convention 'flops'; use one of default, "):
        preset("flops")
    assert make_convention() is DEFAULT
    assert make_convention(bias_in_connections=True).name == "custom"
    assert make_convention(bias_in_connections=False, base="ptflops").name == "ptflops+custom"
    assert make_convention(bias_in_connections=True, base="ptflops") is PRESETS["ptflops"]


def test_describe_and_as_dict_say_what_was_used():
    assert DEFAULT.describe() == (
        "convention default: biases not in connections; BatchNorm parameters in weights; "
        "element-wise layers in connections"
    )
    text = preset("thop").describe()
    assert text.startswith("convention thop: layers counted as thop profile(")
    data = preset("ptflops").as_dict()
    assert data["bias_in_connections"] is True
    assert data["connection_rules"]["relu@module"] == "outputs + inputs [+ bias]"
    assert data["connection_rules"]["*"] == "0"
    every_rule = [r for c in PRESETS.values() for r in c.connection_rules.values()]
    assert all(r.source for r in every_rule)


def test_lookup_goes_from_the_most_specific_key():
    cost = LayerCost("activation", SymTensor((BATCH, sp.Integer(4))), op="relu", via="F")
    assert lookup_keys(cost) == ("relu@F", "activation@F", "*@F", "relu", "activation", "*")
    assert preset("ptflops").connection_rule(cost)[0] == "relu@F"
    assert preset("thop").connection_rule(cost)[0] == "*"
    operator_add = LayerCost("elementwise", cost.output, op="add", via="operator")
    assert preset("ptflops").connections(operator_add) == 0  # x + y is not patched
    torch_add = LayerCost("elementwise", cost.output, op="add", via="torch")
    assert preset("ptflops").connections(torch_add) == 4


def test_switches_apply_on_top_of_a_preset():
    spec = resolve("poolupsample")
    analysis = analyse(spec)
    theirs = {
        tool: (result.total, result.parameters)
        for tool, result in tool_results(spec.build, 3, 32, 32).items()
    }
    at = [(32, 32)]

    def total(convention: Convention, quantity: str = "connections") -> int:
        return analysis.with_convention(convention).totals_at(at)[quantity][0]

    # conv outputs at 32x32 (NF=32, NC=24): 32*32*32 + 64*16*16 + 32*8*8 + 24*16*16 + 24*32*32
    biases = 32768 + 16384 + 2048 + 6144 + 24576
    assert total(make_convention(bias_in_connections=False, base="ptflops")) == (
        theirs["ptflops"][0] - biases
    )
    # thop's BatchNorm: 4 per value of NF x 16^2, 2NF x 8^2, NF x 16^2, NC x 32^2
    batch_norm = 4 * (8192 + 4096 + 8192 + 24576)
    assert total(make_convention(elementwise_in_connections=False, base="thop")) == (
        theirs["thop"][0] - batch_norm
    )
    assert total(make_convention(batchnorm_in_weights=False, base="thop"), "weights") == (
        theirs["thop"][1] - 2 * (32 + 64 + 32 + 24)
    )
