"""The write-up's hand-derived tables: what the checker finds wrong, and what it accepts."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from convtally.analysis.accounting import analyse
from convtally.analysis.cli import main
from convtally.analysis.conventions import make_convention
from convtally.analysis.handcheck import check_table, parse_formula, read_hand_table
from convtally.analysis.report import HAND_TABLES

DATA = Path(__file__).parents[1] / "data"
TABLE_32, TABLE_64 = HAND_TABLES  # package data (analysis/tables/)


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


def test_blank_relu_connections_are_not_given_and_the_total_says_so(result):
    assert not any(c.layer == "block0.3" and c.quantity == "connections" for c in result.cells)
    assert result.not_given == 24
    total = cell(result, "Total", "connections")
    assert "blank connections cells counted as 0: block0.3 (ReLU)" in total.diagnoses[0]


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
    assert len(result.wrong) == 24 and len(result.cells) == 84
    assert result.unmatched_rows == [] and not result.incomplete and not result.suggestions


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
    assert "24 wrong, 60 right, 24 not given" in capsys.readouterr().out
    good = tmp_path / "good.csv"
    good.write_text(
        "layer,type,weights,outputs,connections\n0,Conv2d,896,32768,884736\n"
        ",MaxPool2d,,8192,32768\n"
    )
    assert main(["check-table", str(good), "--model", "poolupsample", "--res", "32",
                 "--partial"]) == 0
    assert "0 wrong" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,message",
    [
        ("layer,weights\n", "lacks column(s) type"),
        ("layer,type,notes\n", "lacks column(s) weights, outputs or connections"),
        (
            "layer,type,weights,outputs,connections\n0,Conv2d,x,1,1\n",
            "weights 'x' is not an integer",
        ),
        (
            "layer,type,weights,outputs,connections,weights_formula\n0,Conv2d,896,1,1,NF H?\n",
            "weights_formula 'NF H?': unexpected character '?'",
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


# -- tables as people write them (tests/data/README.md says what each one is) ---------------


@pytest.fixture(scope="module")
def poolupsample():
    return analyse("poolupsample")


def check_file(analysis, name, resolution=(32, 32)):
    return check_table(analysis, read_hand_table(DATA / name), [resolution])


def test_a_missing_column_is_not_given_not_zero(poolupsample):
    result = check_file(poolupsample, "person_no_connections.csv")
    assert result.wrong == [] and result.not_given == 18
    assert {c.quantity for c in result.cells} == {"weights", "outputs"}


def test_weights_without_biases_are_one_suggestion_not_a_flag_per_row(poolupsample):
    result = check_file(poolupsample, "person_no_biases.csv")
    assert result.wrong == []
    assert result.suggestions == [
        "every conv/linear row omits exactly its biases: the table counts weights without "
        "biases; rerun with --no-bias-weights"
    ]
    explained = [c for c in result.cells if c.explained_by]
    assert {c.layer for c in explained} == {
        "block0.0", "block1.0", "block2.0", "block3.0", "block4.0", "(total)"}
    without = poolupsample.with_convention(make_convention(bias_in_weights=False))
    rerun = check_file(without, "person_no_biases.csv")
    assert rerun.wrong == [] and rerun.suggestions == [] and not any(
        c.explained_by for c in rerun.cells)


def test_one_row_without_its_bias_is_still_flagged(poolupsample):
    # the write-up's block3.0 omits its biases; the other rows do not: no table convention
    tables = {"32": read_hand_table(TABLE_32)[None]}
    result = check_table(poolupsample, tables, [(32, 32)])
    assert "omits the layer's 24 biases" in cell(result, "3 Conv2d", "weights").diagnoses[0]
    assert result.suggestions == []


def test_totals_over_a_table_that_skips_activations(poolupsample):
    result = check_file(poolupsample, "person_skips_activations.csv")
    assert result.wrong == [] and not result.incomplete
    total = cell(result, "Total", "outputs")
    assert total.hand == 172032 and total.exact == 172032
    assert total.diagnoses == [
        "equals the sum over the 13 layers the table lists; it leaves out 4 ReLU: 45,056"]


def test_a_layer_missing_from_the_table_is_named(poolupsample):
    result = check_file(poolupsample, "person_omits_layer.csv")
    assert [(c.layer, c.quantity) for c in result.wrong] == [
        ("(total)", "weights"), ("(total)", "outputs"), ("(total)", "connections")]
    for c in result.wrong:
        assert c.diagnoses[0].startswith(
            "the total leaves out block4.0 (Conv2d): 5,208 weights, 24,576 outputs, "
            "5,308,416 connections")
    assert result.incomplete and result.unlisted_with_weights["32"] == ["block4.0 (Conv2d)"]


def test_an_input_row_is_the_input(poolupsample):
    result = check_file(poolupsample, "person_input_row.csv")
    assert result.wrong == [] and result.unmatched_rows == []
    (input_cell,) = [c for c in result.cells if c.layer == "(input)"]
    assert (input_cell.quantity, input_cell.hand, input_cell.exact) == ("outputs", 3072, 3072)


def test_a_wrong_latex_fraction_is_caught_and_nothing_else(poolupsample):
    result = check_file(poolupsample, "person_latex_frac.csv")
    (wrong,) = result.wrong
    assert (wrong.layer, wrong.quantity) == ("block0.1", "outputs")
    assert wrong.formula_problem.startswith("formula H*NF*W/2 is not H*NF*W/4: it gives 16384")


def test_cs231n_vgg16_table_finds_its_total_memory_and_nothing_else():
    result = check_file(analyse("torchvision:vgg16"), "cs231n_vgg16.csv", (224, 224))
    # rounded values (3.2M, 150K) and weights without biases are the notes' conventions
    assert result.suggestions == [
        "every conv/linear row omits exactly its biases: the table counts weights without "
        "biases; rerun with --no-bias-weights"
    ]
    (wrong,) = result.wrong
    assert (wrong.layer, wrong.quantity, wrong.hand, wrong.exact) == (
        "(total)", "outputs", 24_000_000, 28_701_160)
    assert "the total over the layers it lists is 15,087,080" in wrong.diagnoses[0]
    assert "it leaves out 15 ReLU, 2 Dropout, 1 AdaptiveAvgPool2d, 1 flatten: 13,614,080" in (
        wrong.diagnoses[0])
    weights = cell(result, "Total", "weights", "224")
    assert not weights.wrong and weights.hand == 138_000_000
    assert result.unmatched_rows == [] and not result.incomplete


@pytest.mark.parametrize("fmt", ["text", "markdown", "csv", "json"])
def test_check_formats_count_each_diagnosis(fmt, capsys):
    assert main(["check-table", str(TABLE_32), "--model", "poolupsample", "--format",
                 fmt]) == 1
    out = capsys.readouterr().out
    if fmt == "json":
        data = json.loads(out)
        assert data["diagnosis_counts"]["bias in connections"] == 4
        assert data["not_given"] == 12
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert len(rows) == 42 and sum(int(r["wrong"]) for r in rows) == 12
    else:
        assert "4 bias in connections" in out
