"""Hostile input, generated: nothing runs, nothing hangs past a bound, every failure is one line.

Property-based (hypothesis) over the formula parser, the hand-table CSV reader, --res/--set
parsing and the checkpoint loader; plus the kill and lock behaviour of `convtally report`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import sympy as sp
import torch
from convtally.analysis import report
from convtally.analysis.accounting import parse_resolution, parse_settings
from convtally.analysis.cli import main
from convtally.analysis.formula import (
    MAX_DEGREE,
    MAX_EXPONENT,
    FormulaError,
    formula_symbols,
    parse_formula_text,
)
from convtally.analysis.handcheck import read_hand_table
from convtally.analysis.shapes import halving_and_doubling_padding
from convtally.analysis.verification import CheckpointError, load_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NAMES = formula_symbols(["H", "W", "B", "NF", "NIC", "NC", "K"])
BOUNDED = settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MARKER = "convtally_hostile_marker"


def one_line(message: str) -> bool:
    return bool(message.strip()) and len(message.strip().splitlines()) == 1


# -- the formula parser ---------------------------------------------------------------------

FORMULA_PIECES = st.sampled_from(
    ["H", "W", "NF", "K", "B", "x", "2", "10", "999999", "0", "0.5", "1,000", "+", "-", "*",
     "/", "**", "^", "(", ")", "{", "}", "[", "]", r"\frac", r"\cdot", r"\times", r"\left(",
     r"\right)", r"\lfloor", r"\rfloor", "floor", "ceil", "$", " ", "__import__", "'os'", ".",
     "system", "lambda", ":", ";", "=", "factorial", "exec", "\\", "×", "·", "\x00", "é"]
)


@BOUNDED
@given(st.lists(FORMULA_PIECES, max_size=40).map("".join))
def test_formula_pieces_parse_or_fail_in_one_line(text):
    try:
        result = parse_formula_text(text, NAMES)
    except FormulaError as error:
        assert one_line(str(error))
        return
    assert result is None or isinstance(result, sp.Expr)
    assert result is None or result.free_symbols <= set(NAMES.values())


@BOUNDED
@given(st.text(max_size=200))
def test_any_text_parses_or_fails_in_one_line(text):
    try:
        parse_formula_text(text, NAMES)
    except FormulaError as error:
        assert one_line(str(error))


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch {marker}')",
        "(lambda: __import__('os').system('touch {marker}'))()",
        "exec(\"open('{marker}', 'w')\")",
        "H.__class__.__mro__",
        "eval('1')",
        "Symbol('H')",
        "open('{marker}', 'w')",
        "[x for x in ()]",
    ],
)
def test_code_in_a_formula_cell_never_runs(tmp_path, payload):
    marker = tmp_path / MARKER
    text = payload.format(marker=marker)
    with pytest.raises(FormulaError):
        parse_formula_text(text, NAMES)
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER.strip().split(","),
                                      ["0", "Conv2d", "896", "32768", "884736", text]])
    assert main(["check-table", str(table), "--model", "poolupsample", "--partial"]) == 2
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, bound",
    [
        ("2**2**2**2**2**2", "exponent"),
        ("factorial(10**8)", "unknown name 'factorial'"),
        ("9" * 40, "digits"),
        ("(" * 500 + "H" + ")" * 500, "characters long"),
        ("(" * 45 + "H" + ")" * 45, "nested"),
        ("((H*W)^6)^6", "degree"),
        ("((" + "1" + "0" * 20 + ")^6)^6", "exceed"),
        ("H^H", "exponent"),
        ("1/0", "division by zero"),
    ],
)
def test_sizes_are_bounded_before_they_are_computed(text, bound):
    with pytest.raises(FormulaError, match=bound):
        parse_formula_text(text, NAMES)


SYMBOL = st.sampled_from(["H", "W", "NF", "K"])


def expressions(depth: int = 3):
    """Expression trees as (text, sympy) pairs, rendered with every supported spelling."""
    leaf = st.one_of(
        st.integers(0, 10**6).map(lambda n: (str(n), sp.Integer(n))),
        SYMBOL.map(lambda s: (s, NAMES[s])),
    )
    if depth == 0:
        return leaf

    def combine(inner):
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", r"\cdot", r"\times"]), inner)
        power = st.tuples(inner, st.sampled_from(["**", "^"]), st.integers(0, 2))
        fraction = st.tuples(inner, st.integers(1, 64))
        return st.one_of(
            binary.map(lambda t: (f"({t[0][0]}) {t[1]} ({t[2][0]})", _apply(t))),
            power.map(lambda t: (f"({t[0][0]}){t[1]}{{{t[2]}}}", t[0][1] ** t[2])),
            fraction.map(lambda t: (rf"\frac{{{t[0][0]}}}{{{t[1]}}}", t[0][1] / t[1])),
            inner.map(lambda t: (rf"\lfloor {t[0]} \rfloor", sp.floor(t[1]))),
            inner.map(lambda t: (f"ceil({t[0]})", sp.ceiling(t[1]))),
        )

    return st.recursive(leaf, combine, max_leaves=8)


def _apply(parts):
    (_, a), operator, (_, b) = parts
    return a + b if operator == "+" else a - b if operator == "-" else a * b


@settings(max_examples=200, deadline=2000)
@given(expressions())
def test_parsed_formula_equals_the_expression_it_spells(pair):
    text, expected = pair
    try:
        parsed = parse_formula_text(f"${text}$", NAMES)
    except FormulaError as error:  # only the documented bounds may refuse a valid expression
        assert "degree" in str(error) or "characters" in str(error) or "nested" in str(error)
        return
    assert sp.simplify(parsed - expected) == 0


def test_formula_spellings_agree():
    plain = parse_formula_text("NF*H/2*W/2", NAMES)
    for text in [r"$NF \cdot H / 2 \cdot W / 2$", r"\frac{NF \cdot H \cdot W}{4}",
                 "NF H W / 4", "NF × H × W / 4", r"\frac{NF}{2} \left( \frac{H W}{2} \right)"]:
        assert parse_formula_text(text, NAMES) == plain, text
    assert parse_formula_text("K^{2} NF^2", NAMES) == NAMES["K"] ** 2 * NAMES["NF"] ** 2
    assert parse_formula_text("1,000 H", NAMES) == 1000 * NAMES["H"]
    assert parse_formula_text(r"\lfloor H/2 \rfloor", NAMES) == sp.floor(NAMES["H"] / 2)
    assert parse_formula_text("   ", NAMES) is None
    assert MAX_EXPONENT >= 2 and MAX_DEGREE >= 8  # (H*W)**2 * K**2 * NF**2 must parse
    assert parse_formula_text("(H*W)^2*K^2*NF^2", NAMES) is not None


# -- the hand-table reader ------------------------------------------------------------------

HEADER = "layer,type,weights,outputs,connections,weights_formula\n"


@BOUNDED
@given(st.binary(max_size=2000))
def test_any_bytes_as_a_hand_table_read_or_fail_in_one_line(tmp_path, data):
    path = tmp_path / "table.csv"
    path.write_bytes(data)
    try:
        read_hand_table(path)
    except ValueError as error:
        assert one_line(str(error))


CELL = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", "n/a", "1,024", "=5", "1e9", "0x10", "９", "1_000", "-", '"', "\n"]),
)


@BOUNDED
@given(st.lists(st.lists(CELL, min_size=0, max_size=8), max_size=6))
def test_csv_shaped_hand_tables_read_or_fail_in_one_line(tmp_path, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for row in rows:
        writer.writerow(row)
    path = tmp_path / "table.csv"
    path.write_text(HEADER + buffer.getvalue(), encoding="utf-8")
    try:
        tables = read_hand_table(path)
    except ValueError as error:
        assert one_line(str(error))
        return
    for table in tables.values():
        for row in table:
            assert all(v is None or isinstance(v, int) for v in row.values.values())


def test_a_huge_field_or_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text(HEADER + "0,Conv2d,1,1,1," + "H" * 200_000 + "\n")
    with pytest.raises(ValueError, match="not valid CSV") as error:
        read_hand_table(path)
    assert one_line(str(error.value))
    with open(path, "wb") as handle:
        handle.truncate(20_000_000)
    with pytest.raises(ValueError, match="at most 10,000,000 bytes"):
        read_hand_table(path)
    with pytest.raises(ValueError, match="is a directory"):
        read_hand_table(tmp_path)


def test_a_bad_formula_cell_is_named(tmp_path, capsys):
    path = tmp_path / "table.csv"
    path.write_text(HEADER + "0,Conv2d,896,32768,884736,NF*H*foo\n")
    assert main(["check-table", str(path), "--model", "poolupsample", "--partial"]) == 2
    error = capsys.readouterr().err
    assert one_line(error)
    assert f"hand table {path} line 2, weights_formula 'NF*H*foo'" in error
    assert "unknown name 'foo'" in error


# -- --res and --set ------------------------------------------------------------------------


@BOUNDED
@given(st.text(max_size=30))
def test_resolution_text_parses_or_fails_in_one_line(text):
    try:
        height, width = parse_resolution(text)
    except ValueError as error:
        assert one_line(str(error)) and "bad resolution" in str(error)
        return
    assert height >= 1 and width >= 1


@BOUNDED
@given(st.lists(st.text(max_size=20), max_size=4))
def test_settings_text_parses_or_fails_in_one_line(items):
    try:
        values = parse_settings(items)
    except ValueError as error:
        assert one_line(str(error)) and "--set" in str(error)
        return
    assert all(isinstance(v, int) and v >= 1 for v in values.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["table", "poolupsample", "--res", "0"], "bad resolution"),
        (["table", "poolupsample", "--res", "1e9"], "bad resolution"),
        (["table", "poolupsample", "--set", "NF=" + "9" * 5000], "is not an integer"),
        (["table", "poolupsample", "--set", "NF=100000000"], "memory available"),
        (["verify", "poolupsample", "--res", "100000"], "memory available"),
        (["padding", "--kernel", "4", "--stride", "1"], "no padding"),
    ],
)
def test_hostile_arguments_fail_in_one_line(capsys, argv, message):
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert one_line(error) and message in error


@settings(max_examples=60, deadline=2000)
@given(st.integers(1, 15), st.integers(1, 6), st.integers(1, 12))
def test_padding_closed_form_halves_and_doubles_the_running_layers(kernel, stride, n):
    try:
        padding, output_padding = halving_and_doubling_padding(kernel, stride)
    except ValueError:
        # no padding p >= 0 with kernel - stride <= 2p < kernel exists
        assert all(not (kernel - stride <= 2 * p < kernel) for p in range(kernel + 1))
        return
    conv = torch.nn.Conv1d(1, 1, kernel, stride, padding)
    transposed = torch.nn.ConvTranspose1d(1, 1, kernel, stride, padding, output_padding)
    with torch.no_grad():
        assert conv(torch.zeros(1, 1, stride * n)).shape[-1] == n
        assert transposed(torch.zeros(1, 1, n)).shape[-1] == stride * n


def test_padding_of_a_huge_kernel_answers_at_once():
    assert halving_and_doubling_padding(10**9, 3) == (499_999_999, 1)


# -- the checkpoint loader ------------------------------------------------------------------


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _network():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@BOUNDED
@given(st.binary(max_size=4000))
def test_any_bytes_as_a_checkpoint_load_or_fail_in_one_line(tmp_path, data):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(_network(), path)
    assert one_line(str(error.value))


@BOUNDED
@given(st.data())
def test_damaged_checkpoints_fail_in_one_line(tmp_path, data):
    valid = _torch_bytes(_network().state_dict())
    cut = data.draw(st.integers(0, len(valid) - 1))
    flips = data.draw(st.lists(st.integers(0, len(valid) - 1), max_size=5))
    damaged = bytearray(valid[:cut] if data.draw(st.booleans()) else valid)
    for position in flips:
        if position < len(damaged):
            damaged[position] ^= 0xFF
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(damaged))
    try:
        load_checkpoint(_network(), path)
    except CheckpointError as error:
        assert one_line(str(error))


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: {"weight": _Payload(marker)},
        lambda marker: _Payload(marker),
        lambda marker: _network(),  # a whole pickled module
        lambda marker: {"state_dict": [_Payload(marker)]},
    ],
)
def test_unsafe_pickles_are_refused_and_never_run(tmp_path, make):
    marker = tmp_path / MARKER
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_torch_bytes(make(str(marker))))
    with pytest.raises(CheckpointError, match="could run code") as error:
        load_checkpoint(_network(), path)
    assert one_line(str(error.value)) and not marker.exists()


def test_a_raw_pickle_in_a_zip_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker))))
        archive.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError):
        load_checkpoint(_network(), path)
    assert not marker.exists()


# -- report: a killed run leaves nothing that lasts, a live one keeps its folder ------------


def test_report_removes_what_a_killed_run_left(tmp_path, monkeypatch):
    out = tmp_path / "reports"
    (out / ".staging-abc" / "costs").mkdir(parents=True)
    (out / ".old-def" / "figures").mkdir(parents=True)  # a swap killed after moving figures
    (out / ".old-def" / "figures" / "kept.png").write_text("old figure")
    seen = {}

    def fake_build(folder, segmentation):
        seen["entries"] = sorted(p.name for p in folder.iterdir())
        return []

    monkeypatch.setattr(report, "_build_report", fake_build)
    report.build_report(out)
    assert seen["entries"] == ["figures"]
    assert (out / "figures" / "kept.png").read_text() == "old figure"


def test_report_refuses_a_folder_a_live_report_holds_and_recovers_a_killed_ones(tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "reports"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            descriptor = os.open({str(out)!r}, os.O_RDONLY)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(report, "_build_report", lambda folder, segmentation: [])
        with pytest.raises(ValueError, match="another convtally report is writing"):
            report.build_report(out)
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait()
        assert report.build_report(out) == []
    finally:
        holder.kill()
        holder.wait()
    descriptor = os.open(out, os.O_RDONLY)  # and nobody holds it afterwards
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for target, words in ((tmp_path, "is a folder"), (blocker / "t.txt", "in the way")):
        assert main(["table", "poolupsample", "-o", str(target)]) == 2
        error = capsys.readouterr().err
        assert one_line(error) and words in error
    assert main(["report", "--out", str(blocker / "reports")]) == 2
    assert one_line(capsys.readouterr().err)


def test_an_internal_error_is_one_line(monkeypatch, capsys):
    import convtally.analysis.cli as cli

    def broken(args):
        raise AttributeError("'NoneType' object has no attribute 'gens'")

    monkeypatch.delenv("CONVTALLY_DEBUG", raising=False)
    monkeypatch.setattr(cli, "run_padding", broken)
    assert main(["padding", "--kernel", "3"]) == 1
    error = capsys.readouterr().err
    assert one_line(error) and "internal error: AttributeError" in error
    assert "CONVTALLY_DEBUG=1" in error


def test_memory_limit_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("CONVTALLY_MEMORY_LIMIT", "1KiB")
    assert main(["table", "poolupsample"]) == 2
    error = capsys.readouterr().err
    assert one_line(error) and "more than the 1.0 KiB of memory available" in error
    monkeypatch.setenv("CONVTALLY_MEMORY_LIMIT", "lots")
    assert main(["table", "poolupsample"]) == 2
    assert "CONVTALLY_MEMORY_LIMIT: bad memory size 'lots'" in capsys.readouterr().err


def test_user_module_errors_show_the_users_file_and_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "brokenmod.py").write_text("x = 1\nraise RuntimeError('my bug')\n")
    (tmp_path / "syntaxmod.py").write_text("def f(:\n    pass\n")
    (tmp_path / "typemod.py").write_text(
        "from torch import nn\ndef build():\n    return nn.Linear('a', 3)\n"
        "def needs(n):\n    return nn.Linear(n, n)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("brokenmod:f", f"RuntimeError: my bug ({tmp_path / 'brokenmod.py'}, line 2)"),
        ("syntaxmod:f", f"SyntaxError: invalid syntax ({tmp_path / 'syntaxmod.py'}, line 1)"),
        ("typemod:build", "typemod:build() failed: TypeError: "),
        ("typemod:needs", "cannot call typemod:needs() without arguments"),
    ]
    for model, words in cases:
        assert main(["table", model]) == 2
        error = capsys.readouterr().err
        assert one_line(error) and words in error, error
    assert f"({tmp_path / 'typemod.py'}, line 3)" in _last_error(capsys, ["table", "typemod:build"])


def _last_error(capsys, argv) -> str:
    main(argv)
    return capsys.readouterr().err


def test_fault_table_in_docs_lists_every_case_and_no_payload_ran():
    """docs/faults.md is generated by docs/fault_table.py from a real run: every case is there."""
    from tests.scripts import load_script

    docs = Path(__file__).parents[2] / "docs"
    module = load_script("docs/fault_table.py")
    text = (docs / "faults.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | `" in line]
    assert [row.split(" | ")[0][2:] for row in rows] == [case.name for case in module.cases()]
    assert all(" | no | " in row for row in rows)
    for row in rows:
        code = int(row.split(" | ")[2])
        assert code in (0, 1, 2), row


def test_a_layer_without_a_rule_is_described_truthfully(tmp_path, monkeypatch, capsys):
    (tmp_path / "grunet.py").write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.gru = nn.GRU(4, 6, batch_first=True)  # no rule (nn.LSTM has one)
            def forward(self, x):
                return self.gru(self.conv(x).flatten(2).transpose(1, 2))[0]
        def build():
            return Net()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["table", "grunet:build", "--res", "16", "--capture", "fx"]) == 2
    error = capsys.readouterr().err
    assert one_line(error) and "gru: no rule for this layer" in error
    assert "output shape follows the input" not in error
