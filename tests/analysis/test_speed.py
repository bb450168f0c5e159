"""The speed-ups change no formula and no number.

The analysis builds networks on the meta device, remembers simplified formulas and divisibility
answers, and compiles each distinct formula once; the renderers write CSV and JSON without
pandas' frame and json's indented encoder. Each is checked here against the plain path it
replaces: a real build with nothing remembered, one formula evaluated at a time by sympy,
pandas' to_csv and json.dumps.
"""

from __future__ import annotations

import json
import operator
import subprocess
import sys

import pytest
import sympy as sp
import torch
from convtally.analysis import accounting, hyperparameters, rules, shapes, tracing
from convtally.analysis.accounting import QUANTITIES, H, W, analyse
from convtally.analysis.evaluation import IntegerEvaluator
from convtally.analysis.formatting import (
    cost_frame,
    header_lines,
    json_text,
    render,
    resolution_label,
    select_columns,
)
from convtally.models.registry import ModelSpec, resolve
from tabulate import tabulate
from torch import nn

MODELS = [
    "poolupsample",
    "convtranspose",
    "unet",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:densenet121",
]


def plain_analyse(monkeypatch, model, **kwargs):
    """Return analyse(model) with the real build, no memo and nothing remembered."""
    with monkeypatch.context() as patch:
        patch.setattr(ModelSpec, "build_meta", lambda self, settings=None: None)
        patch.setattr(accounting, "_simplify_once", accounting._simplify_once.__wrapped__)
        patch.setattr(
            accounting, "_required_multiple", accounting._required_multiple.__wrapped__
        )
        patch.setattr(rules, "simplified_difference", lambda a, b: sp.simplify(a - b))
        patch.setattr(rules, "_exact_scale", sp.nsimplify)
        patch.setattr(hyperparameters, "_FITTED", {})  # the hyperparameters fitted again
        patch.setattr(accounting, "_at_setting", accounting._at_setting.__wrapped__)
        patch.setattr(accounting, "_mentions_batch", accounting._mentions_batch.__wrapped__)
        patch.setattr(rules, "_relation", rules._relation.__wrapped__)
        patch.setattr(shapes, "adaptive_window_total", shapes.adaptive_window_total.__wrapped__)
        patch.setattr(accounting, "_branch_relation", accounting._branch_relation.__wrapped__)
        patch.setattr(accounting, "_counted_once", accounting._counted_once.__wrapped__)
        return analyse(model, **kwargs)


def rows(analysis):
    return [
        (
            layer.name, layer.type, layer.kind, layer.node, layer.known, layer.divisor,
            tuple(str(d) for d in layer.output_shape),
            *(str(layer.formula(q)) for q in QUANTITIES),
            tuple((str(a), str(b), what) for a, b, what in layer.requirements),
        )
        for layer in analysis.layers
    ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("exact", [False, True])
def test_fast_path_gives_the_plain_paths_formulas_and_numbers(monkeypatch, model, exact):
    fast = analyse(model, exact=exact)
    plain = plain_analyse(monkeypatch, model, exact=exact)
    assert fast.shape_graph_module is not None
    assert next(fast.shape_graph_module.parameters()).is_meta  # it was counted on meta
    assert rows(fast) == rows(plain)
    for a, b in zip(fast.layers, plain.layers, strict=True):  # equal as sympy, not only as text
        assert [a.formula(q) for q in QUANTITIES] == [b.formula(q) for q in QUANTITIES]
        assert a.output_shape == b.output_shape
    assert (fast.divisor, fast.assumptions, fast.capture) == (
        plain.divisor, plain.assumptions, plain.capture
    )
    assert (fast.unused_weights, fast.unused_trainable_weights) == (
        plain.unused_weights, plain.unused_trainable_weights
    )
    for quantity in QUANTITIES:
        assert fast.total(quantity) == plain.total(quantity)
    step = fast.divisor[0] * 8
    sizes = [(step * 4, step * 4), (step * 4, step * 5), (step * 7, step * 6)]
    values = fast.evaluate(sizes)
    at = fast.substitutions()
    for index, layer in enumerate(plain.layers):  # one formula at a time, by sympy
        for quantity in QUANTITIES:
            for j, (height, width) in enumerate(sizes):
                point = {**at, H: height, W: width}
                expected = int(sp.sympify(layer.formula(quantity)).subs(point))
                assert values[quantity][index, j] == expected, (layer.name, quantity)


def test_the_network_of_a_meta_analysis_has_real_weights_and_the_same_graph():
    analysis = analyse("torchvision:resnet18")
    meta_nodes = [n.name for n in analysis.shape_graph_module.graph.nodes]
    network = analysis.network
    assert not any(p.is_meta for p in network.parameters())
    assert [n.name for n in analysis.graph_module.graph.nodes] == meta_nodes
    assert analysis.graph_module.get_submodule("conv1") is network.conv1  # shared modules
    assert analysis.with_convention(analysis.convention).network is network  # built once
    with torch.no_grad():
        assert network(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


class ReadsValuesWhileBuilding(nn.Module):
    """A network whose constructor reads a tensor's value: it cannot build on meta."""

    def __init__(self):
        super().__init__()
        width = int(torch.tensor([8]).item())
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def build_reads_values():
    """Return ReadsValuesWhileBuilding()."""
    return ReadsValuesWhileBuilding()


class ReadsItsInitialisation(ReadsValuesWhileBuilding):
    """A constructor that reads what nn.init wrote: it cannot build without initialisation."""

    def __init__(self):
        super().__init__()
        scale = torch.empty(1)
        torch.nn.init.constant_(scale, 7.0)
        if scale.item() != 7.0:
            raise ValueError("nn.init did not run")


def build_reads_initialisation():
    """Return ReadsItsInitialisation()."""
    return ReadsItsInitialisation()


def test_a_network_that_reads_values_while_building_is_built_without_initialisation(
        monkeypatch):
    """torch.arange(...).tolist() cannot run on meta (torchvision's regnets): the network is
    built on the CPU with nn.init skipped, then made meta; the count is the real build's."""
    spec = resolve(f"{__name__}:build_reads_values")
    network = spec.build_meta()
    assert network is not None and all(p.is_meta for p in network.parameters())
    analysis = analyse(spec)
    assert all(p.is_meta for p in analysis.shape_graph_module.parameters())
    assert analysis.totals_at([(32, 32)]) == analyse(spec.build().eval()).totals_at([(32, 32)])
    assert analysis.totals_at([(32, 32)])["weights"] == [3 * 8 * 9 + 8 + 8 * 2 + 2]


def test_a_network_that_cannot_build_without_initialisation_is_built_for_real():
    spec = resolve(f"{__name__}:build_reads_initialisation")
    assert spec.build_meta() is None
    analysis = analyse(spec)
    assert analysis.capture == "fx"
    assert not any(p.is_meta for p in analysis.shape_graph_module.parameters())
    assert analysis.totals_at([(32, 32)])["weights"] == [3 * 8 * 9 + 8 + 8 * 2 + 2]


class Unruled(nn.Module):
    def forward(self, x):
        return torch.special.expit(x)  # no rule: counted from the running network


def build_unruled():
    """Return a network with a layer that has no rule."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), Unruled())


def test_a_layer_without_a_rule_is_shaped_on_meta_as_on_the_real_build(monkeypatch):
    spec = resolve(f"{__name__}:build_unruled")
    fast = analyse(spec, allow_unknown=True)
    plain = plain_analyse(monkeypatch, spec, allow_unknown=True)
    assert next(fast.shape_graph_module.parameters()).is_meta  # shaped by a meta run
    assert rows(fast) == rows(plain)
    assert not fast.complete


class Recurrent(nn.Module):
    """A conv feature map read as a sequence by an LSTM (one step per pixel)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(self.conv(x).flatten(2).transpose(1, 2))[0]


def test_an_rnn_is_shaped_on_real_zeros_once_per_size(monkeypatch):
    """A meta LSTM steps through 8,836 pixels in Python; the real kernel is run instead, once."""
    meta = torch.fx.symbolic_trace(Recurrent().to("meta"))
    real = torch.fx.symbolic_trace(Recurrent())
    runs = []
    monkeypatch.setattr(tracing, "node_output_shapes", lambda graph_module, x, run=(
        tracing.node_output_shapes): runs.append(x.shape) or run(graph_module, x))
    for _ in range(3):
        shapes = tracing.concrete_shapes(meta, (1, 3, 96, 96))
    assert runs == [torch.Size([1, 3, 96, 96])]
    assert shapes == tracing.node_output_shapes(real, torch.zeros(1, 3, 96, 96))
    assert shapes["lstm"] == ((1, 94 * 94, 6), ((1, 1, 6), (1, 1, 6)))


def test_the_evaluator_compiles_each_distinct_formula_once():
    formulas = [H * W, sp.floor(H / 2) * W, H * W, sp.Integer(7), sp.floor(H / 2) * W]
    evaluator = IntegerEvaluator(formulas)
    assert len(evaluator.denominators) == 3
    import numpy as np

    sides = np.array([31, 64], dtype=object)
    values = evaluator(sides, sides)
    assert values.tolist() == [[961, 4096], [465, 2048], [961, 4096], [7, 7], [465, 2048]]


@pytest.mark.parametrize("model", ["unet", "torchvision:resnet18"])
def test_text_markdown_csv_and_json_are_what_pandas_tabulate_and_json_write(model):
    analysis = analyse(model)
    analysis.layers[0].name = 'odd, "quoted"\nname {0}'  # csv quoting and format braces
    step = analysis.divisor[0]
    sizes = [(step * (4 + i % 7), step * (4 + i // 7)) for i in range(40)]
    labels = [resolution_label(*r) for r in sizes]
    for columns in ("both", "values", "formulas"):
        expected = select_columns(cost_frame(analysis, sizes), columns).to_csv(index=False)
        assert render(analysis, sizes, "csv", columns) == expected
    few = sizes[:3]
    for fmt, style in (("text", "simple"), ("markdown", "pipe")):
        for columns in ("both", "values", "formulas"):
            frame = cost_frame(analysis, few)
            if fmt == "markdown":
                for name in (*QUANTITIES, "output shape"):
                    frame[name] = frame[name].map(lambda f: f"`{f}`" if f else f)
            table = tabulate(select_columns(frame, columns), headers="keys", tablefmt=style,
                             showindex=False, intfmt=",", disable_numparse=False)
            header = header_lines(analysis, few)
            notes = "\n".join(f"- {line}" for line in header) if fmt == "markdown" else (
                "\n".join(header))
            assert render(analysis, few, fmt, columns) == f"{notes}\n\n{table}\n"
    data = analysis.to_dict(sizes, labels)
    text = render(analysis, sizes, "json")
    assert json.loads(text)["layers"] == data["layers"]
    assert text == json.dumps({**data, "orders": json.loads(text)["orders"]}, indent=2) + "\n"


@pytest.mark.parametrize(
    "data",
    [
        {},
        [],
        {"a": [], "b": {}, "c": None, "d": True, "e": 1.5, "f": float("nan"), "g": "é\u2028"},
        {"values": {str(i): i * 10**20 for i in range(20)}, "mixed": {str(i): i for i in range(9)}
         | {"x": True}},
        [{"k": (1, 2)}, [[]], -3],
        {"not a str key": {1: 2}},
    ],
)
def test_json_text_is_json_dumps_indent_2(data):
    assert json_text(data) == json.dumps(data, indent=2)


def run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_help_and_padding_do_not_import_torch_or_sympy():
    out = run_python(
        "import contextlib, io, sys\n"
        "from convtally.analysis.cli import main\n"
        "for argv in (['--help'], ['table', '--help'], ['padding', '--kernel', '5']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'sympy', 'pandas', 'matplotlib', 'scipy')"
        " if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_the_written_preset_names_are_the_presets():
    from convtally.analysis.cli import PRESET_NAMES
    from convtally.analysis.conventions import PRESETS

    assert list(PRESET_NAMES) == list(PRESETS)


def test_train_tasks_still_parse(capsys):
    from convtally.analysis.cli import main

    with pytest.raises(SystemExit) as exit_code:
        main(["train", "colour", "--help"])
    assert exit_code.value.code == 0
    assert "--epochs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("convtally ")


class PoolsBranchesAndMixes(nn.Module):
    """What the remembered rules answer: adaptive pooling to windows that overlap, a branch on
    a size (timm bat_resnext's `if t <= 1`) and a product over the batch (csatv2's q @ k.T)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.pool = nn.AdaptiveMaxPool2d((5, 1))

    def forward(self, x):
        y = self.conv(x)
        rows = self.pool(y).flatten(1)
        if y.shape[-1] // 2 <= 1:
            return rows
        columns = nn.functional.adaptive_avg_pool2d(y, (1, 3)).flatten(1)
        return rows.sum() + columns @ columns.transpose(0, 1)


@pytest.mark.parametrize("exact", [False, True])
def test_remembered_pooling_branches_and_batch_rows_give_the_plain_paths_formulas(
    monkeypatch, exact
):
    fast = analyse(PoolsBranchesAndMixes().eval(), exact=exact)
    plain = plain_analyse(monkeypatch, PoolsBranchesAndMixes().eval(), exact=exact)
    assert fast.branches and any("mix examples" in note for note in fast.assumptions)
    assert rows(fast) == rows(plain)
    assert (fast.divisor, fast.assumptions, fast.branches) == (
        plain.divisor, plain.assumptions, plain.branches
    )
    sizes = [(32, 32), (36, 44), (64, 40)]
    assert fast.totals_at(sizes) == plain.totals_at(sizes)


def test_a_remembered_size_comparison_keeps_the_number_type_it_was_given():
    """A relation is remembered per argument type: H <= 1.0 and H <= 1 are different texts."""
    assert str(rules._relation(operator.le, H, 1.0)) == "H <= 1.0"
    assert str(rules._relation(operator.le, H, 1)) == "H <= 1"
    assert str(shapes.adaptive_window_total(H, 3)) == str(
        shapes.adaptive_window_total.__wrapped__(H, 3)
    )


@pytest.mark.parametrize(
    "model, size", [("poolupsample", (30, 30)), ("torchvision:resnet18", (225, 200))]
)
def test_an_off_divisibility_size_gets_the_exact_analysis_without_a_second_trace(
    monkeypatch, model, size
):
    calls = []

    def exact():
        calls.append(1)
        return analyse(model, exact=True)

    answered = accounting.answer_every_resolution(analyse(model), [size], exact)
    assert calls == []  # made from the simplified analysis' own rows
    simple = plain_analyse(monkeypatch, model)
    simple._exact_again = None  # the full path: build, trace and count again at exact=True
    expected = accounting.answer_every_resolution(
        simple, [size], lambda: plain_analyse(monkeypatch, model, exact=True)
    )
    assert rows(answered) == rows(expected)
    assert answered.assumptions == expected.assumptions
    assert answered.totals_at([size]) == expected.totals_at([size])
    assert answered.network is not None and not any(
        p.is_meta for p in answered.network.parameters()
    )


def test_a_convention_copy_does_not_reuse_the_exact_rows_of_another_convention():
    from convtally.analysis.conventions import preset

    simple = analyse("poolupsample").with_convention(preset("fvcore"))
    assert getattr(simple, "_exact_again", None) is None


@pytest.mark.parametrize("model, sizes", [
    (PoolsBranchesAndMixes, [(32, 32), (36, 44)]),  # rows at batch size 1, and an unused row
    ("torchvision:resnet18", [(64, 64), (96, 80)]),
    ("timm:test_vit_relpos", [(160, 160)]),
])
def test_a_concrete_analysis_reads_its_rows_counts_as_counting_their_costs_again_gives(
    model, sizes
):
    from convtally.analysis.conventions import preset

    network = model().eval() if isinstance(model, type) else model
    analysis = analyse(network, capture="concrete", resolutions=sizes)
    recounted = analysis._thawed_copy()  # counts every row's cost again, as before
    recounted.__dict__.pop("_concrete_columns", None)
    recounted.__dict__["_rows_convention"] = None
    assert analysis.totals_at(sizes) == recounted.totals_at(sizes)
    for quantity, values in analysis.evaluate(sizes).items():
        assert values.tolist() == recounted.evaluate(sizes)[quantity].tolist()
    # rows counted under another convention are counted again under it
    other = analysis.with_convention(preset("fvcore"))
    assert other.totals_at(sizes) == analyse(
        network, convention=preset("fvcore"), capture="concrete", resolutions=sizes
    ).totals_at(sizes)
    assert other.totals_at(sizes) != analysis.totals_at(sizes)


def fuse(side):
    """Return sizes an HRNet-like fuse layer compares: a branch down and up again vs the input."""
    down = sp.floor((side - 1) / 2) + 1
    return [
        (2 * down, side),
        (2 * sp.floor((2 * down - 1) / 2 + 1), 2 * down),
        (sp.floor((side + 2 - 3) / 2) + 1, sp.floor((side - 1) / 2) + 1),
        (sp.floor(side / 4) * 4 + 4, sp.floor(side / 4) * 4),
        (sp.ceiling(side / 3) * 3, side + 2),
        (side * 3, side * 3),
    ]


@pytest.mark.parametrize("a, b", fuse(H) + fuse(H * W) + [(H * W, W * H + 1), (H, W)])
def test_the_remembered_size_comparison_classifies_as_simplify_does(a, b):
    def kind(difference):
        return "zero" if difference == 0 else "number" if difference.is_number else "symbolic"

    assert kind(rules.simplified_difference(a, b)) == kind(sp.simplify(a - b))


class Fuse(nn.Module):
    """Two branches, one down and up again, added: the sizes must agree (an HRNet fuse)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        return x + self.up(self.down(x))


def build_fuse():
    """Return Fuse()."""
    return Fuse()


@pytest.mark.parametrize("exact", [False, True])
def test_a_fuse_keeps_its_size_requirement_as_the_plain_path_does(monkeypatch, exact):
    spec = resolve(f"{__name__}:build_fuse")
    fast = analyse(spec, exact=exact)
    plain = plain_analyse(monkeypatch, spec, exact=exact)
    assert rows(fast) == rows(plain) and fast.assumptions == plain.assumptions


class Unpacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        batch, channels, height, width = x.shape
        a, b = self.conv(x).chunk(2, dim=1)
        first, second = b.split(2, dim=1)
        return (a * (first + second).sum(1, keepdim=True)).reshape(batch, -1, height * width)


class IteratesATensor(nn.Module):
    def forward(self, x):
        return sum(row for row in x)


def graph_text(module):
    return [(n.op, str(n.target), str(n.args)) for n in module.graph.nodes]


def test_unpacking_a_proxy_traces_as_torch_fx_does(monkeypatch):
    """The proxy that reads each forward's bytecode once unpacks shapes and chunks into the
    graph torch.fx's own proxy gives, and refuses iteration as it does."""
    fast = tracing.trace(Unpacks())
    with monkeypatch.context() as patch:
        patch.setattr(tracing._Tracer, "proxy", torch.fx.Tracer.proxy)
        plain = tracing.trace(Unpacks())
    assert graph_text(fast) == graph_text(plain)
    assert any(n.target == "chunk" for n in fast.graph.nodes)
    x = torch.randn(2, 4, 5, 6)
    network = Unpacks()
    assert torch.equal(tracing._graph_module(network, fast.graph)(x), network(x))
    with pytest.raises(ValueError, match="cannot trace IteratesATensor with torch.fx"):
        tracing.trace(IteratesATensor())


@pytest.mark.parametrize("settings", [
    {"act_layer": nn.SiLU}, {"act_layer": nn.ReLU, "drop_layer": nn.Dropout},
    {"apply_act": False}, {"affine": False}, {"track_running_stats": False},
], ids=["silu", "relu-dropout", "no-act", "not-affine", "no-running-stats"])
def test_timm_batch_norm_act_records_the_graph_torch_fx_records(settings):
    """The BatchNormAct2d shortcut writes the nodes torch.fx writes for its forward, less the
    input-rank assert's four (which count nothing); the analysis equals fvcore."""
    norm_act = pytest.importorskip("timm.layers.norm_act")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = norm_act.BatchNormAct2d(8, **settings)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3)))

    network = Block().eval()

    def nodes(graph_module):
        return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph_module.graph.nodes
                if not (n.op == "call_function" and n.target in (getattr, torch._assert))
                and not (n.op == "call_function" and "eq" in n.name)]

    ours = tracing.trace(network)
    assert nodes(ours) == nodes(torch.fx.symbolic_trace(network))
    assert not any(n.target is torch._assert for n in ours.graph.nodes)
    from convtally.analysis.conventions import preset

    from tests.analysis.test_capture import fvcore_total

    analysis = analyse(network, convention=preset("fvcore"))
    for size in [(16, 16), (20, 12)]:
        assert analysis.totals_at([size])["connections"][0] == fvcore_total(network, size)


class FlattenHead(Fuse):
    """A size agreement (the Linear after a flatten holds at 16x16 only) after a fuse whose
    own agreement holds at even sizes, and a branch on the width."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        x = super().forward(x)
        if x.shape[-1] > 4:
            x = nn.functional.max_pool2d(x, 2)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("model", [Fuse, FlattenHead])
def test_runnable_answers_each_size_as_evaluating_it_alone_does(model, exact):
    """All sizes at once (the assumptions' 'it holds at' list) give the answer a one-size
    evaluate gives each of them, refusals of every kind included (too small, a size
    agreement, the branch, divisibility)."""
    network = model().eval()
    analysis = analyse(network, exact=exact, resolutions=[(32, 32)])
    sides = list(range(1, 70))
    assert analysis.runnable([(side, side) for side in sides]) == [
        accounting._runs_at(analysis, side) for side in sides]
    assert any(analysis.runnable([(side, side) for side in sides]))


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:swin_t",
                                   "timm:efficientnet_b0", "timm:pvt_v2_b0"])
def test_arguments_are_written_into_the_graph_as_torch_fx_writes_them(monkeypatch, model):
    """Numbers, proxies, tuples and lists go into nodes without torch.fx's per-argument type
    questions; the graph's code is the one torch.fx's own create_arg gives."""
    pytest.importorskip("timm")
    network = resolve(model).build({}).eval()
    fast = tracing.trace(network).code

    def torch_fx_create_arg(self, a):
        if isinstance(a, torch.Tensor):  # the buffer lookup, which has its own test
            parameters, buffers = self._names()
            name = (parameters if isinstance(a, nn.Parameter) else buffers).get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return torch.fx.Tracer.create_arg(self, a)

    monkeypatch.setattr(tracing._Tracer, "create_arg", torch_fx_create_arg)
    assert fast == tracing.trace(network).code


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:swin_t",
                                   "timm:efficientnet_b0", "timm:test_vit_relpos"])
def test_nodes_are_made_with_the_arguments_and_users_torch_fx_gives_them(monkeypatch, model):
    """A node is made without arguments and given them after (torch.fx's pytree walk of every
    argument, looking for SymInts, skipped), named from a name worked out once per target, its
    module stack recorded without torch.fx's checks for preserved metadata: the code, each
    node's name, inputs, users and module stack are those of torch.fx's own create_node."""
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    network = resolve(model).build({}).eval()

    def structure(graph_module):
        return graph_module.code, [
            (node.name, [n.name for n in node.all_input_nodes], [n.name for n in node.users],
             dict(node.meta.get("nn_module_stack") or {}))
            for node in graph_module.graph.nodes]

    fast = structure(tracing.trace(network))
    monkeypatch.setattr(tracing._Tracer, "create_node", torch.fx.Tracer.create_node)
    assert fast == structure(tracing.trace(network))


class ReadsAShapeThenReshapesInPlace(nn.Module):
    """Reads a size, then unsqueezes in place and branches on both: the size read first is
    the size from before the unsqueeze, whenever the branch on it asks for it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        channels = y.shape[1]
        y.unsqueeze_(0)
        if y.dim() == 5:
            y = y * 2
        if channels == 8:
            return y + 1
        return y - 1


def meta_build_and_probe(model: str) -> tuple[nn.Module, torch.Tensor]:
    """Return (the model built on the meta device, a meta input at its own size)."""
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    if model == "reads-then-reshapes":
        network = ReadsAShapeThenReshapesInPlace().to("meta").eval()
    else:
        spec = resolve(model)
        network = spec.build_meta(spec.settings({})).eval()
    side = own_side(model)
    return network, torch.zeros(1, 3, side, side, device="meta")


def own_side(model: str) -> int:
    return 240 if "crossvit" in model else 224


def eager_branching_trace(monkeypatch, network, probe, concrete=False):
    """Return tracing.trace's branching graph with every recorded call run as it is recorded
    (the tracer before it ran them only when a branch, len() or int() asked)."""
    recorded = tracing._BranchingTracer.create_proxy

    def create_proxy(self, kind, *args, **kwargs):
        proxy = recorded(self, kind, *args, **kwargs)
        if kind != "placeholder":
            try:
                self._known(proxy.node)
            except LookupError:
                pass
        return proxy

    with monkeypatch.context() as patch:
        patch.setattr(tracing._BranchingTracer, "create_proxy", create_proxy)
        return tracing.trace(network, probe, branching=True, concrete=concrete)


@pytest.mark.parametrize("model", ["reads-then-reshapes", "timm:efficientvit_b0",
                                   "timm:tiny_vit_5m_224", "timm:crossvit_9_240"])
@pytest.mark.parametrize("concrete", [False, True])
def test_a_branching_trace_runs_calls_only_when_a_branch_needs_them(monkeypatch, model,
                                                                    concrete):
    """The branches, sizes read and graph are those of running every call as it is recorded;
    the calls after the last branch are not run."""
    network, probe = meta_build_and_probe(model)
    ran = []
    run = tracing._BranchingTracer._run_recorded
    monkeypatch.setattr(tracing._BranchingTracer, "_run_recorded",
                        lambda self, node, *args: ran.append(node.name) or run(self, node, *args))
    lazy = tracing.trace(network, probe, branching=True, concrete=concrete)
    ran_lazily = set(ran)
    eager = eager_branching_trace(monkeypatch, network, probe, concrete)
    assert lazy.code == eager.code
    assert lazy.meta.get("branches") == eager.meta.get("branches")
    if not concrete:
        assert lazy.meta["branches"], "the model branches on sizes"
        last = max(i for i, n in enumerate(lazy.graph.nodes)
                   if n.name in dict(lazy.meta["branches"]))
        after = [n.name for n in list(lazy.graph.nodes)[last + 1:] if n.op.startswith("call")]
        assert after and not set(after) & ran_lazily


def test_a_size_read_before_an_in_place_reshape_is_the_size_before_it():
    network = ReadsAShapeThenReshapesInPlace().to("meta").eval()
    graph = tracing.trace(network, torch.zeros(1, 3, 16, 16, device="meta"))
    assert [taken for _, taken in graph.meta["branches"]] == [True, True]
    assert any(n.target is operator.add for n in graph.graph.nodes)


class BranchesThenIterates(nn.Module):
    """Branches on a size, then iterates a traced tensor, which no trace can record."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[2] > 8:
            y = y * 2
        return sum(row for row in y)


@pytest.mark.parametrize("model", ["reads-then-reshapes", "timm:efficientvit_b0",
                                   "timm:crossvit_9_240", "torchvision:resnet18"])
def test_a_forward_is_traced_once_plain_until_it_branches(monkeypatch, model):
    """One trace where a plain trace that failed at the first branch and a branching trace from
    the start were two: the same graph and branches as the branching trace, and for a forward
    that never branches, the plain trace's graph without branch records."""
    network, probe = meta_build_and_probe(model)
    traces = []
    original = torch.fx.Tracer.trace
    monkeypatch.setattr(torch.fx.Tracer, "trace",
                        lambda self, *args, **kwargs: traces.append(type(self).__name__)
                        or original(self, *args, **kwargs))
    once = tracing.trace(network, probe)
    assert len(traces) == 1
    if model == "torchvision:resnet18":
        assert "branches" not in once.meta and once.code == tracing.trace(network).code
        return
    branching = tracing.trace(network, probe, branching=True)
    assert once.code == branching.code and once.meta["branches"] == branching.meta["branches"]


def test_a_forward_that_fails_after_its_first_branch_is_refused_as_the_plain_trace_refuses():
    """The refusal is the plain trace's (the branch), not the later failure."""
    network = BranchesThenIterates().to("meta").eval()
    with pytest.raises(ValueError) as plain:
        tracing.trace(network)
    with pytest.raises(ValueError) as with_probe:
        tracing.trace(network, torch.zeros(1, 3, 16, 16, device="meta"))
    assert str(with_probe.value) == str(plain.value)
    assert "cannot be used as inputs to control flow" in str(plain.value)



@pytest.mark.parametrize("model", ["timm:efficientvit_b0", "timm:crossvit_9_240"])
def test_a_callers_module_that_branches_is_traced_once_with_its_branches_decided_on_a_meta_copy(
        monkeypatch, model):
    """The caller's network itself is traced, its branches decided on its meta copy (where a
    plain trace of it that stopped at the first branch, then the copy's branching trace, were
    two): the rows are the meta build's, and the graph runs on the caller's weights."""
    pytest.importorskip("timm")
    side = own_side(model)
    by_name = analyse(model, resolutions=[(side, side)])
    network = resolve(model).build({}).eval()
    traced = []
    original = torch.fx.Tracer.trace
    monkeypatch.setattr(torch.fx.Tracer, "trace", lambda self, root, *args, **kwargs:
                        traced.append(root) or original(self, root, *args, **kwargs))
    given = analyse(network, resolutions=[(side, side)])
    assert traced == [network]
    assert given.capture == by_name.capture and rows(given) == rows(by_name)
    assert given.totals_at([(side, side)]) == by_name.totals_at([(side, side)])
    graph = given.graph_at((side, side))
    assert not any(p.is_meta for p in graph.parameters())
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert torch.allclose(graph(x), network(x))


@pytest.mark.parametrize("model", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_the_attribute_table_made_on_reading_is_every_modules_integers(model):
    """Each module's entry of the table is made when the rules first read it: the same
    integers, as sympy Integers, as the whole table made at once."""
    network = resolve(model).build({}).eval()
    table = hyperparameters.concrete_attributes(network)
    whole = {name: {key: tuple(map(sp.Integer, value)) if isinstance(value, tuple)
                    else sp.Integer(value) for key, value in attributes.items()}
             for name, attributes in hyperparameters.integer_attributes(network).items()}
    assert dict(table) == whole and len(table) == len(whole)
    assert table.get("no.such.module", {}) == {}


def test_a_changed_cost_is_the_cost_dataclasses_replace_makes():
    from dataclasses import fields, replace

    x = rules.SymTensor((accounting.BATCH, sp.Integer(3), H, W))
    cost = rules.LayerCost("conv", x, weights=sp.Integer(9), connections=9 * H * W, op="conv2d")
    changes = {"via": "module", "inputs": 3 * H * W, "weights": sp.Integer(0)}
    changed, replaced = accounting._changed(cost, **changes), replace(cost, **changes)
    assert changed == replaced and hash(changed) == hash(replaced)
    assert type(changed) is rules.LayerCost
    assert [getattr(changed, f.name) for f in fields(cost)] == [
        getattr(replaced, f.name) for f in fields(cost)]
    assert cost.via == "" and cost.weights == 9  # the original is unchanged


def test_a_tensors_values_per_example_are_kept_without_changing_its_equality():
    """per_example is computed once per tensor (a layer's output is asked again as the next
    layer's input); the kept value is no field: equal tensors stay equal, with equal hashes."""
    shape = (accounting.BATCH, sp.Integer(8), H / 2, W / 2)
    asked, fresh = rules.SymTensor(shape), rules.SymTensor(shape)
    assert "per_example" not in vars(asked)
    assert asked.per_example == 8 * H * W / 4
    assert vars(asked)["per_example"] is asked.per_example  # kept on the tensor once asked
    assert asked == fresh and hash(asked) == hash(fresh) and repr(asked) == repr(fresh)
    assert rules.SymTensor((sp.Integer(3), sp.Integer(4))).per_example == 12


@pytest.mark.parametrize("model", ["timm:efficientvit_b0", "timm:bat_resnext26ts"])
def test_remembered_branch_conditions_give_the_plain_paths_formulas_and_conditions(
        monkeypatch, model):
    """A branch's condition is built once per value (blocks repeated per stage branch alike, and
    the interpreter and the analysis both ask): the same rows and conditions as building it
    each time."""
    pytest.importorskip("timm")
    fast = analyse(model)
    with monkeypatch.context() as patch:
        patch.setattr(accounting, "_branch_relation", accounting._branch_relation.__wrapped__)
        plain = analyse(model)
    assert fast.shape_graph_module.meta["branches"], "the forward branches on sizes"
    assert fast.branches == plain.branches
    assert rows(fast) == rows(plain) and fast.assumptions == plain.assumptions


@pytest.mark.parametrize("model", ["unet", "torchvision:resnet18", "torchvision:vit_b_16",
                                   "timm:test_vit_relpos"])
def test_the_graph_module_holds_what_torch_fx_would_and_runs_the_same(model):
    """Its modules, parameters and buffers are put in place through nn.Module's tables: the
    same names and objects, in the same order, as torch.fx's GraphModule copies, and the same
    output on the same input."""
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    spec = resolve(model)
    network = spec.build().eval()
    traced = tracing.trace(network)
    ours = tracing._graph_module(network, traced.graph)
    theirs = torch.fx.GraphModule(network, traced.graph)
    for listing in ("named_modules", "named_parameters", "named_buffers"):
        mine, torch_fx = (dict(getattr(module, listing)()) for module in (ours, theirs))
        assert list(mine) == list(torch_fx)
        # the empty modules on the way (and the GraphModule itself) are each one's own
        assert all(mine[name] is torch_fx[name] for name in mine
                   if name and type(torch_fx[name]) is not nn.Module)
    assert ours.training is theirs.training is False
    x = torch.randn(1, spec.input_channel_count(spec.settings({})), 32, 32)
    if model == "torchvision:vit_b_16":
        x = torch.randn(1, 3, 224, 224)
    if model == "timm:test_vit_relpos":
        x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("model", ["torchvision:resnet18", "timm:efficientvit_b0"])
def test_nothing_an_analysis_remembers_keeps_the_network_alive(model):
    """The remembered tables (formulas, counts, a graph module's submodules) hold no network:
    one kept its graph module, and so the network and its weights, alive for good (a loop over
    86 models ran out of memory)."""
    import gc
    import weakref

    if model.startswith("timm:"):
        pytest.importorskip("timm")
    network = resolve(model).build().eval()
    alive = [weakref.ref(module) for module in network.modules()]  # its layers, weights in them
    analysis = analyse(network, resolutions=[(64, 64)])
    assert analysis.totals_at([(64, 64)])["connections"][0] > 0
    del network, analysis
    gc.collect()
    assert all(module() is None for module in alive)


class CallsALayerTwice(nn.Module):
    """One layer called twice, inside a module without a rule, and a layer without a rule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.unruled = nn.PixelUnshuffle(1)

    def forward(self, x):
        return self.unruled(self.inner[0](self.inner(x)))


@pytest.mark.parametrize("model", ["twice", "torchvision:resnet18", "timm:test_vit_relpos",
                                   "timm:efficientnet_b0"])
def test_a_layer_call_is_recorded_as_torch_fx_records_it(monkeypatch, model):
    """A call to a module with a rule is recorded without torch.fx's Scope objects: the graph,
    every node's module stack and the tracer's scope of each node are what torch.fx's own
    call_module gives."""
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    network = CallsALayerTwice() if model == "twice" else resolve(model).build({}).eval()

    def recorded():
        tracer = tracing._Tracer()
        graph = tracer.trace(network)
        return (torch.fx.GraphModule(network, graph).code, dict(tracer.node_name_to_scope),
                [(node.name, dict(node.meta.get("nn_module_stack") or {}))
                 for node in graph.nodes], tracer.module_stack, tracer.scope.module_path)

    fast = recorded()
    monkeypatch.setattr(tracing._Tracer, "_leaf_call", lambda self, m, path, args, kwargs:
                        torch.fx.Tracer.call_module(self, m, None, args, kwargs))
    assert fast == recorded()


class Holder(nn.Module):
    """A module whose forward leaves state behind: a new attribute, a replaced one, a cache
    dict filled and a buffer's table changed."""

    def __init__(self):
        super().__init__()
        self.cache = {"kept": torch.zeros(1)}
        self.scale = 2
        self.register_buffer("table", torch.arange(3))
        self.inner = nn.Linear(2, 2)


def test_the_state_a_forward_changes_is_put_back_as_it_was():
    """state_kept puts back every module's attributes and their dicts' contents, by identity:
    added attributes go, replaced ones and removed ones come back, a dict's entries are what
    they were (its own object), in their order."""
    model = nn.Sequential(Holder(), Holder())
    model.add_module("shared", model[0])  # a module under two names: kept once
    before = [(module, dict(vars(module)), {name: list(value.items())
                                            for name, value in vars(module).items()
                                            if type(value) is dict})
              for module in model.modules()]
    with tracing.state_kept(model):
        first, second = model[0], model[1]
        first.cache["new"] = torch.ones(1)
        first.cache.pop("kept")
        first.scale = 3
        first.added = "x"
        second.cache = {}
        del second.scale
        second._buffers["table"] = torch.arange(4)
        second._modules["inner"], second._modules["other"] = None, nn.ReLU()
    for module, attributes, dicts in before:
        assert vars(module).keys() == attributes.keys()
        assert all(vars(module)[name] is value for name, value in attributes.items())
        for name, items in dicts.items():
            now = list(vars(module)[name].items())
            assert [key for key, _ in now] == [key for key, _ in items]
            assert all(a is b for (_, a), (_, b) in zip(now, items, strict=True))


class TiedWeights(nn.Module):
    """A weight shared by two layers, a layer under two names and a buffer in each."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 4)
        self.decode.weight = self.encode.weight
        self.again = self.encode
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, x):
        return self.norm(self.decode(self.again(x))) + self.offset


@pytest.mark.parametrize("model", ["tied", "torchvision:resnet18", "timm:test_vit_relpos"])
def test_the_tracers_parameter_and_buffer_names_are_named_parameters_and_named_buffers(model):
    """The tracer names a parameter or buffer it meets as named_parameters() and
    named_buffers() name it (each tensor once, by its first name), from one pass over the
    module names torch.fx's trace made."""
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    network = TiedWeights() if model == "tied" else resolve(model).build({}).eval()
    tracer = tracing._Tracer()
    tracer.trace(network)
    parameters, buffers = tracer._names()
    assert parameters == {id(p): name for name, p in network.named_parameters()}
    assert buffers == {id(b): name for name, b in network.named_buffers()}
