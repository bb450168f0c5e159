"""Rendering a cost table as text, CSV, Markdown, LaTeX or JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sympy as sp
from convtally.analysis.accounting import QUANTITIES, Analysis, size_label
from convtally.analysis.symbols import AXES, D, T

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("text", "csv", "markdown", "latex", "json")


def resolution_label(*sizes: int) -> str:
    """Return '32' for 32x32 and '32x48' otherwise, as written on the command line ('16000'
    for a 1-d length, '16x112x112' for a 3-d input)."""
    return size_label(sizes)


def shape_text(shape: Sequence[sp.Expr]) -> str:
    """Return a per-example shape as '(NF, H/2, W/2)'."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def order_in_hw(formula: sp.Expr, axes: Sequence[sp.Symbol] | None = None) -> str:
    """Return the growth order of a total in the input size, e.g. 'O(1)', 'O(H·W)', 'O((H·W)^2)'
    ('O(T)' for a 1-d input, 'O(D·H·W)' for a 3-d one: the analysis' `axes`, else read from
    the formula)."""
    formula = sp.expand(formula)
    if axes is None:
        axes = AXES[1] if formula.has(T) else AXES[3] if formula.has(D) else AXES[2]
    if not formula.has(*axes):
        return "O(1)"
    if formula.atoms(sp.floor, sp.ceiling, sp.Mod):
        formula = formula.replace(sp.floor, lambda x: x).replace(sp.ceiling, lambda x: x)
        formula = formula.replace(sp.Mod, lambda x, n: 0 if not n.free_symbols else sp.Mod(x, n))
    # A quotient (a count divided by a window count, as torch.export writes some views) grows
    # as its numerator's degree less its denominator's.
    numerator, denominator = formula, sp.Integer(1)
    if any(power.exp.is_negative and power.base.free_symbols
           for power in formula.atoms(sp.Pow)):
        numerator, denominator = sp.fraction(sp.together(formula))
    try:
        degrees = [max(sp.Poly(numerator, axis).degree() - sp.Poly(denominator, axis).degree(), 0)
                   for axis in axes]
    except sp.PolynomialError:
        return "O(?)"
    if not any(degrees):
        return "O(1)"
    if len(set(degrees)) == 1:
        product = "·".join(map(str, axes))
        if degrees[0] == 1:
            return f"O({product})"
        return f"O(({product})^{degrees[0]})" if len(axes) > 1 else f"O({product}^{degrees[0]})"
    parts = [
        f"{axis}^{degree}" if degree > 1 else str(axis)
        for axis, degree in zip(axes, degrees, strict=True)
        if degree
    ]
    return f"O({'·'.join(parts)})"


def growth_factors(totals: Sequence[int], resolutions: Sequence[tuple[int, ...]]) -> list[str]:
    """Return 'x4.00 (32->64)' for each consecutive pair of resolutions that doubles every
    size (H and W)."""
    notes = []
    for (a, b), (ra, rb) in zip(zip(totals, totals[1:]), zip(resolutions, resolutions[1:])):
        if tuple(rb) == tuple(2 * v for v in ra) and a:
            notes.append(f"x{b / a:.2f} ({resolution_label(*ra)}->{resolution_label(*rb)})")
    return notes


def cost_rows(
    analysis: Analysis, resolutions: Sequence[tuple[int, int]], latex: bool = False
) -> tuple[list[str], list[list]]:
    """Return (columns, rows) of the cost table: one row per layer plus a Total row, each with
    its formula and its value per resolution per quantity (cost_frame's contents, as lists)."""
    labels = [resolution_label(*r) for r in resolutions]
    values = analysis.evaluate(resolutions)
    printed: dict[sp.Expr, str] = {}  # a network's layers repeat few distinct formulas

    def show(expression: sp.Expr) -> str:
        if expression not in printed:
            printed[expression] = (
                f"${latex_formula(expression)}$" if latex else str(expression)
            )
        return printed[expression]

    def shape(dimensions: Sequence[sp.Expr]) -> str:
        if latex:
            return "$(" + ", ".join(latex_formula(d) for d in dimensions) + ")$"
        return "(" + ", ".join(show(d) for d in dimensions) + ")"

    columns = ["layer", "type", "output shape"]
    for quantity in QUANTITIES:
        columns += [quantity, *(f"{quantity} @{label}" for label in labels)]
    rows = []
    for index, layer in enumerate(analysis.layers):
        row = [layer.name, layer.type, shape(layer.output_shape)]
        for quantity in QUANTITIES:
            formula = show(layer.formula(quantity))
            if quantity != "weights" and not analysis.symbolic:
                formula = "unavailable"
            if quantity == "connections" and not layer.known:
                formula = "unknown (no rule)"
            row.append(formula)
            row.extend(map(int, values[quantity][index].tolist()))
        rows.append(row)
    total = ["Total", "", ""]
    for quantity in QUANTITIES:
        formula = show(analysis.total(quantity))
        if quantity != "weights" and not analysis.symbolic:
            formula = "unavailable"
        if quantity == "connections" and not analysis.complete:
            formula = f"incomplete: {formula}"
        total.append(formula)
        total.extend(map(int, values[quantity].sum(axis=0).tolist()))
    rows.append(total)
    return columns, rows


def cost_frame(
    analysis: Analysis, resolutions: Sequence[tuple[int, int]], latex: bool = False
) -> pd.DataFrame:
    """Return one row per layer plus a Total row: formula and value per resolution per quantity."""
    import pandas as pd

    columns, rows = cost_rows(analysis, resolutions, latex)
    return pd.DataFrame(rows, columns=columns)


def _csv_text(columns: list[str], rows: list[list], selected: str) -> str:
    """Return the rows as pandas' to_csv(index=False) writes them (csv.writer, minimal quoting),
    without building a frame: a 1,000-resolution table has thousands of columns."""
    keep = _kept_columns(columns, selected)
    # runs of adjacent kept columns of one kind: the integers of a run are joined in one C call,
    # the few text fields quoted as csv.writer would (pandas' to_csv writes with csv.writer)
    runs: list[tuple[bool, int, int]] = []
    for i in keep:
        numeric = " @" in columns[i]
        if runs and runs[-1][0] == numeric and runs[-1][2] == i:
            runs[-1] = (numeric, runs[-1][1], i + 1)
        else:
            runs.append((numeric, i, i + 1))
    lines = [",".join(_csv_field(columns[i]) for i in keep)]
    for row in rows:
        lines.append(",".join(
            ",".join(map(str, row[a:b])) if numeric else ",".join(map(_csv_field, row[a:b]))
            for numeric, a, b in runs
        ))
    return "\n".join(lines) + "\n"


def _csv_field(text: str) -> str:
    """Return `text` as csv.writer writes a field (QUOTE_MINIMAL, '\n' line endings)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def latex_formula(expression: sp.Expr) -> str:
    """Return sympy's LaTeX for `expression`, multi-letter symbols upright (\\mathrm{NF})."""
    expression = sp.sympify(expression)
    names = {s: rf"\mathrm{{{s.name}}}" for s in expression.free_symbols if len(s.name) > 1}
    return sp.latex(expression, symbol_names=names)


def header_lines(analysis: Analysis, resolutions: Sequence[tuple[int, int]]) -> list[str]:
    """Return the lines printed above a table: model, setting, convention, assumptions, growth."""
    lines = [f"model: {analysis.model}"]
    if analysis.hyperparameters:
        lines.append(
            "hyperparameters: "
            + ", ".join(
                f"{s}={v} ({analysis.symbols[s]})" for s, v in analysis.hyperparameters.items()
            )
        )
    if analysis.axes != AXES[2]:
        lines.append(f"input: {analysis.input_text} per example")
    lines.append(f"capture: {analysis.capture_text()}")
    lines.append(analysis.convention.describe())
    lines.append("assumptions: " + ("; ".join(analysis.assumptions) or "none"))
    totals = analysis.totals_at(resolutions)
    for quantity in QUANTITIES:
        growth = growth_factors(totals[quantity], resolutions)
        order = (
            order_in_hw(analysis.total(quantity), analysis.axes)
            if analysis.symbolic or quantity == "weights"
            else "formula unavailable (concrete capture)"
        )
        lines.append(
            f"total {quantity}: {order}"
            + (f", per doubling of {' and '.join(map(str, analysis.axes))} {', '.join(growth)}"
               if growth else "")
        )
    if not analysis.complete:
        unknown = ", ".join(f"{layer.name} ({layer.type})" for layer in analysis.unknown_layers)
        lines.append(f"INCOMPLETE: no rule for {unknown}; their connections are not in the total")
    return lines


COLUMNS = ("both", "values", "formulas")


def select_columns(frame: pd.DataFrame, columns: str) -> pd.DataFrame:
    """Return `frame` with only the values ('values'), only the formulas ('formulas') or both."""
    if columns not in COLUMNS:
        raise ValueError(f"unknown --columns {columns!r}; use one of {', '.join(COLUMNS)}")
    if columns == "values":
        return frame.drop(columns=list(QUANTITIES))
    if columns == "formulas":
        return frame.drop(columns=[c for c in frame.columns if " @" in str(c)])
    return frame


def render(
    analysis: Analysis,
    resolutions: Sequence[tuple[int, int]],
    fmt: str,
    columns: str = "both",
) -> str:
    """Return the cost table rendered in `fmt` (one of FORMATS), with the formula columns, the
    value columns or both (`columns`; JSON always has both)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "json":
        labels = [resolution_label(*r) for r in resolutions]
        data = analysis.to_dict(resolutions, labels, values_as=LabelledInts)
        data["orders"] = {
            q: order_in_hw(analysis.total(q), analysis.axes)
            if analysis.symbolic or q == "weights" else None
            for q in QUANTITIES
        }
        return json_text(data) + "\n"
    if fmt == "csv":
        return _csv_text(*cost_rows(analysis, resolutions), columns)
    if fmt == "latex":
        return render_latex(analysis, resolutions, columns)
    # text and Markdown: tabulate over the rows, as pandas' to_markdown and the frame did
    # (without importing pandas, which takes longer than the analysis of most networks)
    names, rows = cost_rows(analysis, resolutions)
    header = header_lines(analysis, resolutions)
    keep = _kept_columns(names, columns)
    if fmt == "markdown":
        quoted = {i for i, name in enumerate(names) if name in (*QUANTITIES, "output shape")}
        rows = [[f"`{v}`" if i in quoted and v else v for i, v in enumerate(row)] for row in rows]
    table = _tabulate(
        [[row[i] for i in keep] for row in rows],
        [names[i] for i in keep],
        "pipe" if fmt == "markdown" else "simple",
    )
    if fmt == "markdown":
        notes = "\n".join(f"- {line}" for line in header)
        return f"{notes}\n\n{table}\n"
    return "\n".join(header) + "\n\n" + table + "\n"


def _kept_columns(columns: Sequence[str], selected: str) -> list[int]:
    """Return the indices of `columns` that --columns `selected` keeps (as select_columns)."""
    if selected not in COLUMNS:
        raise ValueError(f"unknown --columns {selected!r}; use one of {', '.join(COLUMNS)}")
    return [
        i for i, column in enumerate(columns)
        if selected == "both"
        or (selected == "values" and column not in QUANTITIES)
        or (selected == "formulas" and " @" not in column)
    ]


def _tabulate(rows: list[list], headers: list[str], style: str) -> str:
    from tabulate import tabulate

    return tabulate(
        rows, headers=headers, tablefmt=style, showindex=False, intfmt=",",
        disable_numparse=False,
    )


class LabelledInts:
    """A mapping label -> int kept as two lists, written by json_text as the dict would be."""

    __slots__ = ("labels", "ints")

    def __init__(self, labels: list[str], ints: list[int]):
        self.labels = labels
        self.ints = ints


class _NotPlainJSON(Exception):
    """A value json_text leaves to json.dumps (it writes the same text, more slowly)."""


def json_text(data: object) -> str:
    """Return json.dumps(data, indent=2), the same text, written faster for large tables: a
    mapping of many labels to integers (the values at 1,000 resolutions) is written with one
    format call instead of json's pure-Python indented encoder walking every number."""
    templates: dict[tuple, str] = {}
    try:
        return _json_value(data, 0, templates)
    except _NotPlainJSON:
        return json.dumps(data, indent=2, default=_plain)


def _plain(value: object) -> object:
    """Return a LabelledInts as the dict it stands for (json.dumps' fallback)."""
    if isinstance(value, LabelledInts):
        return dict(zip(value.labels, value.ints))
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_value(value: object, depth: int, templates: dict[tuple, str]) -> str:
    if value is None or isinstance(value, (str, bool, float)):
        return json.dumps(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is LabelledInts:
        if not value.ints:
            return "{}"
        key = (depth, id(value.labels))
        if key not in templates:  # the labels, escaped once: "32": {}, ...
            lines = (json.dumps(k).replace("{", "{{").replace("}", "}}") + ": {}"
                     for k in value.labels)
            inner = "\n" + "  " * (depth + 1)
            templates[key] = "{{" + inner + ("," + inner).join(lines) + "\n" + "  " * depth + "}}"
        return templates[key].format(*value.ints)
    inner = "\n" + "  " * (depth + 1)
    if type(value) in (list, tuple):
        if not value:
            return "[]"
        items = (_json_value(v, depth + 1, templates) for v in value)
        return "[" + inner + ("," + inner).join(items) + "\n" + "  " * depth + "]"
    if type(value) is not dict or set(map(type, value)) - {str}:
        raise _NotPlainJSON
    if not value:
        return "{}"
    if len(value) > 8 and set(map(type, value.values())) == {int}:
        key = (depth, tuple(value))
        if key not in templates:  # the labels, escaped once: "32": {}, ...
            lines = (json.dumps(k).replace("{", "{{").replace("}", "}}") + ": {}" for k in value)
            body = ("," + inner).join(lines)
            templates[key] = "{{" + inner + body + "\n" + "  " * depth + "}}"
        return templates[key].format(*value.values())
    items = (
        json.dumps(k) + ": " + _json_value(v, depth + 1, templates) for k, v in value.items()
    )
    return "{" + inner + ("," + inner).join(items) + "\n" + "  " * depth + "}"


LONGTABLE_ROWS = 40  # above this a table cannot fit one page: a longtable breaks across pages


def render_latex(
    analysis: Analysis, resolutions: Sequence[tuple[int, int]], columns: str = "both"
) -> str:
    """Return a booktabs LaTeX table (pandas Styler): formulas in math mode, numbers
    right-aligned, a caption and a label, and a longtable when it is too long for one page."""
    import pandas as pd

    frame = select_columns(cost_frame(analysis, resolutions, latex=True), columns)
    frame["layer"] = frame["layer"].map(_escape_latex)
    frame["type"] = frame["type"].map(_escape_latex)
    frame.columns = pd.MultiIndex.from_tuples(
        [
            (c.split(" @")[0].capitalize(), c.split(" @")[1])
            if "@" in c
            else ((c.capitalize(), "formula") if c in QUANTITIES else (c.capitalize(), ""))
            for c in frame.columns
        ]
    )
    numeric = [c for c in frame.columns if c[1] not in ("formula", "")]
    styler = frame.style.hide(axis="index").format("{:,}", subset=numeric)
    caption = _escape_latex(
        f"{analysis.model}: weights, outputs and connections per layer "
        f"({'; '.join(analysis.assumptions) or 'no assumptions'}; {analysis.convention.describe()})"
    )
    label = "tab:costs-" + re.sub(r"[^A-Za-z0-9]+", "-", analysis.model).strip("-")
    comments = header_lines(analysis, resolutions)
    return booktabs_latex(styler, len(frame), [c in numeric for c in frame.columns], caption,
                          label, comments, multicol_align="c")


def booktabs_latex(styler: Any, rows: int, numeric: Sequence[bool], caption: str, label: str,
                   comments: Sequence[str] = (), **options: Any) -> str:
    """Return a pandas Styler as a booktabs table: numeric columns right-aligned, a caption and
    a label, a longtable past LONGTABLE_ROWS rows, and the packages it needs in a comment."""
    long = rows > LONGTABLE_ROWS
    body = styler.to_latex(
        hrules=True,
        column_format="".join("r" if right else "l" for right in numeric),
        caption=caption,
        label=label,
        position=None if long else "htbp",
        environment="longtable" if long else None,
        **options,
    )
    packages = "booktabs, longtable" if long else "booktabs"
    return "".join(f"% {line}\n" for line in
                   [f"needs \\usepackage{{{packages}}}", *comments]) + body


def _escape_latex(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("{", r"\{"),
        ("}", r"\}"),
    ):
        text = text.replace(char, escaped)
    return text
