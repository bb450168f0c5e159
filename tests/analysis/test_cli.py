"""The command line: outputs, files, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from convtally.analysis.cli import main
from convtally.analysis.shapes import halving_and_doubling_padding
from torch import nn


def user_module(tmp_path, monkeypatch, name: str, source: str) -> str:
    """Write a user's model file `name`.py importable as `name:build`; return that reference."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:build"


def test_table_json_to_file(tmp_path, capsys):
    out = tmp_path / "sub" / "unet.json"
    assert (
        main(
            [
                "table",
                "unet",
                "--res",
                "32",
                "32x64",
                "--set",
                "NF=8",
                "--format",
                "json",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["hyperparameters"]["NF"]["value"] == 8
    assert set(data["totals"]["weights"]["values"]) == {"32", "32x64"}
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]


def test_table_torchvision_and_callable(capsys):
    assert main(["table", "torchvision:resnet18", "--res", "224", "--format", "csv"]) == 0
    assert "fc,Linear" in capsys.readouterr().out
    assert main(["table", "convtally.models.colourization:PoolUpsampleNet", "--res", "32"]) == 2
    assert "error:" in capsys.readouterr().err


def test_set_passes_builder_keywords_to_torchvision_and_timm(capsys):
    """--set names that are not hyperparameters build a torchvision: or timm: model with those
    keywords (a ViT at another crop, another class count), and the model's name says so."""
    from torchvision.models import resnet18, vit_b_32

    assert main(["table", "torchvision:resnet18", "--set", "num_classes=10", "--res", "64",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "torchvision:resnet18(num_classes=10)"
    weights = data["totals"]["weights"]["values"]["64"]
    assert weights == sum(p.numel() for p in resnet18(num_classes=10).parameters())
    assert main(["table", "torchvision:vit_b_32", "--set", "image_size=64", "--res", "64",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "torchvision:vit_b_32(image_size=64)" and data["capture"] == "concrete"
    weights = data["totals"]["weights"]["values"]["64"]
    assert weights == sum(p.numel() for p in vit_b_32(image_size=64).parameters())
    timm = pytest.importorskip("timm")
    assert main(["table", "timm:vit_tiny_patch16_224", "--set", "img_size=32", "--res", "32",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = timm.create_model("vit_tiny_patch16_224", img_size=32)
    assert data["totals"]["weights"]["values"]["32"] == sum(
        p.numel() for p in expected.parameters())


def test_table_convention_switches(capsys):
    main(["table", "poolupsample", "--res", "32", "--format", "json", "--bias-connections"])
    data = json.loads(capsys.readouterr().out)
    assert data["convention"]["bias_in_connections"] is True
    assert data["layers"][0]["connections"]["values"]["32"] == 884736 + 32768


@pytest.mark.parametrize(
    "argv,message",
    [
        (["table", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["table", "torchvision:nosuch"], "unknown torchvision model 'nosuch'"),
        (["table", "unet", "--set", "QQ=3"], "unknown hyperparameter 'QQ'"),
        (["table", "unet", "--set", "NF=x"], "bad --set 'NF=x'"),
        (["table", "unet", "--res", "30"], "unet cannot run at 30x30: cat (cat) cannot run"),
        (["table", "unet", "--res", "abc"], "bad resolution 'abc'"),
        (["verify", "unet", "--device", "cuda:7"], "no CUDA GPU is available"),
        (["padding", "--kernel", "4", "--stride", "1"], "no padding makes a kernel-4, stride-1"),
        (["padding", "--kernel", "0"], "--kernel and --stride must be positive"),
    (["table", "unet", "--set", "K=4"], "cat (cat) cannot run at any input size"),
    (["table", "torchvision:vit_b_16", "--res", "224", "--capture", "fx"],
     "_assert (_assert): the forward asserts H == 224 (Wrong image height! Expected 224 but got "
     "Proxy(getitem_2)!): its input size is fixed"),
    (["train", "colour", "--model", "unet", "--kernel", "4", "--data", "/nonexistent"],
     "unet cannot run on 32x32 input"),
    (["table", "torchvision:resnet18", "--set", "nosuch=3"],
     "torchvision.models.resnet18 refused a --set keyword: ResNet.__init__() got an unexpected "
     "keyword argument 'nosuch'"),
    (["table", "torchvision:vit_b_32", "--res", "64"],
     "build it at yours: torchvision: and timm: models take builder keywords, e.g. --set "
     "image_size=N"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_layer_cli(capsys, monkeypatch, tmp_path):
    user_module(tmp_path, monkeypatch, "oddnet",
                "from torch import nn\n"
                "def build():\n"
                "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LocalResponseNorm(2))\n")
    assert main(["table", "oddnet:build", "--res", "16", "--strict"]) == 2
    assert "no rule for 1 (LocalResponseNorm)" in capsys.readouterr().err
    assert main(["table", "oddnet:build", "--res", "16"]) == 0  # unknown rows by default
    out = capsys.readouterr().out
    assert "LocalResponseNorm" in out and "unknown (no rule)" in out
    assert "INCOMPLETE: no rule for 1 (LocalResponseNorm)" in out
    assert "incomplete: " in out  # the connections total
    assert main(["table", "oddnet:build", "--res", "16", "--allow-unknown"]) == 0
    capsys.readouterr()
    assert main(["table", "oddnet:build", "--res", "16", "--allow-unknown", "--format",
                 "json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [layer["known"] for layer in layers] == [True, False]


@pytest.mark.parametrize("kernel", range(1, 10))
@pytest.mark.parametrize("stride", [2, 3])
def test_padding_halves_and_doubles_real_layers(kernel, stride):
    import torch

    padding, output_padding = halving_and_doubling_padding(kernel, stride)
    for size in (stride * 4, stride * 7):
        x = torch.zeros(1, 1, size, size)
        down = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding)(x)
        assert down.shape[-1] == size // stride
        up = nn.ConvTranspose2d(
            1, 1, kernel, stride=stride, padding=padding, output_padding=output_padding
        )(down)
        assert up.shape[-1] == size


def test_padding_cli_matches_write_up_part_b4(capsys):
    assert main(["padding", "--kernel", "4"]) == 0
    out = capsys.readouterr().out
    assert "padding=1)" in out and "padding=1, output_padding=0" in out
    main(["padding", "--kernel", "5"])
    assert "padding=2, output_padding=1" in capsys.readouterr().out


def test_repeated_res_and_set_accumulate(capsys):
    assert main(["table", "poolupsample", "--res", "32", "--res", "64", "--set", "NF=8",
                 "--set", "K=5", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hyperparameters"]["NF"]["value"] == 8
    assert data["hyperparameters"]["K"]["value"] == 5
    assert set(data["totals"]["outputs"]["values"]) == {"32", "64"}


def test_linear_after_flatten_fixes_the_resolution(capsys, monkeypatch, tmp_path):
    user_module(
        tmp_path, monkeypatch, "flatnet",
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),\n"
        "                         nn.Linear(8 * 16 * 16, 2))\n")
    assert main(["table", "flatnet:build", "--res", "32", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("2*H*W = 2048; it holds at 32x32" in a for a in data["assumptions"])
    assert data["layers"][-1]["connections"]["values"]["32"] == 2048 * 2
    assert main(["table", "flatnet:build", "--res", "32", "64"]) == 2
    assert "3 (Linear) cannot run at 64x64" in capsys.readouterr().err


def test_factory_that_raises_is_one_line(capsys, monkeypatch, tmp_path):
    user_module(tmp_path, monkeypatch, "badnet", "def build():\n    raise RuntimeError('boom')\n")
    assert main(["table", "badnet:build"]) == 2
    assert capsys.readouterr().err.strip() == (
        "convtally table: error: badnet:build() failed: RuntimeError: boom "
        f"({tmp_path / 'badnet.py'}, line 2)")


def test_a_users_one_channel_network_verifies_without_flags(tmp_path, monkeypatch, capsys):
    """The input channels of a user's module are its first convolution's, not always 3."""
    user_module(tmp_path, monkeypatch, "grey",
                "from torch import nn\n"
                "def build():\n"
                "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))\n")
    assert main(["verify", "grey:build", "--res", "16", "20x24"]) == 0
    assert "0 mismatch(es)" in capsys.readouterr().out
    assert main(["table", "grey:build", "--res", "16", "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)["layers"][0]
    assert first["weights"]["values"]["16"] == 4 * 1 * 9 + 4
    assert first["connections"]["values"]["16"] == 4 * 14 * 14 * 1 * 9
