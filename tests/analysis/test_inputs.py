"""Inputs that are not 3xHxW: --input 1xHxW, CxT (1-d) and CxDxHxW (3-d), checked against the
running network (hooks), fvcore and PyTorch's FLOP counter at several sizes."""

from __future__ import annotations

import warnings

import pytest
import sympy as sp
import torch
import torch.nn.functional as F
from convtally.analysis.accounting import (
    ResolutionError,
    analyse,
    parse_input,
    parse_resolution,
)
from convtally.analysis.cli import main
from convtally.analysis.conventions import PRESETS
from convtally.analysis.formatting import render
from convtally.analysis.symbols import AXES, D, H, T, W
from convtally.analysis.verification import verify
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tests.analysis.test_cli import user_module


class Audio(nn.Module):
    """A 1-d network: 2 channels in (stereo), T samples."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(2, 16, 9, stride=2, padding=4),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(4),
            nn.Conv1d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool1d(2),
            nn.AdaptiveAvgPool1d(1),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class Video(nn.Module):
    """A 3-d network: 3 channels, D frames of H x W, with functional 3-d pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm3d(8)
        self.conv2 = nn.Conv3d(8, 16, 3, stride=(1, 2, 2), padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(torch.relu(self.norm(self.conv1(x))), 2)
        x = F.adaptive_avg_pool3d(self.conv2(x), 1)
        return self.fc(x.flatten(1))


class Flat(nn.Module):
    """No convolution to say its channels: a linear layer over a 1x28x28 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


CASES = [
    (Audio, "2xT", (T,), [(1024,), (2048,), (16000,)]),
    (Video, "3xDxHxW", (D, H, W), [(8, 32, 32), (16, 64, 48), (4, 112, 112)]),
]


@pytest.mark.parametrize(("network", "given", "axes", "resolutions"), CASES)
def test_formulas_in_the_inputs_own_sizes_equal_the_running_network(
    network, given, axes, resolutions
):
    analysis = analyse(network(), input_shape=given)
    assert analysis.axes == axes
    assert analysis.total("outputs").free_symbols == set(axes)
    result = verify(analysis, resolutions[:2])
    assert not result.mismatches, result.summary()
    # the conv rows were checked against fvcore and FlopCounterMode, not only hooks
    conv = [c for c in result.checks if c.kind == "conv"]
    assert conv and all(c.fvcore == c.connections_formula for c in conv)


@pytest.mark.parametrize(("network", "given", "axes", "resolutions"), CASES)
def test_the_fvcore_preset_equals_fvcores_total(network, given, axes, resolutions):
    from fvcore.nn import FlopCountAnalysis

    net = network().eval()
    analysis = analyse(net, convention=PRESETS["fvcore"])
    totals = analysis.totals_at(resolutions)["connections"]
    for resolution, ours in zip(resolutions, totals, strict=True):
        channels = int(analysis.input_channels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counter = FlopCountAnalysis(net, torch.zeros(1, channels, *resolution))
            counter.unsupported_ops_warnings(False)
            assert ours == counter.total(), resolution


@pytest.mark.parametrize(("network", "given", "axes", "resolutions"), CASES)
def test_a_1d_or_3d_network_is_read_as_such_without_flags(network, given, axes, resolutions):
    assert analyse(network()).axes == axes
    assert analyse(network()).input_text == given


@pytest.mark.parametrize(("network", "given", "axes", "resolutions"), CASES)
def test_the_concrete_capture_counts_the_same(network, given, axes, resolutions):
    symbolic = analyse(network(), input_shape=given)
    concrete = analyse(network(), input_shape=given, capture="concrete", resolutions=resolutions)
    assert concrete.capture == "concrete"
    assert concrete.totals_at(resolutions) == symbolic.totals_at(resolutions)
    names = ", ".join(map(str, axes))
    assert f"formulas in {names} unavailable" in render(concrete, resolutions, "text")


def test_the_export_rung_refuses_a_1d_input_and_auto_goes_on():
    with pytest.raises(NotImplementedError, match="export rung counts CxHxW inputs, not CxT"):
        analyse(Audio(), capture="export", resolutions=[(1024,)])
    assert analyse(Audio(), capture="auto").capture == "fx"


def test_1xHxW_gives_the_channels_a_network_does_not_declare():
    default = analyse(Flat())
    assert int(default.input_channels) == 3
    with pytest.raises(ResolutionError, match="cannot run at 28x28"):
        from convtally.analysis.accounting import answer_every_resolution

        answer_every_resolution(default, [(28, 28)], lambda: analyse(Flat(), exact=True))
    grey = analyse(Flat(), input_shape="1xHxW")
    assert grey.totals_at([(28, 28)])["connections"] == [28 * 28 * 10]
    assert not verify(grey, [(28, 28)]).mismatches


@pytest.mark.parametrize(
    ("text", "channels", "axes"),
    [
        ("1xHxW", 1, AXES[2]),
        ("CxHxW", None, AXES[2]),
        ("2xT", 2, AXES[1]),
        ("cxt", None, AXES[1]),
        ("3xDxHxW", 3, AXES[3]),
        (" 64 x D x H x W ", 64, AXES[3]),
    ],
)
def test_parse_input(text, channels, axes):
    assert parse_input(text) == (channels, axes)


@pytest.mark.parametrize("text", ["", "HxW", "0xHxW", "-1xT", "3xWxH", "3xHxWxD", "3xTxT", "ax1"])
def test_a_bad_input_names_the_forms(text):
    with pytest.raises(ValueError, match=r"bad --input .*CxHxW \(images\), CxT \(1-d\)"):
        parse_input(text)


@given(st.text(max_size=20))
def test_any_input_text_parses_or_is_refused_in_one_line(text):
    try:
        channels, axes = parse_input(text)
    except ValueError as error:
        assert "\n" not in str(error) and "bad --input" in str(error)
        return
    assert axes in AXES.values() and (channels is None or channels >= 1)


@pytest.mark.parametrize(
    ("text", "rank", "sizes"),
    [("16000", 1, (16000,)), ("16", 3, (16, 16, 16)), ("8x112x96", 3, (8, 112, 96))],
)
def test_parse_resolution_by_rank(text, rank, sizes):
    assert parse_resolution(text, rank) == sizes


@pytest.mark.parametrize(("text", "rank"), [("32x32", 1), ("32x32", 3), ("8x8x8", 2)])
def test_a_resolution_of_the_wrong_rank_is_refused(text, rank):
    with pytest.raises(ValueError, match=f"bad resolution '{text}'"):
        parse_resolution(text, rank)


def test_an_analysis_refuses_sizes_of_another_rank():
    analysis = analyse(Audio())
    with pytest.raises(ResolutionError, match=r"expected 1 input size\(s\) \(T\) for input 2xT"):
        analysis.totals_at([(64, 64)])


def test_divisibility_is_derived_per_axis():
    analysis = analyse(Video())
    assert analysis.divisor == (2, 4, 4)
    assert "D divisible by 2" in analysis.assumptions
    with pytest.raises(ResolutionError, match="expected D divisible by 2 .* got D=7; .* 6 or 8"):
        analysis.totals_at([(7, 32, 32)])
    exact = analyse(Video(), exact=True)
    assert exact.total("outputs").atoms(sp.floor)
    assert not verify(exact, [(7, 30, 34)]).mismatches


SOURCE = '''
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv1d(2, 16, 9, stride=2, padding=4), nn.ReLU(), nn.MaxPool1d(4),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 10),
    )
'''


def test_cli_table_and_verify_with_input(tmp_path, monkeypatch, capsys):
    model = user_module(tmp_path, monkeypatch, "audio_net", SOURCE)
    assert main(["table", model, "--input", "2xT", "--res", "1024", "16000"]) == 0
    out = capsys.readouterr().out
    assert "input: 2xT per example" in out
    assert "(16, T/2)" in out and "connections @16000" in out
    assert "total connections: O(T)" in out
    assert main(["verify", model, "--res", "1024", "4096"]) == 0  # 1-d read from the Conv1d
    assert "0 mismatch(es)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--input", "2xQ"], "bad --input '2xQ'"),
        (["--input", "2xT", "--res", "32x32"], "bad resolution '32x32': use T (a length)"),
        (["--input", "2xT", "--res", "4"], "cannot run at 4: input 4 is too small"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    model = user_module(tmp_path, monkeypatch, "audio_net_bad", SOURCE)
    assert main(["table", model, *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["compare", "MODEL", "--res", "1024"], "convtally compare"),
        (["memory", "MODEL", "--res", "1024"], "memory"),
        (["check-table", "TABLE", "--model", "MODEL", "--res", "1024"], "convtally check-table"),
        (["crosscheck", "MODEL", "--res", "1024"], "convtally crosscheck"),
    ],
)
def test_commands_that_count_images_only_refuse_a_1d_model_in_one_line(
    tmp_path, monkeypatch, capsys, argv, command
):
    model = user_module(tmp_path, monkeypatch, "audio_net_images", SOURCE)
    table = tmp_path / "t.csv"
    table.write_text("layer,type,weights,outputs,connections\n0,Conv1d,304,8192,147456\n")
    argv = [model if a == "MODEL" else str(table) if a == "TABLE" else a for a in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{command} counts CxHxW inputs; {model} reads 2xT" in error
    assert error.count("\n") == 1


class Upsampled(nn.Module):
    """A 1-d or 3-d U-Net's up path: nn.Upsample (nearest), then linear interpolation by a
    scale (1-d) or trilinear interpolation to a size (3-d)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        convolution = nn.Conv1d if rank == 1 else nn.Conv3d
        self.rank = rank
        self.down = convolution(1, 4, 4 if rank == 1 else 2, stride=4 if rank == 1 else 2)
        self.up = nn.Upsample(scale_factor=2)
        self.out = convolution(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.down(x))
        if self.rank == 1:
            x = F.interpolate(x, scale_factor=2, mode="linear")
        else:
            x = F.interpolate(x, size=(x.shape[2], 8, 8), mode="trilinear")
        return self.out(x)


@pytest.mark.parametrize(
    ("rank", "resolutions"), [(1, [(64,), (128,)]), (3, [(8, 16, 16), (4, 32, 24)])]
)
def test_1d_and_3d_upsampling_against_hooks_and_fvcore(rank, resolutions):
    from fvcore.nn import FlopCountAnalysis

    net = Upsampled(rank).eval()
    analysis = analyse(net)
    assert not verify(analysis, resolutions).mismatches
    up = next(layer for layer in analysis.layers if layer.type == "Upsample")
    assert up.cost.op == f"upsample_nearest{len(analysis.axes)}d"
    fvcore_preset = analyse(net, convention=PRESETS["fvcore"]).totals_at(resolutions)
    for resolution, ours in zip(resolutions, fvcore_preset["connections"], strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counter = FlopCountAnalysis(net, torch.zeros(1, 1, *resolution))
            counter.unsupported_ops_warnings(False)
            assert ours == counter.total(), resolution


@pytest.mark.parametrize("layers, rank", [
    ([], 2),
    ([nn.Conv1d(1, 2, 3)], 1),
    ([nn.Conv3d(1, 2, 3)], 3),
    ([nn.Conv1d(1, 2, 3), nn.Conv3d(2, 2, 3)], 1),  # the first convolution's
    ([nn.Conv1d(1, 2, 3), nn.Conv2d(2, 2, 3)], 2),  # any 2-d one makes it an image
    ([nn.Conv3d(1, 2, 3), nn.Linear(2, 2), nn.Conv2d(2, 2, 3)], 2),
    ([nn.ConvTranspose1d(1, 2, 3)], 1),
])
def test_the_declared_input_rank_is_the_first_convolutions_unless_one_is_2d(layers, rank):
    """A network of 1-d (3-d) convolutions takes C x T (C x D x H x W); one with a 2-d
    convolution anywhere, or none, takes an image."""
    from convtally.models.registry import declared_input_rank

    assert declared_input_rank(nn.Sequential(*layers)) == rank
