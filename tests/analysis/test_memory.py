"""Memory formulas against PyTorch: what autograd saves, what the optimizer keeps, the peaks.

The witness for saved activations is `torch.autograd.graph.saved_tensors_hooks` around a
training-mode forward pass (each storage once, parameters and buffers left out), run node by
node on the traced network so every layer's bytes are checked, and run on the plain network for
the total. Gradients and optimizer state are read off the tensors after a real step; peaks come
from the profiler's memory events on the CPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from convtally.analysis.accounting import analyse
from convtally.analysis.cli import main
from convtally.analysis.memory import (
    largest_batch,
    largest_square,
    make_optimizer,
    measure_forward_peak,
    measure_saved,
    measure_training_peak,
    memory_model,
    memory_table,
    peak_formula,
)
from torch import nn


def channels(analysis) -> int:
    return int(analysis.input_channels.subs(analysis.substitutions()))


def assert_saved_matches_autograd(analysis, points, dtype="float32", network=None):
    """Every layer's saved bytes equal what autograd keeps at each (B, H, W), and the total
    equals what the untraced network keeps."""
    network = analysis.network if network is None else network
    model = memory_model(analysis, dtype)
    result = model.evaluate(points)
    for j, (batch, height, width) in enumerate(points):
        x = torch.randn(batch, channels(analysis), height, width, dtype=network_dtype(network))
        total, per_node = measure_saved(network, x, per_node=True)
        plain_total, _ = measure_saved(network, x)
        ours = {layer.node: int(result["layers"]["saved"][i, j])
                for i, layer in enumerate(analysis.layers) if layer.node}
        differing = {
            node: (ours.get(node, 0), per_node.get(node, 0))
            for node in set(ours) | set(per_node) if ours.get(node, 0) != per_node.get(node, 0)
        }
        assert not differing, (batch, height, width, differing)
        assert sum(ours.values()) == total == plain_total


def network_dtype(network) -> torch.dtype:
    return next(network.parameters()).dtype


@pytest.mark.parametrize(("name", "settings"), [
    ("poolupsample", {}),
    ("convtranspose", {}),
    ("unet", {}),
    # an even kernel with padding='same': PyTorch pads the input by one and saves that copy
    ("convtranspose", {"K": 4, "NF": 4, "NC": 3, "NIC": 2}),
])
def test_seed_networks_save_what_autograd_saves(name, settings):
    analysis = analyse(name, settings)
    assert_saved_matches_autograd(analysis, [(2, 32, 32), (3, 64, 64)])


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2", "shufflenet_v2_x0_5",
                                  "efficientnet_b0"])
def test_torchvision_families_save_what_autograd_saves(name):
    """In-place ReLU/ReLU6/SiLU (a ReLU6 or SiLU in place saves a copy of its input), residual
    adds, squeeze-excitation products, stochastic depth, dropout, channel shuffle and chunk
    views (a conv on a chunk keeps the whole storage). (DenseNet-121's concatenations are
    checked the same way by benchmarks/memory.py, which this suite leaves out for time.)"""
    analysis = analyse(f"torchvision:{name}")
    assert_saved_matches_autograd(analysis, [(2, 64, 64)])


def test_bfloat16_bytes_match_autograd():
    """Activations, BatchNorm statistics in the activation dtype; max-pool indices stay int64."""
    analysis = analyse("poolupsample")
    network = copy.deepcopy(analysis.network).to(torch.bfloat16)
    model = memory_model(analysis, "bfloat16")
    (value,) = model.values(model.total("saved"), [(2, 32, 32)])
    total, _ = measure_saved(network, torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert value == total


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_parameters_gradients_and_optimizer_state_match_a_real_step(optimizer):
    """A frozen first block: no gradients and no optimizer state for it, only parameters."""
    analysis = analyse("poolupsample")
    network = analysis.network
    for parameter in network.block0.parameters():
        parameter.requires_grad_(False)
    try:
        model = memory_model(analysis, "float32", optimizer)
        runner = copy.deepcopy(network).train()
        optim = make_optimizer([p for p in runner.parameters() if p.requires_grad], optimizer)
        runner(torch.randn(2, 3, 32, 32)).mean().backward()
        gradients = sum(p.grad.nbytes for p in runner.parameters() if p.grad is not None)
        optim.step()
        state = sum(t.nbytes for s in optim.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor))
        parameters = sum(p.nbytes for p in runner.parameters())
        buffers = sum(b.nbytes for b in runner.buffers())
        values = {part: model.values(model.total(part), [(2, 32, 32)])[0]
                  for part in ("parameters", "buffers", "gradients", "optimizer")}
        assert values == {"parameters": parameters, "buffers": buffers,
                          "gradients": gradients, "optimizer": state}
        assert 0 < gradients < parameters
    finally:
        for parameter in network.parameters():
            parameter.requires_grad_(True)


class LayerScales(nn.Module):
    """Parameters used directly in forward, on either side of a product (timm's layer scale)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.beta = nn.Parameter(torch.full((8, 1, 1), 2.0))

    def forward(self, x):
        x = torch.relu(self.conv(x) * self.gamma)  # keeps the conv output for gamma's gradient
        return self.beta * (x + 1)  # keeps x + 1 for beta's gradient


@pytest.mark.parametrize("frozen", [False, True])
def test_layer_scale_keeps_the_activation_for_its_parameter(frozen):
    network = LayerScales()
    network.gamma.requires_grad_(not frozen)
    network.beta.requires_grad_(not frozen)
    analysis = analyse(network)
    assert_saved_matches_autograd(analysis, [(2, 32, 32), (3, 16, 24)], network=network)


def test_frozen_network_saves_only_where_gradients_flow():
    """A fine-tune that trains only the last conv keeps only that conv's input."""
    analysis = analyse("convtranspose")
    network = analysis.network
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    for parameter in network.block4.parameters():
        parameter.requires_grad_(True)
    try:
        assert_saved_matches_autograd(analysis, [(2, 32, 32)])
        model = memory_model(analysis)
        saving = [layer.name for layer in model.layers if layer.saved != 0]
        assert saving == ["block4.0"]
    finally:
        for parameter in network.parameters():
            parameter.requires_grad_(True)


@pytest.mark.parametrize(("name", "batch", "side"), [
    ("poolupsample", 8, 32),
    ("torchvision:resnet18", 4, 64),
    ("torchvision:mobilenet_v2", 4, 96),  # depthwise convolutions, padded channel blocks
])
def test_inference_peak_against_the_profiler(name, batch, side):
    """oneDNN's blocked copies (input, weight, output; channels padded to 16) and what a
    module's caller holds while it runs: the peak to within a few hundred bytes."""
    analysis = analyse(name)
    result = memory_model(analysis).evaluate([(batch, side, side)])
    measured = measure_forward_peak(analysis.network, (batch, channels(analysis), side, side))
    assert abs(measured - result["inference_peak"][0]) <= 1024, (measured, result)


@pytest.mark.parametrize(("batch", "side"), [(8, 32), (4, 64)])
def test_unet_inference_gap_is_the_local_variable(batch, side):
    """UNet.forward keeps block0's output in the local x_1 until it returns; the graph frees it
    after the concatenation. That tensor is the whole gap (and a conv bias's blocked copy)."""
    analysis = analyse("unet")
    result = memory_model(analysis).evaluate([(batch, side, side)])
    measured = measure_forward_peak(analysis.network, (batch, 3, side, side))
    x_1 = batch * 32 * (side // 2) ** 2 * 4
    assert 0 <= measured - result["inference_peak"][0] - x_1 <= 1024


@pytest.mark.parametrize(("name", "batch", "side"), [
    ("poolupsample", 8, 32),
    ("unet", 3, 128),
    ("torchvision:resnet18", 4, 64),
    ("torchvision:mobilenet_v2", 4, 96),
])
def test_training_peak_against_the_profiler(name, batch, side):
    """Backward liveness: what the layers not yet run keep, the gradients made so far and the
    running layer's gradients (oneDNN's blocked copies padded to 16 channels) are alive at once;
    measured within 2 % (issue 14's goal: 10 %)."""
    analysis = analyse(name)
    model = memory_model(analysis)
    ours = model.evaluate([(batch, side, side)])["training_peak"][0]
    measured = measure_training_peak(analysis.network, (batch, channels(analysis), side, side))
    assert 0.98 <= measured / ours <= 1.02, (measured, ours)


@pytest.mark.parametrize(("name", "side"), [("unet", 256), ("torchvision:resnet18", 224)])
def test_largest_batch_runs_and_the_next_does_not_fit(name, side):
    """The --budget answer, run: one training step at that batch fits 256 MiB (measured with
    the profiler on the CPU), one at the next batch size up does not."""
    analysis = analyse(name)
    budget = 256 * 2**20
    batch = largest_batch(memory_model(analysis), budget, side, side)
    shape = (channels(analysis), side, side)
    fits = measure_training_peak(analysis.network, (batch, *shape))
    over = measure_training_peak(analysis.network, (batch + 1, *shape))
    assert fits <= budget < over, (batch, fits, over)


def test_largest_batch_is_the_last_that_fits_the_formula():
    model = memory_model(analyse("unet"))
    budget = 64 * 2**20
    batch = largest_batch(model, budget, 64, 64)
    peak = peak_formula(model, "training")
    fits, over = peak([(batch, 64, 64), (batch + 1, 64, 64)])
    assert fits <= budget < over
    side = largest_square(model, budget, 8)
    assert side % 4 == 0
    fits, over = peak([(8, side, side), (8, side + 4, side + 4)])
    assert fits <= budget < over


def test_memory_command_json_and_budget(tmp_path):
    path = tmp_path / "memory.json"
    code = main(["memory", "poolupsample", "--res", "32", "--batch", "1", "4",
                 "--budget", "64MiB", "--optimizer", "adam", "-o", str(path)])
    assert code == 0
    data = json.loads(path.read_text())
    assert data["points"] == ["B=1 @32", "B=4 @32"]
    assert data["budget"]["largest_batch"]["32"] > 4
    tensors = sum(1 for _ in analyse("poolupsample").network.parameters())
    assert data["totals"]["optimizer"]["values"]["B=1 @32"] == 2 * data["totals"][
        "gradients"]["values"]["B=1 @32"] + 4 * tensors  # Adam's float32 step per tensor
    from_python = memory_table("poolupsample", [(32, 32)], [1, 4], optimizer="adam")
    assert from_python["totals"]["saved"] == data["totals"]["saved"]


@pytest.mark.parametrize("arguments", [
    ["--batch", "0"],
    ["--budget", "12XB"],
    ["--res", "30"],
    ["--set", "NF=0"],
])
def test_memory_command_refuses_bad_input_in_one_line(arguments, capsys):
    assert main(["memory", "poolupsample", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("convtally memory: error:") and error.count("\n") == 1


class SharedActivation(nn.Module):
    """One ReLU module called twice (as a torchvision Bottleneck calls its relu three times):
    each call holds its argument only while that call runs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv3 = nn.Conv2d(64, 16, 1)

    def forward(self, x):
        return self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))


def test_a_module_called_twice_holds_its_argument_per_call():
    analysis = analyse(SharedActivation())
    result = memory_model(analysis).evaluate([(4, 32, 32)])
    measured = measure_forward_peak(analysis.network, (4, 16, 32, 32))
    assert abs(measured - result["inference_peak"][0]) <= 1024, (measured, result)


class Attention(nn.Module):
    """A conv stem, then attention over its H*W tokens: timm's form (q, k, v one permuted
    qkv storage, the output transposed back and reshaped for the projection) or heads split
    off contiguous tensors, 4-d or 3-d."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # (B, N, C)
        b, n, c = x.shape
        if self.form == "timm":
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            if self.form == "heads":
                q, k, v = (t.reshape(b, n, 2, c // 2).permute(0, 2, 1, 3).contiguous()
                           for t in (q, k, v))
            else:  # 3-d, the heads folded into the batch
                q, k, v = (t.contiguous() for t in (q, k, v))
            x = F.scaled_dot_product_attention(q, k, v)
            x = x.transpose(1, 2).reshape(b, n, c) if self.form == "heads" else x
        return self.proj(x).mean(1)


@pytest.mark.parametrize("form", ["timm", "heads", "3-d"])
def test_attention_keeps_what_the_fused_cpu_kernel_keeps(form):
    """q, k, v, the output and a logsumexp per query row; timm's transposed-back output is a
    view of the output attention keeps, so the projection keeps nothing new."""
    torch.manual_seed(0)
    analysis = analyse(Attention(form).train())
    assert_saved_matches_autograd(analysis, [(2, 16, 16), (3, 12, 20)])


def test_an_index_read_through_views_of_a_buffer_is_the_buffers_memory():
    """A trace that reads buffers as nodes (fx at one size) indexes through index.view(-1) or
    index.long(): the buffer's storage, nothing new; an index computed from the input is new."""
    from convtally.analysis.memory import _read_from_a_buffer

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    index = graph.get_attr("index")
    viewed = graph.call_method("long", (graph.call_method("view", (index, -1)),))
    computed = graph.call_method("view", (graph.call_function(torch.argmax, (x,)), -1))
    assert _read_from_a_buffer(index) and _read_from_a_buffer(viewed)
    assert not _read_from_a_buffer(computed) and not _read_from_a_buffer(x)
