"""The write-up's hand-derived tables: what the checker finds wrong, and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.accounting import analyse
from analysis.cli import main
from analysis.handcheck import check_table, parse_formula, read_hand_table

DATA = Path(__file__).parents[1] / "data"
TABLE_32, TABLE_64 = DATA / "writeup_table_32.csv", DATA / "writeup_table_64.csv"


@pytest.fixture(scope="module")
def result():
    tables = {"32": read_hand_table(TABLE_32)[None], "64": read_hand_table(TABLE_64)[None]}
    return check_table(analyse("poolupsample"), tables, [(32, 32), (64, 64)])


def cell(result, row, quantity, resolution="32"):
    return next(
        c
        for c in result.cells
        if c.row == row and c.quantity == quantity and c.resolution == resolution
    )


def test_total_weights_50280_is_the_missing_block3_biases(result):
    total = cell(result, "Total", "weights")
    assert (total.hand, total.exact) == (50280, 50304)
    assert "3 Conv2d (-24)" in total.diagnoses[0]
    conv3 = cell(result, "3 Conv2d", "weights")
    assert (conv3.hand, conv3.exact) == (6912, 6936)
    assert "omits the layer's 24 biases" in conv3.diagnoses[0]


def test_batchnorm_connections_grow_with_the_wrong_power(result):
    first = next(
        c
        for c in result.cells
        if c.layer == "block0.2" and c.quantity == "connections" and c.resolution == "64"
    )
    assert (first.hand, first.exact) == (1048576, 32768)
    text = " ".join(first.diagnoses)
    assert "O((H·W)^2)" in text and "grows x16 from 32 to 64" in text


def test_bias_counted_in_connections(result):
    conv0 = cell(result, "0 Conv2d", "connections")
    assert (conv0.hand, conv0.exact) == (917504, 884736)
    assert "--bias-connections" in conv0.diagnoses[0]


def test_formula_typo_that_still_gives_the_right_value(result):
    outputs = cell(result, "2 Conv2d", "outputs")
    assert outputs.hand == outputs.exact == 2048
    assert outputs.wrong
    assert "gives the right value here" in outputs.formula_problem
    assert "at 32x64 it gives 2048, not 4096" in outputs.formula_problem


def test_relu_without_connections_matches_the_elementwise_switch(result):
    relu = next(c for c in result.cells if c.layer == "block0.3" and c.quantity == "connections")
    assert relu.hand == 0 and relu.exact == 8192
    assert "--no-elementwise-connections" in relu.diagnoses[0]


def test_right_cells_are_accepted(result):
    right = {(c.layer, c.quantity) for c in result.cells if not c.wrong and c.resolution == "32"}
    assert {
        ("block0.0", "weights"),
        ("block0.0", "outputs"),
        ("block0.1", "connections"),
        ("block2.1", "connections"),
        ("block3.0", "connections"),
        ("block4.0", "weights"),
    } <= right
    assert cell(result, "Total", "outputs").wrong is False
    assert len(result.wrong) == 32 and len(result.cells) == 108
    assert result.unmatched_rows == []


def test_check_table_cli_exit_codes(tmp_path, capsys):
    assert (
        main(
            [
                "check-table",
                str(TABLE_32),
                str(TABLE_64),
                "--model",
                "poolupsample",
                "--res",
                "32",
                "64",
            ]
        )
        == 1
    )
    assert "32 wrong, 76 right" in capsys.readouterr().out
    good = tmp_path / "good.csv"
    good.write_text(
        "layer,type,weights,outputs,connections\n0,Conv2d,896,32768,884736\n"
        ",MaxPool2d,,8192,32768\n"
    )
    assert main(["check-table", str(good), "--model", "poolupsample", "--res", "32"]) == 0
    assert "0 wrong" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        ("layer,type,weights\n", "lacks column(s) outputs, connections"),
        (
            "layer,type,weights,outputs,connections\n0,Conv2d,x,1,1\n",
            "weights 'x' is not an integer",
        ),
    ],
)
def test_bad_hand_tables(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(["check-table", str(path), "--model", "poolupsample"]) == 2
    assert message in capsys.readouterr().err


def test_latex_and_plain_formulas_parse_alike():
    import sympy as sp

    symbols = {n: sp.Symbol(n) for n in ("NF", "H", "W")}
    assert parse_formula(r"$NF \cdot H / 2 \cdot W / 2$", symbols) == parse_formula(
        "NF * H / 2 * W / 2", symbols
    )
    assert parse_formula("", symbols) is None
