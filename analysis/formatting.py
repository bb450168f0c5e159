"""Rendering a cost table as text, CSV, Markdown, LaTeX or JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import pandas as pd
import sympy as sp
from convtally.analysis.accounting import QUANTITIES, Analysis, H, W

FORMATS = ("text", "csv", "markdown", "latex", "json")


def resolution_label(height: int, width: int) -> str:
    """Return '32' for 32x32 and '32x48' otherwise, as written on the command line."""
    return str(height) if height == width else f"{height}x{width}"


def shape_text(shape: Sequence[sp.Expr]) -> str:
    """Return a per-example shape as '(NF, H/2, W/2)'."""
    return "(" + ", ".join(str(d) for d in shape) + ")"


def order_in_hw(formula: sp.Expr) -> str:
    """Return the growth order of a total in the input size, e.g. 'O(1)', 'O(H·W)', 'O((H·W)^2)'."""
    formula = sp.expand(formula)
    if not formula.has(H, W):
        return "O(1)"
    if formula.atoms(sp.floor, sp.ceiling):
        formula = formula.replace(sp.floor, lambda x: x).replace(sp.ceiling, lambda x: x)
    degree_h = sp.Poly(formula, H).degree()
    degree_w = sp.Poly(formula, W).degree()
    if degree_h == degree_w:
        return "O(H·W)" if degree_h == 1 else f"O((H·W)^{degree_h})"
    parts = [
        f"{name}^{degree}" if degree > 1 else name
        for name, degree in (("H", degree_h), ("W", degree_w))
        if degree
    ]
    return f"O({'·'.join(parts)})"


def growth_factors(totals: Sequence[int], resolutions: Sequence[tuple[int, int]]) -> list[str]:
    """Return 'x4.00 (32->64)' for each consecutive pair of resolutions that doubles H and W."""
    notes = []
    for (a, b), (ra, rb) in zip(zip(totals, totals[1:]), zip(resolutions, resolutions[1:])):
        if rb == (2 * ra[0], 2 * ra[1]) and a:
            notes.append(f"x{b / a:.2f} ({resolution_label(*ra)}->{resolution_label(*rb)})")
    return notes


def cost_frame(
    analysis: Analysis, resolutions: Sequence[tuple[int, int]], latex: bool = False
) -> pd.DataFrame:
    """Return one row per layer plus a Total row: formula and value per resolution per quantity."""
    labels = [resolution_label(*r) for r in resolutions]
    values = analysis.evaluate(resolutions)

    def show(expression: sp.Expr) -> str:
        return f"${latex_formula(expression)}$" if latex else str(expression)

    rows = []
    for index, layer in enumerate(analysis.layers):
        row = {
            "layer": layer.name,
            "type": layer.type,
            "output shape": shape_text(layer.output_shape)
            if not latex
            else "$(" + ", ".join(latex_formula(d) for d in layer.output_shape) + ")$",
        }
        for quantity in QUANTITIES:
            row[quantity] = show(layer.formula(quantity))
            if quantity != "weights" and not analysis.symbolic:
                row[quantity] = "unavailable"
            if quantity == "connections" and not layer.known:
                row[quantity] = "unknown (no rule)"
            for j, label in enumerate(labels):
                row[f"{quantity} @{label}"] = int(values[quantity][index, j])
        rows.append(row)
    total = {"layer": "Total", "type": "", "output shape": ""}
    for quantity in QUANTITIES:
        total[quantity] = show(analysis.total(quantity))
        if quantity != "weights" and not analysis.symbolic:
            total[quantity] = "unavailable"
        if quantity == "connections" and not analysis.complete:
            total[quantity] = f"incomplete: {total[quantity]}"
        for j, label in enumerate(labels):
            total[f"{quantity} @{label}"] = int(values[quantity][:, j].sum())
    rows.append(total)
    return pd.DataFrame(rows)


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
    lines.append(f"capture: {analysis.capture_text()}")
    lines.append(analysis.convention.describe())
    lines.append("assumptions: " + ("; ".join(analysis.assumptions) or "none"))
    totals = analysis.totals_at(resolutions)
    for quantity in QUANTITIES:
        growth = growth_factors(totals[quantity], resolutions)
        order = (
            order_in_hw(analysis.total(quantity))
            if analysis.symbolic or quantity == "weights"
            else "formula unavailable (concrete capture)"
        )
        lines.append(
            f"total {quantity}: {order}"
            + (f", per doubling of H and W {', '.join(growth)}" if growth else "")
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
        data = analysis.to_dict(resolutions, labels)
        data["orders"] = {
            q: order_in_hw(analysis.total(q)) if analysis.symbolic or q == "weights" else None
            for q in QUANTITIES
        }
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return select_columns(cost_frame(analysis, resolutions), columns).to_csv(index=False)
    if fmt == "latex":
        return render_latex(analysis, resolutions, columns)
    frame = cost_frame(analysis, resolutions)
    header = header_lines(analysis, resolutions)
    if fmt == "markdown":
        for quantity in QUANTITIES:
            frame[quantity] = frame[quantity].map(lambda f: f"`{f}`" if f else f)
        frame["output shape"] = frame["output shape"].map(lambda f: f"`{f}`" if f else f)
        notes = "\n".join(f"- {line}" for line in header)
        table = select_columns(frame, columns).to_markdown(index=False, intfmt=",")
        return f"{notes}\n\n{table}\n"
    return "\n".join(header) + "\n\n" + _text_table(select_columns(frame, columns)) + "\n"


def _text_table(frame: pd.DataFrame) -> str:
    from tabulate import tabulate

    return tabulate(
        frame,
        headers="keys",
        tablefmt="simple",
        showindex=False,
        intfmt=",",
        disable_numparse=False,
    )


LONGTABLE_ROWS = 40  # above this a table cannot fit one page: a longtable breaks across pages


def render_latex(
    analysis: Analysis, resolutions: Sequence[tuple[int, int]], columns: str = "both"
) -> str:
    """Return a booktabs LaTeX table (pandas Styler): formulas in math mode, numbers
    right-aligned, a caption and a label, and a longtable when it is too long for one page."""
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
    long = len(frame) > LONGTABLE_ROWS
    label = "tab:costs-" + re.sub(r"[^A-Za-z0-9]+", "-", analysis.model).strip("-")
    body = styler.to_latex(
        hrules=True,
        column_format="".join("r" if c in numeric else "l" for c in frame.columns),
        caption=caption,
        label=label,
        multicol_align="c",
        position=None if long else "htbp",
        environment="longtable" if long else None,
    )
    packages = "booktabs, longtable" if long else "booktabs"
    return (
        f"% needs \\usepackage{{{packages}}}\n% "
        + "\n% ".join(header_lines(analysis, resolutions)) + "\n" + body
    )


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
