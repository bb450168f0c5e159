"""Checking a hand-derived cost table against the exact values, with a diagnosis per wrong cell.

A hand table is a CSV with columns layer, type, weights, outputs, connections (blank = 0),
optionally weights_formula, outputs_formula, connections_formula (plain or LaTeX-ish text such as
`$NF \\cdot H / 2$`) and resolution. Rows are aligned with the network's layers by type; a row
labelled Total is checked against the totals.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sympy as sp
from convtally.analysis.accounting import QUANTITIES, Analysis, H, W
from convtally.analysis.conventions import make_convention
from convtally.analysis.formatting import order_in_hw, resolution_label
from convtally.analysis.formula import FormulaError, formula_symbols, parse_formula_text
from tqdm import tqdm

REQUIRED = ("layer", "type")
NOT_GIVEN = frozenset({"", "-", "--", "n/a", "na", "?", "\u2013", "\u2014", "\u2012"})
INPUT_WORDS = ("input", "image", "data", "in ")
TYPE_ALIASES = {  # how hand tables name layers -> the module type they mean
    "conv": "conv2d", "convolution": "conv2d", "pool": "maxpool2d", "maxpool": "maxpool2d",
    "max pool": "maxpool2d", "avgpool": "avgpool2d", "avg pool": "avgpool2d",
    "fc": "linear", "dense": "linear", "fully connected": "linear", "bn": "batchnorm2d",
    "batchnorm": "batchnorm2d", "batch norm": "batchnorm2d", "upsampling": "upsample",
    "deconv": "convtranspose2d", "transposed conv": "convtranspose2d",
    "convtranspose": "convtranspose2d", "softmax": "softmax", "lrn": "localresponsenorm",
}
MAX_TABLE_BYTES = 10_000_000  # a hand table of a 1,000-layer network is about 100 kB
MAX_VALUE_DIGITS = 24


@dataclass
class HandRow:
    """One row of a hand-derived table."""

    line: int
    label: str
    type: str
    values: dict[str, int | None]
    formulas: dict[str, str]
    source: str = ""  # the file it was read from, for error messages
    tolerances: dict[str, int] = field(default_factory=dict)  # '3.2M' is 3,200,000 +- 50,000

    @property
    def is_total(self) -> bool:
        """Return True for the Total row."""
        return self.label.strip().lower() in ("total", "totals", "sum")

    @property
    def is_input(self) -> bool:
        """Return True for a row that describes the input (INPUT, Image, data)."""
        words = f"{self.label} {self.type}".strip().lower()
        return words.startswith(INPUT_WORDS)


@dataclass
class CellCheck:
    """One checked cell: hand value against the exact one, with a diagnosis when they differ."""

    row: str
    layer: str
    quantity: str
    resolution: str
    hand: int
    exact: int
    formula: str = ""
    diagnoses: list[str] = field(default_factory=list)
    formula_problem: str = ""
    alternative: dict[str, int] = field(default_factory=dict)  # switch -> its value here
    explained_by: str = ""  # the switch the whole table follows, when this cell follows it
    tolerance: int = 0  # a rounded hand value ('3.2M') is right within half its last digit

    @property
    def wrong(self) -> bool:
        """Return True when the value or the formula is wrong (under the table's convention,
        when the whole table follows one switch)."""
        off = abs(self.hand - self.exact) > self.tolerance
        return (off and not self.explained_by) or bool(self.formula_problem)


@dataclass
class TableCheck:
    """The result of checking one or more hand tables of one network."""

    model: str
    resolutions: list[str]
    cells: list[CellCheck]
    unmatched_rows: list[str]
    convention: dict
    layer_count: int = 0  # layers of the network
    unlisted: dict[str, list[str]] = field(default_factory=dict)  # resolution -> layers not listed
    unlisted_with_weights: dict[str, list[str]] = field(default_factory=dict)
    not_given: int = 0  # cells the table leaves blank (or -, n/a, ?)
    suggestions: list[str] = field(default_factory=list)  # conventions the table follows

    @property
    def incomplete(self) -> bool:
        """Return True when a table lists under half the layers or leaves out one with weights."""
        return any(
            2 * len(names) > self.layer_count or self.unlisted_with_weights.get(label)
            for label, names in self.unlisted.items()
        )

    def coverage(self) -> str:
        """Return one line per resolution saying how much of the network its table lists."""
        lines = []
        for label, names in self.unlisted.items():
            listed = self.layer_count - len(names)
            line = f"the table at {label} lists {listed} of the network's {self.layer_count} layers"
            heavy = self.unlisted_with_weights.get(label, [])
            if heavy:
                shown = ", ".join(heavy[:6]) + (f", ... (+{len(heavy) - 6} more)"
                                                  if len(heavy) > 6 else "")
                line += f"; it leaves out {len(heavy)} layer(s) with weights: {shown}"
            lines.append(line)
        return "\n".join(lines)

    @property
    def wrong(self) -> list[CellCheck]:
        """Return the wrong cells."""
        return [c for c in self.cells if c.wrong]

    def summary(self) -> str:
        """Return the one-line summary."""
        return (
            f"checked {len(self.cells)} cells of {self.model} at "
            f"{', '.join(self.resolutions)}: {len(self.wrong)} wrong, "
            f"{len(self.cells) - len(self.wrong)} right, {self.not_given} not given"
        )

    def diagnosis_counts(self) -> dict[str, int]:
        """Return how many wrong cells have each kind of diagnosis, most frequent first."""
        counts = Counter(kind for c in self.wrong for kind in diagnosis_kinds(c))
        return dict(counts.most_common())

    def to_dict(self) -> dict:
        """Return JSON-ready data."""
        return {
            "model": self.model,
            "resolutions": self.resolutions,
            "convention": self.convention,
            "summary": self.summary(),
            "unmatched_rows": self.unmatched_rows,
            "layer_count": self.layer_count,
            "unlisted": self.unlisted,
            "incomplete": self.incomplete,
            "not_given": self.not_given,
            "suggestions": self.suggestions,
            "diagnosis_counts": self.diagnosis_counts(),
            "cells": [{**asdict(c), "wrong": c.wrong} for c in self.cells],
        }


def read_hand_table(path: str | Path) -> dict[str | None, list[HandRow]]:
    """Return resolution label (None when the file has no resolution column) -> rows."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"hand table {path} is a directory; give the CSV file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"hand table {path} does not exist")
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise ValueError(
            f"hand table {path} is {size:,} bytes; a hand table is at most "
            f"{MAX_TABLE_BYTES:,} bytes (is it the right file?)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often add a BOM
    except UnicodeDecodeError:
        raise ValueError(f"hand table {path} is not UTF-8 text; save it as CSV (UTF-8)") from None
    try:
        return _parse_hand_table(text, path)
    except csv.Error as error:
        raise ValueError(f"hand table {path} is not valid CSV ({error}); save it as CSV") from None


def _parse_hand_table(text: str, path: Path) -> dict[str | None, list[HandRow]]:
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        given = [c for c in columns if c in QUANTITIES or c.removesuffix("_formula") in QUANTITIES]
        if missing or not given:
            raise ValueError(
                f"hand table {path} lacks column(s) "
                f"{', '.join(missing) or 'weights, outputs or connections'}; expected layer, "
                "type and at least one of weights, outputs, connections (+ *_formula, resolution)"
            )
        tables: dict[str | None, list[HandRow]] = {}
        for raw in reader:
            line = reader.line_num
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            cells = {q: _cell_value(row.get(q, ""), q, path, line) for q in QUANTITIES}
            values = {q: value for q, (value, _) in cells.items()}
            tolerances = {q: tolerance for q, (_, tolerance) in cells.items() if tolerance}
            formulas = {q: _formula_cell(row.get(f"{q}_formula", "")) for q in QUANTITIES}
            hand_row = HandRow(line, row["layer"], row["type"], values, formulas, str(path),
                               tolerances)
            if not row["type"] and not hand_row.is_total and not hand_row.is_input:
                continue  # a heading or a blank line
            resolution = row.get("resolution") or None
            tables.setdefault(resolution, []).append(hand_row)
    if not tables:
        raise ValueError(f"hand table {path} has no rows")
    return tables


def _formula_cell(text: str) -> str:
    """Return a formula cell, '' when it says the formula is not given."""
    return "" if text.strip().lower() in NOT_GIVEN else text


def _cell_value(text: str, quantity: str, path: Path, line: int) -> tuple[int | None, int]:
    """Return a value cell as (int, tolerance): None when not given; '3.2M' or '150K' as the
    value it rounds, right within half its last digit or 1%. One-line ValueError if malformed."""
    digits = text.replace(",", "").replace("=", "").replace("~", "").replace("_", "x").strip()
    if digits.lower() in NOT_GIVEN:
        return None, 0
    rounded = re.fullmatch(r"([0-9]{1,12})(?:\.([0-9]{1,6}))?\s*([kKmMgGbB])", digits)
    if rounded:
        whole, fraction, unit = rounded.group(1), rounded.group(2) or "", rounded.group(3)
        scale = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[unit.lower()]
        step = scale // 10 ** len(fraction)
        value = int(whole + fraction) * step
        return value, max(step // 2, value // 100)  # rounded: to its last digit, or within 1%
    if len(digits) > MAX_VALUE_DIGITS or not re.fullmatch(r"[+-]?[0-9]+", digits):
        raise ValueError(
            f"hand table {path} line {line}: {quantity} {_shorten(text)} is not an integer "
            f"(of at most {MAX_VALUE_DIGITS} digits; 3.2M and 150K are read as rounded)"
        )
    return int(digits), 0


def parse_formula(text: str, symbols: Mapping[str, sp.Symbol]) -> sp.Expr | None:
    """Return a hand formula as sympy ('$NF \\cdot H / 2$' and 'NF * H / 2' alike), or None.

    The text is parsed, never evaluated (analysis.formula); FormulaError when it is not a formula.
    """
    return parse_formula_text(text, symbols)


def _cell_formula(row: HandRow, quantity: str, symbols: Mapping[str, sp.Symbol]) -> sp.Expr | None:
    """Return the row's formula for `quantity`; a one-line ValueError naming the cell if bad."""
    try:
        return parse_formula(row.formulas[quantity], symbols)
    except FormulaError as error:
        where = f"hand table {row.source} line {row.line}" if row.source else f"line {row.line}"
        raise ValueError(
            f"{where}, {quantity}_formula {_shorten(row.formulas[quantity])}: {error}"
        ) from None


def _shorten(text: str, limit: int = 40) -> str:
    """Return `text` quoted, cut to `limit` characters with '...' when longer."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def canonical_type(text: str) -> str:
    """Return the module type a hand table's type cell means ('CONV3-64' -> 'conv2d')."""
    words = text.strip().lower()
    if words in TYPE_ALIASES.values():
        return words
    for alias, meaning in sorted(TYPE_ALIASES.items(), key=lambda item: -len(item[0])):
        if words == alias or re.match(rf"{re.escape(alias)}[\s\d\-_x(]", words):
            return meaning
    return words


def _align(rows: Sequence[HandRow], analysis: Analysis) -> list[tuple[HandRow, int | None]]:
    layer_types = [layer.type.lower() for layer in analysis.layers]
    row_types = [canonical_type(row.type) for row in rows]
    matcher = difflib.SequenceMatcher(a=row_types, b=layer_types, autojunk=False)
    pairs: dict[int, int] = {}
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            pairs[block.a + offset] = block.b + offset
    return [(row, pairs.get(i)) for i, row in enumerate(rows)]


def check_table(
    analysis: Analysis,
    tables: Mapping[str | None, Sequence[HandRow]],
    resolutions: Sequence[tuple[int, int]],
) -> TableCheck:
    """Return every given cell of the hand tables checked against `analysis`, with diagnoses."""
    analysis.require_images("convtally check-table")
    labels = [resolution_label(*r) for r in resolutions]
    by_label = dict(zip(labels, resolutions, strict=True))
    if None in tables:
        if len(resolutions) != 1:
            raise ValueError("the hand table has no resolution column: give exactly one --res")
        tables = {labels[0]: tables[None]}
    unknown = [label for label in tables if label not in by_label]
    if unknown:
        raise ValueError(
            f"the hand table has resolution(s) {', '.join(unknown)}; "
            f"pass them with --res (got {', '.join(labels) or 'none'})"
        )
    symbols = {s.name: s for s in (H, W)}
    symbols.update(formula_symbols(["B", *analysis.hyperparameters]))
    points = [by_label[label] for label in tables]
    values = analysis.evaluate(points)
    alternatives = _alternative_values(analysis, points)
    check = TableCheck(
        model=analysis.model,
        resolutions=list(tables),
        cells=[],
        unmatched_rows=[],
        convention=analysis.convention.as_dict(),
        layer_count=len(analysis.layers),
    )
    hand_by_layer: dict[tuple[int, str], dict[str, int]] = {}
    for j, (label, rows) in enumerate(tables.items()):
        height, width = by_label[label]
        at = {H: height, W: width, **analysis.substitutions()}
        context = _Context(analysis, values, alternatives, symbols, label, j, at)
        data_rows = [r for r in rows if not r.is_total and not r.is_input]
        alignment = _align(data_rows, analysis)
        listed = sorted({index for _, index in alignment if index is not None})
        unlisted = [i for i in range(len(analysis.layers)) if i not in listed]
        check.unlisted[label] = [_layer_name(analysis, i) for i in unlisted]
        check.unlisted_with_weights[label] = [
            _layer_name(analysis, i) for i in unlisted if values["weights"][i, j] != 0
        ]
        for row in rows:
            if row.is_input:
                check.cells.extend(_check_input_row(row, context, check))
        # a bar on a terminal only, for tables big enough to take a while (formula cells)
        for row, index in tqdm(alignment, desc=f"check-table {label}", unit="row", leave=False,
                               disable=None if len(alignment) > 50 else True):
            if index is None:
                check.unmatched_rows.append(f"line {row.line}: {row.label} {row.type}".strip())
                continue
            for quantity in QUANTITIES:
                cell = _check_cell(row, index, quantity, context)
                if cell is None:
                    check.not_given += 1
                    continue
                hand_by_layer.setdefault((index, quantity), {})[label] = cell.hand
                check.cells.append(cell)
        _explain_by_convention(check.cells, label, alternatives, check)
        for row in (r for r in rows if r.is_total):
            for quantity in QUANTITIES:
                hand = row.values[quantity]
                if hand is None:
                    check.not_given += 1
                    continue
                check.cells.append(_check_total(
                    hand, row.tolerances.get(quantity, 0), quantity, context, check, listed,
                    unlisted,
                ))
    _diagnose_growth(check.cells, hand_by_layer, analysis, tables, values)
    return check


@dataclass
class _Context:
    """What checking one table at one resolution needs: the network's values and the point."""

    analysis: Analysis
    values: dict
    alternatives: dict[str, dict]
    symbols: dict[str, sp.Symbol]
    label: str
    column: int
    at: dict


def _layer_name(analysis: Analysis, index: int) -> str:
    layer = analysis.layers[index]
    return f"{layer.name} ({layer.type})"


def _check_cell(row: HandRow, index: int, quantity: str, context: _Context) -> CellCheck | None:
    """Return one layer cell checked, or None when the table does not give it."""
    analysis, at = context.analysis, context.at
    layer = analysis.layers[index]
    formula = _cell_formula(row, quantity, context.symbols)
    hand = row.values[quantity]
    if hand is None and formula is None:
        return None
    exact = int(context.values[quantity][index, context.column])
    cell = CellCheck(
        row=f"{row.label} {row.type}".strip(),
        layer=layer.name,
        quantity=quantity,
        resolution=context.label,
        hand=hand,
        exact=exact,
        formula=row.formulas[quantity],
    )
    cell.tolerance = tolerance = row.tolerances.get(quantity, 0)
    cell.alternative = {
        flag: int(values[quantity][index, context.column])
        for flag, values in context.alternatives.items()
    }
    exact_formula = layer.formula(quantity)
    if formula is not None:
        own = formula.subs(at)
        if hand is None:
            if not own.is_Integer:
                cell.formula_problem = f"formula {sp.sstr(formula)} gives {own}, not a whole number"
                cell.hand = 0
                return cell
            cell.hand = hand = int(own)
            if hand != exact:
                cell.diagnoses.append("value taken from the formula (the value cell is blank)")
        elif abs(own - hand) > tolerance:
            cell.diagnoses.append(f"the value does not follow from its own formula ({own})")
        if not formula.free_symbols:  # '224*224*64': how the value was computed, not a formula
            exact_formula = formula
        difference = sp.simplify((formula - exact_formula).subs(analysis.substitutions()))
        if difference != 0 and own == exact:
            other = _distinguishing_point(formula, exact_formula, analysis, at)
            cell.formula_problem = (
                f"formula {sp.sstr(formula)} gives the right value here but is not "
                f"{exact_formula}{other}"
            )
        elif difference != 0 and abs(hand - exact) <= tolerance:
            cell.formula_problem = (
                f"formula {sp.sstr(formula)} is not {exact_formula}: it gives {own} here, "
                f"although the value {hand:,} is right"
            )
        if difference != 0 and order_in_hw(formula) != order_in_hw(exact_formula):
            cell.diagnoses.append(
                f"the formula grows as {order_in_hw(formula)} in the input size; "
                f"the layer's {quantity} grow as {order_in_hw(exact_formula)}"
            )
    if abs(hand - exact) > tolerance:
        cell.diagnoses.extend(_diagnose(layer, quantity, hand, exact, at, context, index))
    return cell


def _check_input_row(row: HandRow, context: _Context, check: TableCheck) -> list[CellCheck]:
    """Return the input row's given cells: outputs = the input's values, weights and
    connections 0."""
    analysis = context.analysis
    height, width = context.at[H], context.at[W]
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    cells = []
    for quantity in QUANTITIES:
        hand = row.values[quantity]
        if hand is None:
            formula = _cell_formula(row, quantity, context.symbols)
            if formula is None:
                continue
            hand = formula.subs(context.at)
            hand = int(hand) if hand.is_Integer else -1
        exact = channels * height * width if quantity == "outputs" else 0
        cell = CellCheck(f"{row.label} {row.type}".strip(), "(input)", quantity, context.label,
                         hand, exact, row.formulas[quantity],
                         tolerance=row.tolerances.get(quantity, 0))
        if cell.wrong and quantity == "outputs":
            cell.diagnoses.append(
                f"the input is {channels}x{height}x{width} = {exact:,} values"
            )
        cells.append(cell)
    return cells


def _check_total(hand: int, tolerance: int, quantity: str, context: _Context,
                 check: TableCheck, listed: list[int], unlisted: list[int]) -> CellCheck:
    """Return the Total cell checked against the network's total and against the total over
    the layers the table lists; the difference explained by rows, blanks and left-out layers."""
    analysis, label, column = context.analysis, context.label, context.column
    column_values = [int(v) for v in context.values[quantity][:, column]]
    network = sum(column_values)
    over_listed = sum(column_values[i] for i in listed)
    input_cells = [c for c in check.cells if c.layer == "(input)" and c.quantity == quantity
                   and c.resolution == label]
    input_values = input_cells[0].exact if input_cells else 0
    cell = CellCheck("Total", "(total)", quantity, label, hand, network, tolerance=tolerance)

    def near(value: int) -> bool:
        return abs(hand - value) <= tolerance

    unlisted_weightless = all(
        int(context.values["weights"][i, column]) == 0 for i in unlisted
    )
    left_out = _left_out_by_type(analysis, unlisted, column_values)
    if near(network) or near(network + input_values):
        if not near(network):
            cell.exact = network + input_values
            cell.diagnoses.append(f"includes the input's {input_values:,} values")
        return cell
    if (near(over_listed) or near(over_listed + input_values)) and unlisted:
        with_input = not near(over_listed)
        cell.exact = over_listed + input_values * with_input if unlisted_weightless else network
        note = f"equals the sum over the {len(listed)} layers the table lists; {left_out}"
        if with_input:
            note += f"; includes the input's {input_values:,} values"
        if not unlisted_weightless:
            note = "the total leaves out " + ", ".join(
                _layer_values(analysis, i, context) for i in unlisted
                if int(context.values["weights"][i, column]) != 0
            ) + f"; it equals the sum over the {len(listed)} layers the table lists"
        cell.diagnoses.append(note)
        return cell
    for flag in {c.explained_by for c in check.cells if c.explained_by and c.resolution == label}:
        column_alternative = context.alternatives[flag][quantity][:, column]
        for indices, name in ((range(len(column_values)), "the network's total"),
                              (listed, "the total over the layers it lists")):
            if near(sum(int(column_alternative[i]) for i in indices)):
                cell.explained_by = flag
                cell.diagnoses.append(f"{name} under the table's convention ({flag})")
                return cell
    cell.diagnoses.append(
        _explain_total(check.cells, quantity, context, hand, network, over_listed, unlisted,
                       left_out)
    )
    return cell


def _layer_values(analysis: Analysis, index: int, context: _Context) -> str:
    """Return 'block4.0 (Conv2d): 5,208 weights, 24,576 outputs, 5,308,416 connections'."""
    parts = ", ".join(
        f"{int(context.values[q][index, context.column]):,} {q}" for q in QUANTITIES
    )
    return f"{_layer_name(analysis, index)}: {parts}"


def _left_out_by_type(analysis: Analysis, unlisted: list[int], column_values: list[int]) -> str:
    """Return 'leaves out 15 ReLU, 2 Dropout, 1 Flatten: 13,614,080' (quantity named later)."""
    if not unlisted:
        return "the table lists every layer"
    counts = Counter(analysis.layers[i].type for i in unlisted)
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    return f"it leaves out {kinds}: {sum(column_values[i] for i in unlisted):,}"


def _distinguishing_point(formula, exact_formula, analysis, at) -> str:
    for height, width in ((at[H], 2 * at[W]), (2 * at[H], at[W])):
        point = {**at, H: height, W: width}
        mine, theirs = formula.subs(point), exact_formula.subs(point)
        if mine != theirs:
            return f" (at {height}x{width} it gives {mine}, not {theirs})"
    return ""


def _alternative_values(analysis: Analysis, resolutions) -> dict[str, dict]:
    """Evaluate the same network under each single-switch change of its convention."""
    base = analysis.convention
    switches = {
        "--bias-connections": make_convention(bias_in_connections=True, base=base),
        "--no-batchnorm-weights": make_convention(batchnorm_in_weights=False, base=base),
        "--no-elementwise-connections": make_convention(
            elementwise_in_connections=False, base=base
        ),
    }
    alternatives = {
        flag: analysis.with_convention(convention).evaluate(resolutions)
        for flag, convention in switches.items()
        if convention != base
    }
    if base.bias_in_weights:
        alternatives["--no-bias-weights"] = analysis.with_convention(
            make_convention(bias_in_weights=False, base=base)
        ).evaluate(resolutions)
    return alternatives


MEANINGS = {
    "--bias-connections": "counts one bias connection per output",
    "--no-batchnorm-weights": "leaves BatchNorm's parameters out of the weights",
    "--no-elementwise-connections": "counts no connections for this element-wise layer",
    "--no-bias-weights": "counts weights without biases",
}
TABLE_MEANINGS = {
    "--bias-connections": "every row counts one bias connection per output: the table counts "
    "biases in connections",
    "--no-batchnorm-weights": "every BatchNorm row leaves its parameters out: the table counts "
    "weights without BatchNorm",
    "--no-elementwise-connections": "every element-wise row counts no connections: the table "
    "leaves element-wise layers out of connections",
    "--no-bias-weights": "every conv/linear row omits exactly its biases: the table counts "
    "weights without biases",
}


def _explain_by_convention(cells: list[CellCheck], label: str, alternatives: dict,
                           check: TableCheck) -> None:
    """Where every given cell that a switch changes matches that switch, say so once for the
    table (a suggestion) instead of flagging each row."""
    for flag in alternatives:
        affected = [c for c in cells if c.resolution == label and c.alternative.get(flag)
                    is not None and c.alternative[flag] != c.exact]
        if not affected or any(abs(c.hand - c.alternative[flag]) > c.tolerance
                               for c in affected):
            continue
        for cell in affected:
            cell.explained_by = flag
        suggestion = f"{TABLE_MEANINGS[flag]}; rerun with {flag}"
        if suggestion not in check.suggestions:
            check.suggestions.append(suggestion)


def _diagnose(layer, quantity, hand, exact, at, context: _Context, index: int) -> list[str]:
    notes = []
    cost = layer.cost
    channels = layer.output_shape[0].subs(at) if layer.output_shape else None
    if quantity == "weights" and layer.kind in ("conv", "linear") and channels is not None:
        if exact - hand == channels and cost.bias_connections != 0:
            notes.append(f"omits the layer's {channels} biases (one per output channel)")
        elif hand - exact == channels:
            notes.append(f"adds {channels} biases the layer does not have")
    for flag, values in context.alternatives.items():
        if int(values[quantity][index, context.column]) == hand:
            if flag == "--no-bias-weights" and notes:
                continue  # already said: omits the biases
            notes.append(f"{MEANINGS[flag]} (matches the {flag} convention)")
    if not notes and exact and hand % exact == 0 and hand // exact > 1:
        notes.append(f"{hand // exact} times the exact value")
    return notes


def _explain_total(cells, quantity, context: _Context, hand, network, over_listed, unlisted,
                   left_out) -> str:
    """Return why a Total cell is off: the wrong rows, blanks, or layers the table leaves out."""
    label, analysis = context.label, context.analysis
    column_values = [int(v) for v in context.values[quantity][:, context.column]]
    row_cells = [c for c in cells if c.quantity == quantity and c.resolution == label
                 and c.layer not in ("(total)", "(input)")]
    off = [c for c in row_cells if c.hand != c.exact]
    deltas = sum(c.hand - c.exact for c in off)
    parts = ", ".join(f"{c.row} ({c.hand - c.exact:+d})" for c in off)
    for reference, name in ((network, "the network's total"),
                            (over_listed, "the total over the layers it lists")):
        if off and deltas == hand - reference and (reference == network or not unlisted):
            return f"off by {hand - network:+d}, exactly the wrong rows: {parts}"
        if off and deltas == hand - reference:
            return f"off by {hand - reference:+d} from {name}, exactly the wrong rows: {parts}"
    given = {c.layer for c in row_cells}
    blank = [i for i, layer in enumerate(analysis.layers)
             if layer.name not in given and i not in unlisted and column_values[i]]
    blank_sum = sum(column_values[i] for i in blank)
    if blank and deltas - blank_sum == hand - network:
        names = ", ".join(_layer_name(analysis, i) for i in blank[:6])
        more = f", ... (+{len(blank) - 6} more)" if len(blank) > 6 else ""
        return (f"off by {hand - network:+d}: the wrong rows ({parts or 'none'}) and the "
                f"blank {quantity} cells counted as 0: {names}{more} ({-blank_sum:+,})")
    shortfall = network - hand - deltas
    for group, members in _unlisted_groups(analysis, unlisted):
        if shortfall == sum(column_values[i] for i in members) and shortfall:
            named = ", ".join(_layer_values(analysis, i, context) for i in members[:3])
            more = f", ... (+{len(members) - 3} more)" if len(members) > 3 else ""
            return f"off by {hand - network:+d}: the total leaves out {group}: {named}{more}"
    own_sum = sum(c.hand for c in row_cells)
    if own_sum == hand:
        return f"off by {hand - network:+,}: the sum of the table's own rows; {left_out}"
    listed_note = (f"; the total over the layers it lists is {over_listed:,}" if unlisted
                   else "")
    return (f"off by {hand - network:+,} from the network's total{listed_note}; the table's "
            f"rows add up to {own_sum:,}; {left_out}")


def _unlisted_groups(analysis: Analysis, unlisted: list[int]):
    """Yield (description, layer indices): each unlisted layer, each type, and all of them."""
    for i in unlisted:
        yield _layer_name(analysis, i), [i]
    by_type: dict[str, list[int]] = {}
    for i in unlisted:
        by_type.setdefault(analysis.layers[i].type, []).append(i)
    if len(by_type) > 1 or any(len(v) > 1 for v in by_type.values()):
        for kind, members in by_type.items():
            if len(members) > 1:
                yield f"{len(members)} {kind} layers", members
    if len(unlisted) > 1:
        yield f"all {len(unlisted)} layers it does not list", unlisted


def _diagnose_growth(cells, hand_by_layer, analysis, tables, values) -> None:
    labels = list(tables)
    if len(labels) < 2:
        return
    for (index, quantity), by_label in hand_by_layer.items():
        for first, second in zip(labels, labels[1:]):
            if first not in by_label or second not in by_label:
                continue
            a, b = by_label[first], by_label[second]
            j1, j2 = labels.index(first), labels.index(second)
            e1, e2 = int(values[quantity][index, j1]), int(values[quantity][index, j2])
            if not (a and e1) or b * e1 == e2 * a:
                continue
            note = (
                f"grows x{b / a:g} from {first} to {second}; the exact value grows "
                f"x{e2 / e1:g}: wrong power of the resolution"
            )
            for cell in cells:
                if (
                    cell.layer == analysis.layers[index].name
                    and cell.quantity == quantity
                    and cell.resolution == second
                    and note not in cell.diagnoses
                ):
                    cell.diagnoses.append(note)


DIAGNOSIS_KINDS = (  # (kind, words that mark it), first match wins
    ("formula right here only", "gives the right value here"),
    ("formula wrong, value right", "although the value"),
    ("not from its own formula", "does not follow from its own formula"),
    ("missing biases", "omits the layer's"),
    ("extra biases", "biases the layer does not have"),
    ("bias in connections", "--bias-connections"),
    ("BatchNorm weights left out", "--no-batchnorm-weights"),
    ("element-wise layers left out", "--no-elementwise-connections"),
    ("weights without biases", "--no-bias-weights"),
    ("wrong power of the resolution", "wrong power of the resolution"),
    ("wrong growth of the formula", "the formula grows as"),
    ("a multiple of the exact value", "times the exact value"),
    ("layers left out of the total", "the total leaves out"),
    ("total off by its wrong rows", "exactly the wrong rows"),
    ("blank cells in the total", "blank"),
    ("total not explained", "from the network's total"),
    ("input", "the input is"),
)


def diagnosis_kinds(cell: CellCheck) -> list[str]:
    """Return the kinds of diagnosis a wrong cell has ('no single cause found' when none)."""
    texts = ([cell.formula_problem] if cell.formula_problem else []) + cell.diagnoses
    kinds = []
    for text in texts:
        kind = next((k for k, words in DIAGNOSIS_KINDS if words in text), "other")
        if kind not in kinds:
            kinds.append(kind)
    return kinds or ["no single cause found"]


def _why(cell: CellCheck) -> str:
    texts = ([cell.formula_problem] if cell.formula_problem else []) + cell.diagnoses
    return "; ".join(texts) or "no single cause found"


def render_check(result: TableCheck, fmt: str) -> str:
    """Return the check as 'text', 'markdown', 'csv' or 'json'."""
    import json

    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["row", "layer", "quantity", "resolution", "hand", "exact", "wrong",
                         "kinds", "diagnosis"])
        for c in result.cells:
            writer.writerow([c.row, c.layer, c.quantity, c.resolution, c.hand, c.exact,
                             int(c.wrong), "; ".join(diagnosis_kinds(c)) if c.wrong else "",
                             _why(c) if c.wrong or c.diagnoses else ""])
        return buffer.getvalue()
    counts = result.diagnosis_counts()
    notes = [f"suggestion: {s}" for s in result.suggestions] + result.coverage().splitlines()
    if counts:
        notes.append("diagnoses: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    lines = []
    if fmt == "markdown":
        lines.append(f"**{result.summary()}**\n")
        lines.append("| row | layer | quantity | res | hand | exact | diagnosis |")
        lines.append("|---|---|---|---|---:|---:|---|")
        for c in result.wrong:
            lines.append(
                f"| {c.row} | {c.layer} | {c.quantity} | {c.resolution} | {c.hand:,} | "
                f"{c.exact:,} | {_why(c)} |"
            )
        if result.unmatched_rows:
            lines.append(f"\nRows not matched to a layer: {', '.join(result.unmatched_rows)}")
        lines.append("\n" + "  \n".join(notes))
        return "\n".join(lines) + "\n"
    for c in result.wrong:
        lines.append(
            f"WRONG {c.row:<14} {c.layer:<10} {c.quantity:<11} @{c.resolution:<6} "
            f"hand {c.hand:>10,}  exact {c.exact:>10,}  {_why(c)}"
        )
    for c in result.cells:
        if not c.wrong and c.layer == "(total)" and c.diagnoses:
            lines.append(f"NOTE  {c.row:<14} {c.layer:<10} {c.quantity:<11} @{c.resolution:<6} "
                         f"hand {c.hand:>10,}  right: {_why(c)}")
    for row in result.unmatched_rows:
        lines.append(f"UNMATCHED {row}")
    lines.extend(notes)
    lines.append(result.summary())
    return "\n".join(lines) + "\n"
