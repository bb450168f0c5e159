"""A formula from a user's file, parsed into sympy without ever evaluating its text.

`sympy.sympify` hands its input to Python's `eval`, so a hand table's formula cell could run
code. This module reads formulas with a small recursive-descent parser over a whitelist: numbers,
the names it is given (H, W, B and the model's hyperparameters), `+ - * / ** ^`, parentheses,
`floor`/`ceil`, and the LaTeX forms hand tables use (`$...$`, `\\cdot`, `\\times`, `\\frac{a}{b}`,
`^{2}`, `\\left( \\right)`, `\\lfloor \\rfloor`, `\\lceil \\rceil`, braces as parentheses, and
implicit multiplication such as `2NF` or `NF H W`). Sizes are bounded before anything is
computed, so no formula can hang or exhaust memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

MAX_LENGTH = 400  # characters; the longest total formula of the seed networks is about 100
MAX_DIGITS = 24  # in one integer literal: 10**24 is far above any network's connections
MAX_EXPONENT = 6  # a power above the 6th of anything is no network's cost
MAX_CONSTANT_BITS = 256  # a numeric constant the formula builds (2**256 is beyond any count)
MAX_DEPTH = 40  # nested parentheses, braces and powers
MAX_DEGREE = 10  # total degree in the symbols: (H*W)**2*K**2*NF**2 is 8


class FormulaError(ValueError):
    """A formula that is not an arithmetic expression in the allowed names (one line)."""


@dataclass(frozen=True)
class Token:
    """One lexical token: its kind, its text and where it starts in the formula."""

    kind: str  # number, name, command, op, open, close, end
    text: str
    position: int


_TOKEN = re.compile(
    r"\s*(?:(?P<number>\d{1,3}(?:,\d{3})+(?![\d.])|\d+(?:\.\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<command>\\[A-Za-z]+|\\[,;! ])|(?P<op>\*\*|[-+*/^])|(?P<open>[({\[])|(?P<close>[)}\]]))"
)
_REPLACEMENTS = {"×": "*", "·": "*", "⋅": "*", "−": "-", "÷": "/", "$": " "}
_TIMES = {r"\cdot", r"\times", r"\ast"}
_IGNORED = {r"\left", r"\right", r"\,", r"\;", r"\!", "\\ ", r"\displaystyle"}
_FUNCTIONS = {"floor": sp.floor, "ceil": sp.ceiling, "ceiling": sp.ceiling}
_BRACKETS = {
    r"\lfloor": (r"\rfloor", sp.floor),
    r"\lceil": (r"\rceil", sp.ceiling),
}


def tokenize(text: str) -> list[Token]:
    """Return the tokens of `text`; FormulaError at the first character that is not allowed."""
    for old, new in _REPLACEMENTS.items():
        text = text.replace(old, new)
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            offending = text[position:].lstrip()[:1]
            raise FormulaError(f"unexpected character {offending!r} at position {position + 1}")
        kind = match.lastgroup
        tokens.append(Token(kind, match.group(kind), match.start(kind)))
        position = match.end()
    tokens = [t for t in tokens if not (t.kind == "command" and t.text in _IGNORED)]
    tokens = [Token("op", "*", t.position) if t.text in _TIMES else t for t in tokens]
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent over: sum := product (('+'|'-') product)*; product := unary
    (('*'|'/'|implicit) unary)*; unary := ('-'|'+') unary | power; power := atom
    ('**'|'^' unary)?."""

    def __init__(self, tokens: list[Token], names: Mapping[str, sp.Symbol]):
        self.tokens = tokens
        self.index = 0
        self.names = names
        self.depth = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, kind: str, text: str | None = None) -> Token:
        token = self.current
        if token.kind != kind or (text is not None and token.text != text):
            wanted = repr(text) if text is not None else kind
            found = repr(token.text) if token.kind != "end" else "the end"
            raise FormulaError(f"expected {wanted} at position {token.position + 1}, found {found}")
        return self.advance()

    def nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaError(f"nested more than {MAX_DEPTH} deep")

    def parse(self) -> sp.Expr:
        expression = self.sum()
        if self.current.kind != "end":
            raise FormulaError(
                f"unexpected '{self.current.text}' at position {self.current.position + 1}"
            )
        return expression

    def sum(self) -> sp.Expr:
        terms = [self.product()]
        while self.current.kind == "op" and self.current.text in "+-":
            sign = self.advance().text
            term = self.product()
            terms.append(term if sign == "+" else -term)
        return _bounded(sp.Add(*terms))

    def starts_atom(self) -> bool:
        token = self.current
        return token.kind in ("number", "name", "open") or (
            token.kind == "command" and (token.text == r"\frac" or token.text in _BRACKETS)
        )

    def product(self) -> sp.Expr:
        result = self.unary()
        while True:
            token = self.current
            if token.kind == "op" and token.text in ("*", "/"):
                self.advance()
                factor = self.unary()
                if token.text == "/":
                    if factor == 0:
                        raise FormulaError(f"division by zero at position {token.position + 1}")
                    factor = sp.Pow(factor, -1)
                result = _bounded(sp.Mul(result, factor))
            elif self.starts_atom():
                result = _bounded(sp.Mul(result, self.unary()))
            else:
                return result

    def unary(self) -> sp.Expr:
        if self.current.kind == "op" and self.current.text in "+-":
            sign = self.advance().text
            self.nested()
            operand = self.unary()
            self.depth -= 1
            return -operand if sign == "-" else operand
        return self.power()

    def power(self) -> sp.Expr:
        base = self.atom()
        if self.current.kind == "op" and self.current.text in ("**", "^"):
            token = self.advance()
            self.nested()
            exponent = self.unary()
            self.depth -= 1
            return _power(base, exponent, token.position)
        return base

    def group(self) -> sp.Expr:
        opening = self.expect("open")
        closing = {"(": ")", "{": "}", "[": "]"}[opening.text]
        self.nested()
        inside = self.sum()
        self.depth -= 1
        self.expect("close", closing)
        return inside

    def atom(self) -> sp.Expr:
        token = self.current
        if token.kind == "number":
            self.advance()
            return _number(token)
        if token.kind == "open":
            return self.group()
        if token.kind == "name":
            self.advance()
            if token.text in _FUNCTIONS:
                if self.current.kind != "open":
                    raise FormulaError(f"{token.text} needs parentheses, e.g. {token.text}(H/2)")
                return _FUNCTIONS[token.text](self.group())
            if token.text in self.names:
                return self.names[token.text]
            allowed = ", ".join(sorted(self.names)) or "none"
            raise FormulaError(
                f"unknown name {token.text!r} at position {token.position + 1}; "
                f"expected numbers, {allowed}, floor() and ceil()"
            )
        if token.kind == "command" and token.text == r"\frac":
            self.advance()
            numerator = self.group()
            denominator = self.group()
            if denominator == 0:
                raise FormulaError(f"division by zero in \\frac at position {token.position + 1}")
            return _bounded(numerator / denominator)
        if token.kind == "command" and token.text in _BRACKETS:
            closing, function = _BRACKETS[token.text]
            self.advance()
            self.nested()
            inside = self.sum()
            self.depth -= 1
            self.expect("command", closing)
            return function(inside)
        found = repr(token.text) if token.kind != "end" else "the end"
        raise FormulaError(f"expected a number, a name or '(' at position {token.position + 1}, "
                           f"found {found}")


def _number(token: Token) -> sp.Expr:
    text = token.text.replace(",", "")  # 1,000,000: thousands separators
    digits = text.replace(".", "")
    if len(digits.lstrip("0")) > MAX_DIGITS:
        raise FormulaError(
            f"number {token.text[:12]}... at position {token.position + 1} has more than "
            f"{MAX_DIGITS} digits"
        )
    return sp.Rational(text)


def _power(base: sp.Expr, exponent: sp.Expr, position: int) -> sp.Expr:
    if not exponent.is_Integer or abs(int(exponent)) > MAX_EXPONENT:
        raise FormulaError(
            f"exponent {sp.sstr(exponent)[:20]} at position {position + 1} is not allowed; "
            f"expected a whole number from -{MAX_EXPONENT} to {MAX_EXPONENT}"
        )
    if base == 0 and exponent < 0:
        raise FormulaError(f"division by zero (0 to a negative power) at position {position + 1}")
    if base.is_Rational:
        size = max(abs(base.p), abs(base.q), 1)
        if math.log2(size) * abs(int(exponent)) > MAX_CONSTANT_BITS:
            raise FormulaError(
                f"the constant at position {position + 1} would exceed 2**{MAX_CONSTANT_BITS}"
            )
    return _bounded(sp.Pow(base, exponent))


def _bounded(expression: sp.Expr) -> sp.Expr:
    """Return `expression`, refusing one whose numeric constants outgrow MAX_CONSTANT_BITS."""
    for atom in expression.atoms(sp.Rational):
        if max(abs(atom.p), abs(atom.q)).bit_length() > MAX_CONSTANT_BITS:
            raise FormulaError(f"a constant in the formula exceeds 2**{MAX_CONSTANT_BITS}")
    return expression


def formula_symbols(names: list[str] | tuple[str, ...]) -> dict[str, sp.Symbol]:
    """Return name -> positive integer sympy Symbol, as the analysis' own symbols are made."""
    return {name: sp.Symbol(name, integer=True, positive=True) for name in names}


def parse_formula_text(text: str, names: Mapping[str, sp.Symbol]) -> sp.Expr | None:
    """Return the formula in `text` as a sympy expression, None when blank; FormulaError if bad.

    Nothing in `text` is evaluated as code: only numbers, `names`, arithmetic, floor/ceil and
    the LaTeX forms above are accepted, and sizes are bounded before they are computed.
    """
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"formula is {len(text)} characters long; at most {MAX_LENGTH}")
    tokens = tokenize(text)
    if tokens[0].kind == "end":
        return None
    try:
        expression = _Parser(tokens, names).parse()
    except RecursionError:
        raise FormulaError(f"nested more than {MAX_DEPTH} deep") from None
    degree = _degree(expression)
    if degree > MAX_DEGREE:
        raise FormulaError(
            f"formula has degree {degree} in its symbols; at most {MAX_DEGREE} (no network's "
            "cost grows faster)"
        )
    return expression


def _degree(expression: sp.Expr) -> int:
    """Return an upper bound of the total degree of `expression` in its symbols."""
    if expression.is_Symbol:
        return 1
    if expression.is_Number or not expression.args:
        return 0
    if expression.is_Add:
        return max(_degree(a) for a in expression.args)
    if expression.is_Mul:
        return sum(_degree(a) for a in expression.args)
    if expression.is_Pow:
        return _degree(expression.base) * abs(int(expression.exp))
    return max(_degree(a) for a in expression.args)  # floor, ceiling
