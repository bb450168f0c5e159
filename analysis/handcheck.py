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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sympy as sp

from analysis.accounting import QUANTITIES, Analysis, H, W
from analysis.conventions import make_convention
from analysis.formatting import order_in_hw, resolution_label
from analysis.formula import FormulaError, formula_symbols, parse_formula_text

REQUIRED = ("layer", "type", "weights", "outputs", "connections")
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


@dataclass
class CellCheck:
    """One checked cell: hand value against the exact one, with a diagnosis when they differ."""

    row: str
    layer: str
    quantity: str
    resolution: str
    hand: int | None
    exact: int
    formula: str = ""
    diagnoses: list[str] = field(default_factory=list)
    formula_problem: str = ""

    @property
    def wrong(self) -> bool:
        """Return True when the value or the formula is wrong."""
        return self.hand != self.exact or bool(self.formula_problem)


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
            f"{len(self.cells) - len(self.wrong)} right"
        )

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
        if missing:
            raise ValueError(
                f"hand table {path} lacks column(s) {', '.join(missing)}; "
                f"expected {', '.join(REQUIRED)} (+ *_formula, resolution)"
            )
        tables: dict[str | None, list[HandRow]] = {}
        for raw in reader:
            line = reader.line_num
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            if not row["type"] and row["layer"].lower() not in ("total",):
                continue  # e.g. the write-up's 'Image' row
            values = {}
            for quantity in QUANTITIES:
                values[quantity] = _cell_value(row[quantity], quantity, path, line)
            formulas = {q: row.get(f"{q}_formula", "") for q in QUANTITIES}
            resolution = row.get("resolution") or None
            tables.setdefault(resolution, []).append(
                HandRow(line, row["layer"], row["type"], values, formulas, str(path))
            )
    if not tables:
        raise ValueError(f"hand table {path} has no rows")
    return tables


def _cell_value(text: str, quantity: str, path: Path, line: int) -> int | None:
    """Return a value cell as an int (None when blank); a one-line ValueError when it is not."""
    digits = text.replace(",", "").replace("=", "").replace("_", "x").strip()
    if not digits:
        return None
    if len(digits) > MAX_VALUE_DIGITS or not re.fullmatch(r"[+-]?[0-9]+", digits):
        raise ValueError(
            f"hand table {path} line {line}: {quantity} {_shorten(text)} is not an integer "
            f"(of at most {MAX_VALUE_DIGITS} digits)"
        )
    return int(digits)


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


def _align(rows: Sequence[HandRow], analysis: Analysis) -> list[tuple[HandRow, int | None]]:
    layer_types = [layer.type.lower() for layer in analysis.layers]
    row_types = [row.type.lower() for row in rows]
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
    """Return every cell of the hand tables checked against `analysis`, with diagnoses."""
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
    values = analysis.evaluate([by_label[label] for label in tables])
    alternatives = _alternative_values(analysis, [by_label[label] for label in tables])
    cells, unmatched = [], []
    unlisted: dict[str, list[str]] = {}
    unlisted_with_weights: dict[str, list[str]] = {}
    hand_by_layer: dict[tuple[int, str], dict[str, int | None]] = {}
    for j, (label, rows) in enumerate(tables.items()):
        height, width = by_label[label]
        at = {H: height, W: width, **analysis.substitutions()}
        data_rows = [r for r in rows if r.label.lower() != "total"]
        alignment = _align(data_rows, analysis)
        listed = {index for _, index in alignment if index is not None}
        missing = [i for i in range(len(analysis.layers)) if i not in listed]
        unlisted[label] = [f"{analysis.layers[i].name} ({analysis.layers[i].type})" for i in missing]
        unlisted_with_weights[label] = [
            f"{analysis.layers[i].name} ({analysis.layers[i].type})"
            for i in missing
            if values["weights"][i, j] != 0
        ]
        for row, index in alignment:
            if index is None:
                unmatched.append(f"line {row.line}: {row.label} {row.type}".strip())
                continue
            layer = analysis.layers[index]
            for quantity in QUANTITIES:
                exact = int(values[quantity][index, j])
                hand = row.values[quantity] if row.values[quantity] is not None else 0
                hand_by_layer.setdefault((index, quantity), {})[label] = hand
                cell = CellCheck(
                    row=f"{row.label} {row.type}".strip(),
                    layer=layer.name,
                    quantity=quantity,
                    resolution=label,
                    hand=hand,
                    exact=exact,
                    formula=row.formulas[quantity],
                )
                formula = _cell_formula(row, quantity, symbols)
                exact_formula = layer.formula(quantity)
                if formula is not None:
                    own = formula.subs(at)
                    if own != hand:
                        cell.diagnoses.append(
                            f"the value does not follow from its own formula ({own})"
                        )
                    difference = sp.simplify(
                        (formula - exact_formula).subs(analysis.substitutions())
                    )
                    if difference != 0 and hand == exact:
                        other = _distinguishing_point(formula, exact_formula, analysis, at)
                        cell.formula_problem = (
                            f"formula {sp.sstr(formula)} gives the right value here but is not "
                            f"{exact_formula}{other}"
                        )
                    if difference != 0 and order_in_hw(formula) != order_in_hw(exact_formula):
                        cell.diagnoses.append(
                            f"the formula grows as {order_in_hw(formula)} in the input size; "
                            f"the layer's {quantity} grow as {order_in_hw(exact_formula)}"
                        )
                if hand != exact:
                    cell.diagnoses.extend(
                        _diagnose(layer, quantity, hand, exact, at, alternatives, index, j)
                    )
                cells.append(cell)
        totals = [r for r in rows if r.label.lower() == "total"]
        for row in totals:
            for quantity in QUANTITIES:
                if row.values[quantity] is None:
                    continue
                exact = int(values[quantity][:, j].sum())
                cell = CellCheck(
                    row="Total",
                    layer="(total)",
                    quantity=quantity,
                    resolution=label,
                    hand=row.values[quantity],
                    exact=exact,
                )
                if cell.hand != exact:
                    cell.diagnoses.append(_explain_total(cells, quantity, label, exact, cell.hand))
                cells.append(cell)
    _diagnose_growth(cells, hand_by_layer, analysis, tables, values)
    return TableCheck(
        model=analysis.model,
        resolutions=list(tables),
        cells=cells,
        unmatched_rows=unmatched,
        convention=analysis.convention.as_dict(),
        layer_count=len(analysis.layers),
        unlisted=unlisted,
        unlisted_with_weights=unlisted_with_weights,
    )


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
    return {
        flag: analysis.with_convention(convention).evaluate(resolutions)
        for flag, convention in switches.items()
        if convention != base
    }


def _diagnose(layer, quantity, hand, exact, at, alternatives, index, j) -> list[str]:
    notes = []
    cost = layer.cost
    channels = layer.output_shape[0].subs(at) if layer.output_shape else None
    if quantity == "weights" and layer.kind in ("conv", "linear") and channels is not None:
        if exact - hand == channels and cost.bias_connections != 0:
            notes.append(f"omits the layer's {channels} biases (one per output channel)")
        elif hand - exact == channels:
            notes.append(f"adds {channels} biases the layer does not have")
    for flag, values in alternatives.items():
        if int(values[quantity][index, j]) == hand:
            meaning = {
                "--bias-connections": "counts one bias connection per output",
                "--no-batchnorm-weights": "leaves BatchNorm's parameters out of the weights",
                "--no-elementwise-connections": "counts no connections for this element-wise layer",
            }[flag]
            notes.append(f"{meaning} (matches the {flag} convention)")
    if not notes and exact and hand % exact == 0 and hand // exact > 1:
        notes.append(f"{hand // exact} times the exact value")
    return notes


def _explain_total(cells, quantity, label, exact, hand) -> str:
    row_cells = [
        c for c in cells if c.quantity == quantity and c.resolution == label and c.hand != c.exact
    ]
    row_sum = sum(c.hand - c.exact for c in row_cells)
    if row_sum == hand - exact and row_cells:
        parts = ", ".join(f"{c.row} ({c.hand - c.exact:+d})" for c in row_cells)
        return f"off by {hand - exact:+d}, exactly the wrong rows: {parts}"
    own_sum = sum(
        c.hand
        for c in cells
        if c.quantity == quantity and c.resolution == label and c.layer != "(total)"
    )
    if own_sum == hand:
        return f"off by {hand - exact:+d}: the sum of the table's own rows"
    return f"off by {hand - exact:+d}; the table's rows add up to {own_sum}"


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


def render_check(result: TableCheck, fmt: str) -> str:
    """Return the check as 'text', 'markdown' or 'json'."""
    import json

    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2) + "\n"
    wrong = result.wrong
    lines = []
    if fmt == "markdown":
        lines.append(f"**{result.summary()}**\n")
        lines.append("| row | layer | quantity | res | hand | exact | diagnosis |")
        lines.append("|---|---|---|---|---:|---:|---|")
        for c in wrong:
            why = "; ".join(([c.formula_problem] if c.formula_problem else []) + c.diagnoses)
            lines.append(
                f"| {c.row} | {c.layer} | {c.quantity} | {c.resolution} | {c.hand} | "
                f"{c.exact} | {why or 'no single cause found'} |"
            )
        if result.unmatched_rows:
            lines.append(f"\nRows not matched to a layer: {', '.join(result.unmatched_rows)}")
        lines.append("\n" + result.coverage().replace("\n", "  \n"))
        return "\n".join(lines) + "\n"
    for c in wrong:
        why = "; ".join(([c.formula_problem] if c.formula_problem else []) + c.diagnoses)
        lines.append(
            f"WRONG {c.row:<14} {c.layer:<10} {c.quantity:<11} @{c.resolution:<6} "
            f"hand {c.hand:>10,}  exact {c.exact:>10,}  {why or 'no single cause found'}"
        )
    for row in result.unmatched_rows:
        lines.append(f"UNMATCHED {row}")
    lines.append(result.coverage())
    lines.append(result.summary())
    return "\n".join(lines) + "\n"
