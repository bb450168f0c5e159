"""Rendered tables against reviewed golden files; LaTeX compiles; JSON keeps its contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import sympy as sp
from convtally.analysis.accounting import H, W, analyse
from convtally.analysis.formatting import growth_factors, order_in_hw, render

GOLDEN = Path(__file__).parent / "golden"
CASES = [
    ("poolupsample", [(32, 32), (64, 64)], "text", "poolupsample_32_64.txt"),
    ("poolupsample", [(32, 32), (64, 64)], "markdown", "poolupsample_32_64.md"),
    ("unet", [(32, 32)], "latex", "unet_32.tex"),
    ("convtranspose", [(32, 32), (64, 64)], "csv", "convtranspose_32_64.csv"),
]


@pytest.mark.parametrize("model,resolutions,fmt,golden", CASES)
def test_rendering_matches_reviewed_golden_file(model, resolutions, fmt, golden):
    """Regenerate with `CONVTALLY_REGENERATE_GOLDEN=1 pytest tests/analysis/test_formatting.py`,
    then review every changed file by eye (git diff) before committing it."""
    rendered = render(analyse(model), resolutions, fmt)
    if os.environ.get("CONVTALLY_REGENERATE_GOLDEN"):
        (GOLDEN / golden).write_text(rendered)
    assert rendered == (GOLDEN / golden).read_text()


def test_markdown_and_latex_of_a_hand_written_case():
    """A one-layer network whose rendering is written here by hand, not by the engine."""
    from torch import nn

    network = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    markdown = render(analyse(network), [(32, 32)], "markdown", columns="values")
    assert markdown.splitlines()[-4:] == [
        "| layer   | type   | output shape   |   weights @32 |   outputs @32 |   connections @32 |",
        "|:--------|:-------|:---------------|--------------:|--------------:|------------------:|",
        "| 0       | Conv2d | `(2, H, W)`    |            20 |         2,048 |            18,432 |",
        "| Total   |        |                |            20 |         2,048 |            18,432 |",
    ]
    latex = render(analyse(network), [(32, 32)], "latex", columns="values")
    assert latex.startswith("% needs \\usepackage{booktabs}\n")
    assert "\\begin{tabular}{lllrrr}" in latex and "\\label{tab:costs-Sequential}" in latex
    assert "0 & Conv2d & $(2, H, W)$ & 20 & 2,048 & 18,432 \\\\" in latex


def _compile(tmp_path, table: str, packages: str) -> None:
    (tmp_path / "table.tex").write_text(table)
    (tmp_path / "doc.tex").write_text(
        f"\\documentclass{{article}}\n\\usepackage{{{packages}}}\n"
        "\\begin{document}\n\\input{table.tex}\n\\end{document}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_a_369_row_table_is_a_longtable_that_compiles(tmp_path):
    latex = render(analyse("deeplabv3_flowers"), [(224, 224)], "latex", columns="values")
    first = latex.splitlines()[0]
    assert first == "% needs \\usepackage{booktabs, longtable}"
    assert "\\begin{longtable}" in latex and "\\endhead" in latex
    _compile(tmp_path, latex, "booktabs, longtable")


def test_json_contract():
    data = json.loads(render(analyse("unet"), [(32, 32), (32, 48)], "json"))
    assert set(data) >= {
        "model",
        "hyperparameters",
        "convention",
        "assumptions",
        "layers",
        "totals",
    }
    assert data["hyperparameters"]["NF"] == {"name": "num_filters", "value": 32}
    layer = data["layers"][0]
    assert set(layer) >= {"name", "type", "output_shape", "weights", "outputs", "connections"}
    assert layer["outputs"]["values"] == {"32": 32768, "32x48": 49152}
    for quantity in ("weights", "outputs", "connections"):
        formula = sp.sympify(data["totals"][quantity]["formula"])
        at = {sp.Symbol(s): v["value"] for s, v in data["hyperparameters"].items()}
        assert (
            formula.subs({**at, sp.Symbol("H"): 32, sp.Symbol("W"): 48})
            == data["totals"][quantity]["values"]["32x48"]
        )
        assert (
            sum(lay[quantity]["values"]["32"] for lay in data["layers"])
            == data["totals"][quantity]["values"]["32"]
        )


def test_latex_structure():
    text = render(analyse("poolupsample"), [(32, 32)], "latex")
    assert "\\toprule" in text and "\\midrule" in text and "\\bottomrule" in text
    assert "\\multicolumn{2}{c}{Weights}" in text
    assert "$K^{2} \\mathrm{NF} \\mathrm{NIC} + \\mathrm{NF}$" in text
    body = text.split("\\midrule")[1].split("\\bottomrule")[0]
    assert all(row.count("&") == 8 for row in body.strip().split("\\\\\n") if row.strip())


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles_with_pdflatex(tmp_path):
    table = tmp_path / "table.tex"
    table.write_text(render(analyse("unet"), [(32, 32), (64, 64)], "latex"))
    document = tmp_path / "doc.tex"
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n"
        "\\begin{document}\n\\input{table.tex}\n\\end{document}\n"
    )
    result = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


@pytest.mark.parametrize(
    "formula,order",
    [
        (sp.Integer(50304), "O(1)"),
        (3 * H * W / 4 + 7, "O(H·W)"),
        (H**2 * W**2 / 256, "O((H·W)^2)"),
        (H**2 / 16, "O(H^2)"),
        (sp.floor(H / 2) * W, "O(H·W)"),
        (sp.Mod(H, 7) * W + H * W**2, "O(H·W^2)"),
        ((H**2 * W**2 + 3) / (H * W / 49 + 1) + H, "O(H·W)"),
        (7 + 1 / (H * W + 1), "O(1)"),
        (H * W + sp.Max(H, 5), "O(?)"),
    ],
)
def test_order_in_hw(formula, order):
    assert order_in_hw(formula) == order


def test_growth_factors_only_for_doublings():
    assert growth_factors([10, 40, 90], [(32, 32), (64, 64), (96, 96)]) == ["x4.00 (32->64)"]
