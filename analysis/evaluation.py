"""Evaluating many formulas exactly at many input sizes: floor() and ceiling() become integer
division, every formula is scaled to integers, and each distinct formula is compiled once."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sympy as sp
from convtally.analysis import rules
from convtally.analysis.symbols import H, W


def remembered_by_identity(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Return `function` answering each object once while the returned callable lives: a
    network's rows share their expressions' objects, and sympy walks or compares an expression
    anew on every call. Each object asked about is kept with its answer, so no other object can
    take its id meanwhile."""
    answers: dict[int, tuple[Any, Any]] = {}

    def answer(value: Any) -> Any:
        found = answers.get(id(value))
        if found is None:
            found = answers[id(value)] = (value, function(value))
        return found[1]

    return answer


class IntegerEvaluator:
    """Evaluates many floor-containing rational formulas exactly, vectorised over (H, W).

    floor(p/q) and ceiling(p/q) become integer floor division of the numerator and denominator
    polynomials, and each formula is scaled by its common denominator and divided back exactly,
    so no float ever rounds a count. A network repeats few distinct formulas (resnet152: 46
    among 2,569), so each distinct one is compiled and evaluated once and its row shared.
    """

    def __init__(self, formulas: Sequence[sp.Expr], axes: Sequence[sp.Symbol] = (H, W)):
        positions: dict[sp.Expr, int] = {}
        position = remembered_by_identity(  # the same object again: no structural comparison
            lambda formula: positions.setdefault(sp.sympify(formula), len(positions)))
        self.index = np.array([position(formula) for formula in formulas], dtype=np.intp)
        compiled = [_formula_code(formula) for formula in positions]
        self.denominators = np.array([d for _, d in compiled], dtype=object)
        # what sympy.lambdify((H, W), [...], modules=[_EVALUATOR_FUNCTIONS, "math"]) builds,
        # from each formula's code printed once (printing is most of the cost, and the same
        # formulas come back: the simple and exact analyses, a loop over models)
        arguments = ", ".join(map(str, axes))
        source = f"def _evaluate({arguments}):\n    return [" + ", ".join(c for c, _ in compiled)
        source += "]\n"
        self.function = _compiled_function(source)

    def __call__(self, *columns: np.ndarray) -> np.ndarray:
        """Return an object array of exact ints, formulas x resolutions, from one array of
        sizes per axis (heights and widths; lengths; depths, heights and widths)."""
        if not len(self.index):
            return np.zeros((0, len(columns[0])), dtype=object)
        raw = self.function(*columns)
        distinct = np.empty((len(raw), len(columns[0])), dtype=object)
        for row, values in enumerate(raw):  # a number (a constant formula) fills its row
            distinct[row] = values
        return (distinct // self.denominators[:, None])[self.index]


_EVALUATOR_FUNCTIONS = {
    "ifloor": lambda n, d: n // d,
    "iceil": lambda n, d: -((-n) // d),
    "FvcoreEinsum": rules.fvcore_einsum_count,
}
_MATH_NAMESPACE: dict[str, Any] = {}
exec("from math import *", _MATH_NAMESPACE)  # lambdify's "math" module namespace


@functools.lru_cache(maxsize=16384)
def _formula_code(formula: sp.Expr) -> tuple[str, int]:
    """Return (Python code of the formula scaled to integers, the scale), as lambdify prints it
    (floor and ceiling of p/q as ifloor/iceil of integer polynomials)."""
    from sympy.printing.pycode import PythonCodePrinter

    integral = _integer_divisions(formula)
    denominator = _common_denominator(integral)
    printer = PythonCodePrinter({
        "fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
        "user_functions": {name: name for name in _EVALUATOR_FUNCTIONS},
    })
    return "(" + printer.doprint(sp.expand(integral * denominator)) + ")", denominator


_IFLOOR = sp.Function("ifloor")
_ICEIL = sp.Function("iceil")


def _integer_divisions(expression: sp.Expr) -> sp.Expr:
    atoms = expression.atoms(sp.floor, sp.ceiling)
    replacements = {atom: _integer_division(atom) for atom in atoms}
    return expression.xreplace(replacements) if replacements else expression


@functools.lru_cache(maxsize=16384)
def _integer_division(atom: sp.Expr) -> sp.Expr:
    """Return floor(p/q) or ceiling(p/q) as ifloor/iceil of polynomials (remembered: the exact
    formulas of a deep network nest the same floors many times over)."""
    inner = _integer_divisions(atom.args[0])
    numerator, denominator = sp.fraction(sp.together(inner))
    function = _IFLOOR if isinstance(atom, sp.floor) else _ICEIL
    return function(sp.expand(numerator), denominator)


def _common_denominator(expression: sp.Expr) -> int:
    expanded = sp.expand(expression)
    denominators = [int(r.q) for r in expanded.atoms(sp.Rational)]
    return math.lcm(*denominators) if denominators else 1


@functools.lru_cache(maxsize=256)
def _compiled_function(source: str) -> Any:
    """Return the function `source` defines (the same model analysed again compiles nothing)."""
    namespace = {**_MATH_NAMESPACE, **_EVALUATOR_FUNCTIONS}
    exec(compile(source, "<convtally formulas>", "exec"), namespace)
    return namespace["_evaluate"]
