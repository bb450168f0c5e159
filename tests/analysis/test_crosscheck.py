"""`convtally crosscheck`: tools next to presets, differences by cause, exit codes, formats."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
from convtally.analysis.cli import main
from convtally.analysis.conventions import PRESETS, count
from convtally.analysis.crosscheck import crosscheck, render_crosscheck

pytest.importorskip("ptflops")
pytest.importorskip("thop")
pytest.importorskip("torchinfo")


@pytest.fixture(scope="module")
def unet_check():
    return crosscheck("unet", [(32, 32), (64, 48)])


def test_every_tool_equals_its_preset_and_the_causes_add_up(unet_check):
    assert unet_check.mismatches == []
    assert [r.resolution for r in unet_check.resolutions] == ["32", "64x48"]
    for check in unet_check.resolutions:
        assert [t.tool for t in check.tools] == ["fvcore", "ptflops", "thop", "torchinfo", "torch"]
        for tool in check.tools:
            assert tool.number == tool.preset
            assert tool.number - check.default == sum(c.difference for c in tool.causes)
            assert all(c.layers for c in tool.causes)


def test_causes_name_the_layers(unet_check):
    causes = {(t.tool, c.cause): c for t in unet_check.resolutions[0].tools for c in t.causes}
    # fvcore does not count ReLU, max pooling or concatenation; thop counts no ReLU either
    unseen = causes[("fvcore", "ops the tool does not see or counts as zero")]
    assert {"block0.1", "block0.3"} <= set(unseen.layers)
    # ptflops and torchinfo count one bias term per conv output; fvcore and thop none
    assert ("ptflops", "bias terms") in causes and ("torchinfo", "bias terms") in causes
    assert ("fvcore", "bias terms") not in causes and ("thop", "bias terms") not in causes
    assert causes[("ptflops", "bias terms")].layers == [f"block{i}.0" for i in range(5)]
    # 32x32 UNet, NF=32, NC=24: BatchNorm values 32*16^2 + 64*8^2 + 32*16^2 + 24*32^2 = 45,056;
    # fvcore counts 2 per value (affine), the default 1
    assert causes[("fvcore", "normalisation")].difference == 45056
    # PyTorch's counter: 2 FLOPs per multiply-add, so + the default's conv connections
    torch_macs = causes[("torch", "conv/linear multiply-adds (unit or formula)")]
    assert len(torch_macs.layers) == 5


def test_text_output_and_layers(capsys):
    assert main(["crosscheck", "poolupsample", "--res", "32", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "crosscheck poolupsample" in out
    for tool in ("fvcore", "ptflops", "thop", "torchinfo", "torch"):
        assert any(line.startswith(tool) and " yes " in line for line in out.splitlines())
    assert "default convention (docs/counting.md): 14,032,896 connections, 50,304 weights" in out
    assert "normalisation" in out and "0 preset(s) differ from their tool" in out
    # --layers: one row per module with every tool's own per-module count
    row = next(line for line in out.splitlines() if line.startswith("block0.0 "))
    # K^2*NIC*NF*H*W = 884,736 (default, fvcore, thop); + 32,768 biases (ptflops, torchinfo);
    # 2 per multiply-add (FlopCounterMode)
    assert row.split() == [
        "block0.0",
        "Conv2d",
        "884,736",
        "884,736",
        "917,504",
        "884,736",
        "917,504",
        "1,769,472",
    ]


def test_json_csv_markdown_to_files(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert (
        main(["crosscheck", "convtranspose", "--res", "32", "-o", str(out), "--format", "json"])
        == 0
    )
    assert capsys.readouterr().out == "0 preset(s) differ from their tool\n"
    data = json.loads(out.read_text())
    assert data["mismatches"] == []
    tools = {t["tool"]: t for t in data["resolutions"][0]["tools"]}
    # fvcore does not see the padding='same' convolution (aten::_convolution_mode)
    fvcore_unseen = next(
        c for c in tools["fvcore"]["causes"] if c["cause"].startswith("ops the tool does not")
    )
    assert "block4.0" in fvcore_unseen["layers"]
    assert tools["thop"]["parameters"] == tools["thop"]["preset_weights"]
    assert main(["crosscheck", "convtranspose", "--res", "32", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0].startswith("resolution,tool,package,tool's number,our preset")
    assert main(["crosscheck", "convtranspose", "--res", "32", "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "## 32" in markdown and "| fvcore" in markdown


def test_a_missing_tool_is_skipped_with_a_note(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "thop" else real(name, *a)
    )
    assert main(["crosscheck", "poolupsample", "--res", "32", "--tools", "thop", "fvcore"]) == 0
    captured = capsys.readouterr()
    note = "thop: skipped, package 'thop' is not installed (pip install 'convtally[peers]')"
    assert note in captured.err and note in captured.out
    assert not any(line.startswith("thop ") for line in captured.out.splitlines())


def test_a_preset_that_differs_from_its_tool_exits_1(monkeypatch, capsys):
    thop = PRESETS["thop"]
    wrong = dict(thop.connection_rules)
    wrong["batch_norm@module"] = count("deliberately wrong: 2 per value", inputs=2)
    monkeypatch.setitem(PRESETS, "thop", replace(thop, connection_rules=wrong))
    assert main(["crosscheck", "poolupsample", "--res", "32", "--tools", "thop"]) == 1
    out = capsys.readouterr().out
    assert "1 preset(s) differ from their tool: thop at 32" in out
    assert "unexplained (tool - our preset)" in out


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["crosscheck", "unet", "--res", "30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unet cannot run at 30x30" in err
    assert main(["crosscheck", "nosuchnet"]) == 2
    assert "unknown model 'nosuchnet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["crosscheck", "poolupsample", "--tools", "flopper"])
    assert exit_info.value.code == 2


def test_convention_option_on_table_compare_verify(capsys):
    assert (
        main(["table", "poolupsample", "--res", "32", "--convention", "thop", "--format", "json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["convention"]["name"] == "thop"
    thop_number = crosscheck("poolupsample", [(32, 32)], tools=["thop"]).resolutions[0].tools[0]
    assert data["totals"]["connections"]["values"]["32"] == thop_number.number
    compare = ["compare", "poolupsample", "--res", "32", "--convention", "torch"]
    assert main([*compare, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["connections"] == 27721728  # FlopCounterMode: 2 x 13,860,864 conv MACs
    assert (
        main(["verify", "unet", "--res", "32", "--convention", "ptflops", "--device", "cpu"]) == 0
    )
    assert "0 mismatch(es)" in capsys.readouterr().out
    args = ["table", "poolupsample", "--res", "32", "--convention", "ptflops", "--format", "json"]
    assert main([*args, "--no-bias-connections"]) == 0
    assert json.loads(capsys.readouterr().out)["convention"]["name"] == "ptflops+custom"
    assert main([*args, "--bias-connections", "--no-bias-connections"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_render_without_tools_is_still_a_report():
    result = crosscheck("poolupsample", [(32, 32)], tools=["torch"])
    text = render_crosscheck(result, "text")
    assert "torch" in text and "0 preset(s) differ" in text
