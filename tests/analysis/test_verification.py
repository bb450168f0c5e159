"""`convtally verify`: passes on the real networks, catches a broken rule, loads checkpoints."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from convtally.analysis import memory, rules
from convtally.analysis.accounting import analyse
from convtally.analysis.cli import main
from convtally.analysis.rules import LayerCost
from convtally.analysis.verification import CheckpointError, load_checkpoint, verify
from convtally.models.registry import REGISTRY
from torch import nn


@pytest.mark.parametrize(
    "settings",
    [{}, {"K": 5, "NF": 8, "NC": 6, "NIC": 1}, {"K": 4, "NF": 4, "NC": 3, "NIC": 2}],
    ids=["defaults", "K5", "K4"],
)
@pytest.mark.parametrize("name", ["poolupsample", "convtranspose", "unet"])
def test_seed_networks_verify(name, settings):
    if settings.get("K") == 4 and name == "unet":
        # the write-up's kernel//2 padding grows H by 1 for even kernels: the network cannot run
        with pytest.raises(ValueError, match=r"cat \(cat\) cannot run at any input size"):
            verify(name, [(32, 32)], settings)
        return
    result = verify(name, [(32, 32), (64, 48)], settings)
    assert result.mismatches == []
    assert {c.layer for c in result.checks} >= {"block0.0", "block4.0"}
    conv = next(c for c in result.checks if c.layer == "block0.0")
    assert conv.connections_formula == conv.fvcore
    assert conv.torch_flops == 2 * conv.fvcore
    assert all(c.saved_formula == c.saved_measured is not None for c in result.checks)
    assert conv.saved_measured == 2 * settings.get("NIC", 3) * 32 * 32 * 4  # B=2 float32 input


@pytest.mark.parametrize(
    "name,resolution",
    [
        ("torchvision:resnet18", (64, 64)),
        ("torchvision:mobilenet_v3_large", (96, 96)),
        ("torchvision:deeplabv3_resnet50", (64, 64)),
    ],
)
def test_torchvision_models_verify(name, resolution):
    result = verify(name, [resolution])
    assert result.mismatches == []
    assert len(result.checks) > 60


def test_convention_differences_are_shown_not_flagged():
    result = verify("poolupsample", [(32, 32)])
    batch_norm = next(c for c in result.checks if c.layer == "block0.2")
    assert batch_norm.fvcore == 2 * batch_norm.connections_formula
    assert batch_norm.verdict == "ok (convention differs)"


def test_broken_rule_is_caught(monkeypatch, capsys):
    original = rules.MODULE_RULES[nn.Conv2d]

    def off_by_one(module, attrs, x):
        cost = original(module, attrs, x)
        return LayerCost(
            cost.kind, cost.output, cost.weights, cost.connections + 1, cost.bias_connections
        )

    monkeypatch.setitem(rules.MODULE_RULES, nn.Conv2d, off_by_one)
    assert main(["verify", "poolupsample", "--res", "32", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "block0.0" in out and "MISMATCH: connections 884737 != fvcore 884736" in out
    assert "5 mismatch(es)" in out


@pytest.mark.parametrize(("key", "layers"), [
    # block0.0 alone: every other conv's input is a ReLU's output, which the ReLU keeps first
    ("conv", 1),
    ("max_pool2d", 2),  # block0.1 and block1.1: their input and int64 indices
])
def test_broken_memory_rule_is_caught(monkeypatch, capsys, key, layers):
    """A rule that forgets what autograd saves is a mismatch, with verify's exit code 1."""
    monkeypatch.setitem(memory.SAVED_RULES, key, memory.nothing("wrong on purpose"))
    assert main(["verify", "poolupsample", "--res", "32", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH: saved 0 bytes != autograd" in out
    assert f"{layers} mismatch(es)" in out


def test_broken_weights_rule_is_caught(monkeypatch):
    original = rules.MODULE_RULES[nn.BatchNorm2d]

    def no_weights(module, attrs, x):
        cost = original(module, attrs, x)
        return LayerCost(cost.kind, cost.output, cost.weights * 0, cost.connections)

    monkeypatch.setitem(rules.MODULE_RULES, nn.BatchNorm2d, no_weights)
    result = verify("unet", [(32, 32)])
    assert {c.layer for c in result.mismatches} == {"block0.2", "block1.2", "block2.2", "block3.2"}


def test_checkpoint_round_trip(tmp_path, capsys):
    network = REGISTRY["unet"].build({"NF": 8})
    for parameter in network.parameters():
        torch.nn.init.normal_(parameter)
    path = tmp_path / "unet.pt"
    torch.save(network.state_dict(), path)
    fresh = REGISTRY["unet"].build({"NF": 8})
    load_checkpoint(fresh, path)
    for key, value in network.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert (
        main(
            [
                "verify",
                "unet",
                "--set",
                "NF=8",
                "--checkpoint",
                str(path),
                "--res",
                "32",
                "--format",
                "json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert '"mismatches": 0' in capsys.readouterr().out


def test_verify_leaves_the_callers_analysis_and_warning_filters_alone(tmp_path):
    trained = REGISTRY["unet"].build({"NF": 8})
    for parameter in trained.parameters():
        torch.nn.init.normal_(parameter)
    path = tmp_path / "unet.pt"
    torch.save(trained.state_dict(), path)
    analysis = analyse("unet", {"NF": 8})
    before = {k: v.clone() for k, v in analysis.network.state_dict().items()}
    network, graph_module = analysis.network, analysis.graph_module
    filters = list(warnings.filters)
    result = verify(analysis, [(32, 32)], checkpoint=path)
    assert result.checkpoint == str(path) and not result.mismatches
    assert analysis.network is network and analysis.graph_module is graph_module
    after = analysis.network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not all(torch.equal(trained.state_dict()[k], v) for k, v in before.items())
    assert warnings.filters == filters


def test_checkpoints_load_onto_the_cpu_without_code_execution(tmp_path, monkeypatch):
    """GPU-saved checkpoints load on a CPU-only machine because of map_location='cpu'."""
    path = tmp_path / "net.pt"
    torch.save(REGISTRY["poolupsample"].build().state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint(REGISTRY["poolupsample"].build(), path)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b"not a checkpoint"), "truncated or not a torch file"),
        (lambda p: p.write_bytes(_truncated()), "truncated or not a torch file"),
        (lambda p: torch.save([1, 2, 3], p), "is not a state_dict"),
        (
            lambda p: torch.save(REGISTRY["poolupsample"].build().state_dict(), p),
            "shape mismatch at block3.0.weight",
        ),
        (lambda p: torch.save({"block0.0.weight": torch.zeros(1)}, p), "missing keys"),
    ],
)
def test_bad_checkpoints_exit_2(tmp_path, capsys, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(REGISTRY["unet"].build(), path)
    assert main(["verify", "unet", "--checkpoint", str(path), "--res", "32"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def _truncated() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(REGISTRY["unet"].build().state_dict(), buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    assert main(["verify", "unet", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_module_called_twice_is_checked_against_the_sum_of_its_calls():
    result = verify(analyse(Shared()), [(32, 32)])
    assert result.mismatches == []
    first, second = [c for c in result.checks if c.type == "Conv2d"]
    assert first.fvcore == second.fvcore == 2 * first.connections_formula
    assert "called 2 times" in first.note


def test_broken_rule_in_a_shared_module_is_still_caught(monkeypatch):
    original = rules.MODULE_RULES[nn.Conv2d]

    def doubled(module, attrs, x):
        cost = original(module, attrs, x)
        return replace(cost, connections=cost.connections * 2)

    monkeypatch.setitem(rules.MODULE_RULES, nn.Conv2d, doubled)
    assert len(verify(analyse(Shared()), [(32, 32)]).mismatches) == 2
