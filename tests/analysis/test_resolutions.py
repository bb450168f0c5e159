"""Every resolution a user asks for is answered: exact formulas where the simple ones' divisibility
breaks, the nearest runnable sizes where the network cannot run, no false roots."""

from __future__ import annotations

import textwrap

import pytest
import torch
from convtally.analysis.accounting import analyse, answer_every_resolution
from convtally.analysis.cli import main
from convtally.analysis.crosscheck import crosscheck
from convtally.analysis.verification import verify


def one_line(message: str) -> bool:
    return len(message.strip().splitlines()) == 1


def test_a_size_off_the_divisibility_uses_the_exact_formulas(capsys):
    assert main(["table", "poolupsample", "--res", "30", "--format", "json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert any("because 30x30 breaks the divisibility" in a for a in data["assumptions"])
    network = analyse("poolupsample").network
    with torch.no_grad():
        hooks = {}
        for name, module in network.named_modules():
            if name:
                module.register_forward_hook(
                    lambda m, i, o, name=name: hooks.__setitem__(name, o[0].numel()))
        network(torch.zeros(1, 3, 30, 30))
    outputs = {layer["name"]: layer["outputs"]["values"]["30"] for layer in data["layers"]}
    assert outputs == {name: hooks[name] for name in outputs}


def test_the_simple_formulas_stay_where_they_hold():
    simple = analyse("poolupsample")
    kept = answer_every_resolution(simple, [(32, 32), (64, 64)], lambda: pytest.fail("no"))
    assert kept is simple


def test_a_size_the_network_cannot_run_at_names_the_nearest_that_it_can(capsys):
    for flags in ([], ["--exact"]):
        assert main(["table", "unet", "--res", "30", *flags]) == 2
        error = capsys.readouterr().err
        assert one_line(error)
        assert "unet cannot run at 30x30: cat (cat) cannot run at 30x30" in error
        assert error.strip().endswith("the nearest sizes it runs at: 28x28, 32x32")
        assert "--exact" not in error  # not a remedy that works


LENET = textwrap.dedent("""
    from torch import nn
    def build():
        layers = [nn.Conv2d(1, 30, 5)] + [nn.Conv2d(30, 30, 5) for _ in range(6)]
        return nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(120, 10))
""")


def test_a_size_equation_lists_only_sizes_the_network_runs_at(tmp_path, monkeypatch, capsys):
    # 15*H*W/2 - 210*H - 210*W + 5880 = 120 has the roots 24 and 32; at 24x24 the seventh
    # convolution has nothing left to convolve, so only 32x32 is a size it holds at
    (tmp_path / "deepconv.py").write_text(LENET)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["table", "deepconv:build", "--res", "32"]) == 0
    out = capsys.readouterr().out
    assert "= 120; it holds at 32x32\n" in out or "= 120; it holds at 32x32;" in out
    assert "24x24" not in out
    assert main(["table", "deepconv:build", "--res", "24"]) == 2
    assert capsys.readouterr().err.strip().endswith("the nearest sizes it runs at: 32x32")


def test_inception_v3_at_its_native_299_verifies():
    result = verify("torchvision:inception_v3", [(299, 299)])
    assert result.mismatches == []


def test_lraspp_at_520_equals_fvcore():
    pytest.importorskip("fvcore")
    result = crosscheck("torchvision:lraspp_mobilenet_v3_large", [(520, 520)], tools=["fvcore"])
    assert result.mismatches == []


class PartitionsWindows(torch.nn.Module):
    """timm GCViT's (and Swin's) windows: a view into 7x7 windows, and back with the batch left
    to -1, which with floors kept (--exact) is B * 49 * floor(H/7) * floor(W/7) / (H * W)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        windows = x.view(b, h // 7, 7, w // 7, 7, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 7, 7, c)
        back = windows.view(-1, h // 7, w // 7, 7, 7, c).permute(0, 1, 3, 2, 4, 5).reshape(
            -1, h, w, c)
        return (x + back).mean((1, 2))


@pytest.mark.parametrize("exact", [False, True])
def test_a_window_partition_runs_exactly_where_7_divides_both_sides(exact):
    """Exact, its view was checked nowhere (every size 'ran'), and the batch in the -1 reached
    the evaluator (NameError: B)."""
    from tests.analysis.test_indexing_rules import runs

    network = PartitionsWindows().eval()
    analysis = analyse(network, exact=exact)
    sizes = [(56, 56), (63, 70), (64, 64), (70, 64), (49, 77)]
    assert analysis.runnable(sizes) == [runs(network, size) for size in sizes] == [
        True, True, False, False, True]
    running = [size for size in sizes if runs(network, size)]
    if exact:
        assert not verify(analysis, running).mismatches
    with pytest.raises(ValueError, match="cannot run at 64x64: .*a view keeps every value"):
        answer_every_resolution(analyse(network), [(64, 64)], lambda: analyse(network,
                                                                           exact=True))
