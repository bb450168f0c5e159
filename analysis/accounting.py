"""Per-layer weights, outputs and connections of any nn.Module as sympy formulas.

The model is traced with torch.fx (so functional ops in `forward` are seen), then its graph is
interpreted with symbolic shapes: the input is (B, C, H, W) with H and W symbols, and every
call goes through a rule from `analysis.rules`. Shapes use PyTorch's exact floor arithmetic;
the divisibility of H and W that removes every floor is then derived and, unless `exact=True`,
assumed, so formulas read like the write-up's (`H*NF*W/4`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import operator
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import copy, deepcopy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import sympy as sp
import torch
import torch.fx
from convtally.analysis import rules, shapes
from convtally.analysis.conventions import DEFAULT, Convention
from convtally.analysis.evaluation import IntegerEvaluator, remembered_by_identity
from convtally.analysis.hyperparameters import (
    concrete_attributes,
    fit_attributes,
    hyperparameter_symbols,
)
from convtally.analysis.rules import (
    BATCH,
    LayerCost,
    NoClosedForm,
    PlainValue,
    SymTensor,
    UnsupportedLayer,
)
from convtally.analysis.symbols import AXES, H, W
from convtally.analysis.tracing import (
    attribute_at,
    concrete_shapes,
    each_module,
    flat_values,
    map_values,
    module_scope,
    rebound,
    trace,
)
from convtally.models.registry import (
    ModelSpec,
    declared_input_channels,
    declared_input_rank,
    resolve,
    with_builder_keywords,
)
from torch import nn

QUANTITIES = ("weights", "outputs", "connections")
FLOORS_KEPT = "some sizes keep floor(): no divisibility of H and W removes it"
UNUSED_ROW = "(unused parameters)"


class ResolutionError(ValueError):
    """A resolution the formulas do not hold at (divisibility, or too small)."""


@dataclass(slots=True)  # a row per layer: no __dict__ to make, look in or collect
class Layer:
    """One row of the cost table: a module call or a tensor-producing function call."""

    name: str
    type: str
    kind: str
    node: str  # the torch.fx node it came from
    output_shape: tuple[sp.Expr, ...]  # per example (batch dimension dropped)
    weights: sp.Expr
    outputs: sp.Expr
    connections: sp.Expr
    cost: LayerCost = field(repr=False)
    divisor: tuple[int, ...] = (1, 1)  # what H, W (T; D, H, W) must be divisible by so far
    known: bool = True  # False when counted from hooks under allow_unknown
    requirements: tuple[tuple[sp.Expr, sp.Expr, str], ...] = ()  # (a, b, what): a must equal b
    bounds: tuple[tuple[sp.Expr, str], ...] = ()  # (margin, what): a margin must be >= 0

    def formula(self, quantity: str) -> sp.Expr:
        """Return the formula for 'weights', 'outputs' or 'connections'."""
        return getattr(self, quantity)


@dataclass
class Analysis:
    """The cost table of one network at one hyperparameter setting, under one convention."""

    model: str
    hyperparameters: dict[str, int]
    symbols: dict[str, str]  # symbol -> constructor argument name
    input_channels: sp.Expr
    convention: Convention
    layers: list[Layer]
    divisor: tuple[int, ...]  # one per input size (H, W; T; D, H, W): see `axes`
    exact: bool
    assumptions: list[str]
    unused_weights: int = 0
    unused_trainable_weights: int = 0
    # the network counted and its traced graph; see the network and graph_module properties
    _source: _NetworkSource | None = field(default=None, repr=False, compare=False)
    capture: str = "fx"  # fx, export or concrete (CAPTURES)
    capture_note: str = ""  # why this rung: what the rungs above it could not do
    # concrete capture: resolution -> the rows' raw costs there (formulas in H, W unavailable)
    concrete: dict[tuple[int, int], list[Layer]] | None = field(default=None, repr=False)
    # a forward that branches on sizes, traced at one size: (lhs - rhs, relation, text) that
    # must hold wherever the formulas are evaluated (branch_conditions)
    branches: tuple[tuple[sp.Expr, str, str], ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        # built in steps by the capture rungs, then frozen by analyse(): what a caller holds
        # never changes under it (caches, named with _, are filled on first use)
        if self.__dict__.get("_frozen") and not name.startswith("_"):
            raise AttributeError(
                f"an Analysis does not change once analysed (setting {name!r}); "
                "with_convention() and with_network() return changed copies"
            )
        object.__setattr__(self, name, value)

    def _thawed_copy(self) -> Analysis:
        """Return a shallow copy that may be changed (to build a new analysis from this one)."""
        other = copy(self)
        other.__dict__["_frozen"] = False
        return other

    def _freeze(self) -> Analysis:
        self.__dict__["_frozen"] = True
        return self

    def with_network(self, network: nn.Module,
                     graph_module: torch.fx.GraphModule | None) -> Analysis:
        """Return a copy of this analysis (the same rows) over another network and its traced
        graph: a checkpoint's weights, another device."""
        other = self._thawed_copy()
        other._source = _NetworkSource(network, graph_module)
        return other._freeze()

    @property
    def axes(self) -> tuple[sp.Symbol, ...]:
        """Return the input's symbolic sizes: (H, W), or (T,) for 1-d, (D, H, W) for 3-d."""
        return AXES[len(self.divisor)]

    @property
    def input_text(self) -> str:
        """Return the per-example input shape as --input spells it, e.g. '3xHxW' or '1xT'."""
        return "x".join(str(d) for d in (self.input_channels, *self.axes))

    def require_images(self, what: str) -> None:
        """Raise ValueError when the input is not C x H x W: `what` counts images only."""
        if self.axes != AXES[2]:
            raise ValueError(
                f"{what} counts CxHxW inputs; {self.model} reads {self.input_text} "
                "(convtally table and verify count it)"
            )

    @property
    def symbolic(self) -> bool:
        """Return True when outputs and connections are formulas in H and W."""
        return self.concrete is None

    @property
    def network(self) -> nn.Module | None:
        """Return the network counted, with real weights (built on first use when the analysis
        counted a meta-device build, which has shapes but no weights)."""
        return self._source.real().network if self._source else None

    @network.setter
    def network(self, value: nn.Module | None) -> None:
        graph_module = self._source.real().graph_module if self._source else None
        self._source = _NetworkSource(value, graph_module)

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        """Return the traced graph of `network` (None for an exported or concrete capture
        without one), over the network with real weights."""
        return self._source.real().graph_module if self._source else None

    @graph_module.setter
    def graph_module(self, value: torch.fx.GraphModule | None) -> None:
        network = self._source.real().network if self._source else None
        self._source = _NetworkSource(network, value)

    def graph_at(self, resolution: Sequence[int]) -> torch.fx.GraphModule | None:
        """Return the graph the rows at `resolution` were counted from, over this analysis'
        network: the one traced at that size when fx could trace the forward only size by
        size, else graph_module."""
        graphs = getattr(self, "size_graphs", None)
        if not graphs:
            return self.graph_module
        graph_module = graphs[tuple(resolution)]
        return rebound(graph_module, self.network)

    @property
    def shape_graph_module(self) -> torch.fx.GraphModule | None:
        """Return the traced graph the rows were counted from, without building weights: on
        the meta device when the network was built there (shapes and parameter counts only)."""
        return self._source.graph_module if self._source else None

    @property
    def unknown_layers(self) -> list[Layer]:
        """Return the rows without a rule (counted from the running network; connections 0)."""
        return [layer for layer in self.layers if not layer.known and layer.kind != "unused"]

    @property
    def complete(self) -> bool:
        """Return False when some row has no rule, so the connections total is a lower bound."""
        return not self.unknown_layers

    def capture_text(self) -> str:
        """Return one line saying how the model was captured (printed with every table)."""
        if self.capture == "concrete":
            sizes = ", ".join(size_label(r, short=False) for r in (self.concrete or {}))
            names = ", ".join(map(str, self.axes))
            text = f"concrete (counted at {sizes}; formulas in {names} unavailable"
            return text + (f": {self.capture_note})" if self.capture_note else ")")
        described = {
            "fx": "fx (torch.fx symbolic trace, module rules)",
            "export": "export (torch.export with dynamic H, W, rules on ATen ops)",
        }[self.capture]
        return described + (f"; {self.capture_note}" if self.capture_note else "")

    def total(self, quantity: str) -> sp.Expr:
        """Return the model total of `quantity` as a formula."""
        return sp.expand(sp.Add(*(layer.formula(quantity) for layer in self.layers)))

    def substitutions(self) -> dict[sp.Symbol, int]:
        """Return symbol -> value for the hyperparameters at this analysis' setting."""
        return {
            sp.Symbol(s, integer=True, positive=True): v for s, v in self.hyperparameters.items()
        }

    def check_resolution(self, *sizes: int) -> None:
        """Raise ResolutionError naming the first layer whose formulas do not hold at H x W
        (at T for a 1-d input, D x H x W for a 3-d one)."""
        self.evaluate([sizes])

    def _check_divisibility(self, *sizes: int) -> None:
        for axis, (symbol, value) in enumerate(zip(self.axes, sizes, strict=True)):
            if value < 1:
                raise ResolutionError(f"{symbol} must be a positive integer, got {symbol}={value}")
            need = self.divisor[axis]
            if value % need == 0:
                continue
            layer = next(lay for lay in self.layers if value % lay.divisor[axis] != 0)
            lower = value - value % need
            options = f"{lower} or {lower + need}" if lower > 0 else f"{need}"
            raise ResolutionError(
                f"expected {symbol} divisible by {layer.divisor[axis]} for {layer.name} "
                f"({layer.type}), got {symbol}={value}; the formulas assume {symbol} divisible "
                f"by {need}: try {options}, or --exact for formulas with floor() that hold at "
                "every size"
            )

    def _check_rank(self, sizes: Sequence[int]) -> None:
        if len(sizes) != len(self.axes):
            names = "x".join(map(str, self.axes))
            raise ResolutionError(
                f"expected {len(self.axes)} input size(s) ({names}) for input "
                f"{self.input_text}, got {size_label(sizes, short=False)}; give --res as {names}"
            )

    def evaluate(
        self, resolutions: Sequence[tuple[int, ...]], explain: bool = True
    ) -> dict[str, np.ndarray]:
        """Return quantity -> int array (layers x resolutions) at the given (H, W) pairs ((T,)
        or (D, H, W) for a 1-d or 3-d input); a ResolutionError names the first layer that
        cannot run (and, if `explain`, where it can)."""
        for resolution in resolutions:
            self._check_rank(resolution)
        if self.concrete is not None:
            return self._evaluate_concrete(resolutions)
        for resolution in resolutions:
            self._check_divisibility(*resolution)
        columns = [
            np.array([int(r[axis]) for r in resolutions], dtype=object)
            for axis in range(len(self.axes))
        ]
        count = len(self.layers)
        values = self._compiled_formulas()(*columns)
        sizes, differences, margins, branch_values = self._size_rows(values)
        self._check_branches(branch_values, resolutions)
        if margins.size and (margins < 0).any():
            row, column = np.argwhere(margins < 0)[0]
            index, (_, what) = self._bound_owner[row]
            raise ResolutionError(_read_outside(self.layers[index], resolutions[column], what,
                                                -margins[row, column]))
        if differences.size and (differences != 0).any():
            row, column = np.argwhere(differences != 0)[0]
            index, (a, b, what) = self._requirement_owner[row]
            layer = self.layers[index]
            at = size_label(resolutions[column], short=False)
            if not explain:
                raise ResolutionError(f"{layer.name} cannot run at {at}")
            sides = _holding_sides(a - b, self.substitutions(), self.axes, SIDES_SHOWN + 1)
            rank = len(self.axes)
            shown = sides[:SIDES_SHOWN]
            runnable = [side for side, runs in zip(
                shown, self.runnable([(side,) * rank for side in shown]), strict=True) if runs]
            raise ResolutionError(
                f"{layer.name} ({layer.type}) cannot run at {at}: {what} "
                f"({a} = {b}){_where_it_holds(runnable, rank, len(sides) <= SIDES_SHOWN)}"
            )
        if sizes.size and (sizes < 1).any():
            row, column = np.argwhere(sizes < 1)[0]
            layer = self.layers[self._size_owner[row]]
            resolution = resolutions[column]
            at = dict(zip(self.axes, resolution, strict=True))
            shape = [
                int(sp.sympify(d).subs({**at, **self.substitutions()}))
                for d in layer.output_shape
            ]
            raise ResolutionError(
                f"input {size_label(resolution, short=False)} is too small: {layer.name} "
                f"({layer.type}) would output shape {tuple(shape)}; try a larger resolution"
            )
        return {q: values[i * count : (i + 1) * count] for i, q in enumerate(QUANTITIES)}

    def runnable(self, resolutions: Sequence[tuple[int, ...]]) -> list[bool]:
        """Return, per resolution, whether every layer can run there (where evaluate would
        not refuse it), all of them evaluated at once."""
        if self.concrete is not None:
            return [tuple(r) in self.concrete for r in resolutions]
        usable = [len(r) == len(self.axes) and all(v >= 1 and v % d == 0 for v, d in
                                                   zip(r, self.divisor, strict=True))
                  for r in resolutions]
        checked = [r for r, ok in zip(resolutions, usable, strict=True) if ok]
        if not checked:
            return usable
        columns = [np.array([int(r[axis]) for r in checked], dtype=object)
                   for axis in range(len(self.axes))]
        sizes, differences, margins, branch_values = self._size_rows(
            self._compiled_formulas()(*columns))
        runs = np.ones(len(checked), dtype=bool)
        if sizes.size:
            runs &= ~(sizes < 1).any(axis=0)
        if differences.size:
            runs &= ~(differences != 0).any(axis=0)
        if margins.size:
            runs &= ~(margins < 0).any(axis=0)
        for (_, relation, _), row in zip(self.branches, branch_values, strict=True):
            runs &= rules.RELATIONS[relation](row, 0).astype(bool)
        answers = iter(runs.tolist())
        return [ok and next(answers) for ok in usable]

    def _size_rows(self, values: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return the rows of the compiled values after the quantities: the output sizes, the
        size agreements' differences, the index margins and the branch conditions."""
        sizes_start = len(QUANTITIES) * len(self.layers)
        agreements_start = sizes_start + len(self._size_owner)
        bounds_start = agreements_start + len(self._requirement_owner)
        branches_start = len(values) - len(self.branches)
        return (values[sizes_start:agreements_start], values[agreements_start:bounds_start],
                values[bounds_start:branches_start], values[branches_start:])

    def _check_branches(self, values: np.ndarray, resolutions: Sequence[tuple[int, ...]]
                        ) -> None:
        """Raise ResolutionError where a branch the forward took at the traced size goes the
        other way (`values`: each condition's lhs - rhs, conditions x resolutions)."""
        for (_, relation, text), row in zip(self.branches, values, strict=True):
            failing = np.flatnonzero(~rules.RELATIONS[relation](row, 0).astype(bool))
            if failing.size:
                at = size_label(resolutions[failing[0]], short=False)
                other = "concrete" if self.capture == "export" else "export"
                raise ResolutionError(
                    f"{self.model} takes another branch at {at}: its forward tests {text}, "
                    f"which held where it was traced and not here; ask for this size alone "
                    f"(--res), or --capture {other}"
                )

    def _evaluate_concrete(self, resolutions: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
        captured = list(self.concrete)
        missing = [r for r in resolutions if tuple(r) not in self.concrete]
        if missing:
            raise ResolutionError(
                f"{self.model} was counted concretely at "
                f"{', '.join(size_label(r, short=False) for r in captured)}, not at "
                f"{size_label(missing[0], short=False)} "
                f"({self.capture_note or 'no symbolic capture'}); pass the resolution with "
                "--res so it is captured too"
            )
        values = {q: np.zeros((len(self.layers), len(resolutions)), dtype=object)
                  for q in QUANTITIES}
        for j, resolution in enumerate(resolutions):
            for quantity, column in zip(QUANTITIES, self._concrete_column(tuple(resolution)),
                                        strict=True):
                values[quantity][:, j] = column
        return values

    def _concrete_column(self, resolution: tuple[int, ...]) -> tuple[list[int], ...]:
        """Return (weights, outputs, connections) of every row at a counted resolution under
        this analysis' convention, worked out once: answer_every_resolution and totals_at
        each evaluate it (two fifths of a small ViT's concrete analysis)."""
        memo = self.__dict__.get("_concrete_columns")
        if memo is None or memo[0] is not self.convention:  # a copy under another convention
            memo = (self.convention, {})
            self._concrete_columns = memo
        if resolution in memo[1]:
            return memo[1][resolution]
        substitution = self.substitutions()
        rows = self.concrete[resolution]
        # rows counted under this very convention carry their counts (concrete_analysis)
        counted_here = self.__dict__.get("_rows_convention") is self.convention
        counts: dict[tuple[LayerCost, bool], dict[str, sp.Expr]] = {}
        column: tuple[list[int], ...] = ([], [], [])
        for i, layer in enumerate(self.layers):
            if layer.kind == "unused" or i >= len(rows):
                numbers = (layer.weights, layer.outputs, layer.connections)
            elif counted_here:
                numbers = (rows[i].weights, rows[i].outputs, rows[i].connections)
            else:
                cost, known = rows[i].cost, rows[i].known
                try:
                    count = counts.get((cost, known))  # a network repeats its layers
                except TypeError:  # a cost holding a list (an exported op's outputs)
                    count = counted(cost, known, self.convention)
                if count is None:
                    count = counts[(cost, known)] = counted(cost, known, self.convention)
                numbers = (count["weights"], cost.outputs, count["connections"])
            for values, number in zip(column, numbers, strict=True):
                if isinstance(number, sp.Integer):  # most counts are numbers already
                    values.append(number.p)
                    continue
                number = sp.sympify(number)
                if not number.is_Integer:
                    number = number.subs(substitution).subs({BATCH: 1})
                values.append(int(number))
        memo[1][resolution] = column
        return column

    def _compiled_formulas(self) -> IntegerEvaluator:
        if getattr(self, "_compiled", None) is None:
            setting = tuple(sorted(self.substitutions().items(), key=lambda item: item[0].name))

            def at_setting(expression: sp.Expr) -> sp.Expr:
                return _at_setting(sp.sympify(expression), setting)

            formulas = [
                at_setting(layer.formula(q)) for q in QUANTITIES for layer in self.layers
            ]
            self._size_owner = []
            sized = remembered_by_identity(lambda size: sp.sympify(size).has(*self.axes))
            for index, layer in enumerate(self.layers):
                for dimension in layer.output_shape:
                    if sized(dimension):
                        formulas.append(at_setting(dimension))
                        self._size_owner.append(index)
            self._requirement_owner = []
            for index, layer in enumerate(self.layers):
                for requirement in layer.requirements:
                    formulas.append(at_setting(requirement[0] - requirement[1]))
                    self._requirement_owner.append((index, requirement))
            self._bound_owner = []
            for index, layer in enumerate(self.layers):
                for bound in layer.bounds:
                    formulas.append(at_setting(bound[0]))
                    self._bound_owner.append((index, bound))
            formulas.extend(at_setting(difference) for difference, _, _ in self.branches)
            self._compiled = IntegerEvaluator(formulas, self.axes)
        return self._compiled

    def with_convention(self, convention: Convention) -> Analysis:
        """Return a new analysis: these rows' raw costs counted under another convention (no
        re-tracing); this one is unchanged."""
        other = self._thawed_copy()
        other.convention = convention
        other._compiled = None  # the formulas change with the convention
        other._exact_again = None  # it would count under this analysis' convention
        other.layers = []
        raw = self.exact or FLOORS_KEPT in self.assumptions

        def simplify(expression: sp.Expr) -> sp.Expr:
            return sp.sympify(expression) if raw else _simplify(expression, self.divisor)

        for layer in self.layers:
            if layer.kind == "unused":
                continue
            clone = copy(layer)
            for quantity, value in counted(layer.cost, layer.known, convention).items():
                setattr(clone, quantity, simplify(value))
            other.layers.append(clone)
        if self.unused_weights:
            other.assumptions = [
                _unused_note(self.unused_weights, convention.unused_weights)
                if a == _unused_note(self.unused_weights, self.convention.unused_weights)
                else a
                for a in self.assumptions
            ]
            if convention.unused_weights:
                other.layers.append(
                    _unused_row(
                        convention,
                        self.unused_weights,
                        self.unused_trainable_weights,
                        self.divisor,
                    )
                )
        return other._freeze()

    def totals_at(self, resolutions: Sequence[tuple[int, ...]]) -> dict[str, list[int]]:
        """Return quantity -> list of totals, one per resolution."""
        values = self.evaluate(resolutions)
        return {q: [int(v) for v in values[q].sum(axis=0)] for q in QUANTITIES}

    def to_dict(
        self,
        resolutions: Sequence[tuple[int, ...]],
        labels: Sequence[str],
        values_as: Callable[[list[str], list[int]], Any] | None = None,
    ) -> dict:
        """Return the JSON contract: model, hyperparameters, convention, assumptions, layers,
        totals (formula and values per resolution label). `values_as(labels, ints)` makes each
        "values" entry (default: the dict label -> int); a renderer may keep them as lists."""
        values = self.evaluate(resolutions)
        labels = list(labels)

        def labelled(ints: list[int]) -> Any:
            if values_as is None:
                return dict(zip(labels, ints))
            return values_as(labels, ints)

        layers = []
        for index, layer in enumerate(self.layers):
            row = {
                "name": layer.name,
                "type": layer.type,
                "kind": layer.kind,
                "output_shape": [_printed(d) for d in layer.output_shape],
                "known": layer.known,  # False: no rule, counted from the running network
            }
            for quantity in QUANTITIES:
                row[quantity] = {
                    "formula": _printed(layer.formula(quantity))
                    if self._has_formula(quantity)
                    else None,
                    "values": labelled(list(map(int, values[quantity][index].tolist()))),
                }
            layers.append(row)
        totals = {}
        for quantity in QUANTITIES:
            sums = values[quantity].sum(axis=0)
            totals[quantity] = {
                "formula": str(self.total(quantity)) if self._has_formula(quantity) else None,
                "values": labelled(list(map(int, sums.tolist()))),
            }
        totals["connections"]["complete"] = self.complete
        return {
            "model": self.model,
            "hyperparameters": {
                s: {"name": self.symbols[s], "value": v} for s, v in self.hyperparameters.items()
            },
            "convention": self.convention.as_dict(),
            "assumptions": list(self.assumptions),
            "capture": self.capture,
            "capture_note": self.capture_note,
            "input": self.input_text,
            "symbolic": self.symbolic,  # false: formulas in H, W unavailable (concrete capture)
            "complete": self.complete,
            "unknown_layers": [f"{lay.name} ({lay.type})" for lay in self.unknown_layers],
            "layers": layers,
            "totals": totals,
        }

    def _has_formula(self, quantity: str) -> bool:
        return self.symbolic or quantity == "weights"


def counted(cost: LayerCost, known: bool, convention: Convention) -> dict[str, sp.Expr]:
    """Return a row's weights and connections from its raw cost under `convention` (the one
    place a convention is applied: when rows are counted, and again by with_convention and a
    concrete capture's values); a row without a rule has connections 0."""
    weights, connections = counted_pair(cost, known, convention)
    return {"weights": weights, "connections": connections}


def counted_pair(cost: LayerCost, known: bool, convention: Convention
                 ) -> tuple[sp.Expr, sp.Expr]:
    """Return counted's (weights, connections) as a pair."""
    try:
        return _counted_once(cost, known, convention)
    except TypeError:  # an unhashable cost (none known): counted uncached
        return _counted_once.__wrapped__(cost, known, convention)


@functools.lru_cache(maxsize=16384)
def _counted_once(cost: LayerCost, known: bool, convention: Convention
                  ) -> tuple[sp.Expr, sp.Expr]:
    """Return counted's (weights, connections): a network repeats its layers' costs, and so do
    networks of a family and the analyses of one network in a loop (costs and conventions are
    frozen, so each is counted once)."""
    return (convention.weights(cost),
            convention.connections(cost) if known else sp.Integer(0))


@functools.lru_cache(maxsize=16384)
def _printed(expression: sp.Expr) -> str:
    """Return str(expression), printed once: a network's layers repeat few distinct formulas
    (and nasnetalarge states one size agreement in many cells)."""
    return str(expression)


@functools.lru_cache(maxsize=65536)
def _at_setting(expression: sp.Expr, setting: tuple[tuple[sp.Symbol, int], ...]) -> sp.Expr:
    """Return `expression` with the hyperparameters at `setting`; layers, and analyses of the
    same model, repeat few distinct formulas (sympy expressions are immutable)."""
    return expression.subs(dict(setting)) if setting else expression


@dataclass
class _NetworkSource:
    """The network an analysis counted and its traced graph; `build` is set while they are a
    meta-device build, and makes the network with real weights (and retraces it) on first use."""

    network: nn.Module | None
    graph_module: torch.fx.GraphModule | None
    build: Callable[[], nn.Module] | None = None

    def real(self) -> _NetworkSource:
        """Return this source with a network that has real weights (built now if need be)."""
        if self.build is not None:
            network = self.build().eval()
            if self.graph_module is not None and (
                    "branches" in self.graph_module.meta
                    or "size_only" in self.graph_module.meta):
                # traced at a probe size on the meta build: the same graph over real weights
                # (a plain trace of the real build refuses the branches again)
                self.graph_module = rebound(self.graph_module, network)
            elif self.graph_module is not None:
                self.graph_module = trace(network)
            self.network = network
            self.build = None
        return self


# --- interpretation ------------------------------------------------------------------------


def _contains_tensor(value: Any) -> bool:
    return any(isinstance(v, SymTensor) for v in flat_values(value))


def _node_label(node: torch.fx.Node, seen: dict[str, int]) -> tuple[str, str]:
    if node.op == "call_module":
        name, kind = node.target, None
    else:
        scope = module_scope(node)
        base = node.target if isinstance(node.target, str) else node.target.__name__
        name, kind = (f"{scope}.{base}" if scope else base), base
    count = seen[name] = seen.get(name, 0) + 1
    return (name if count == 1 else f"{name}:{count}"), kind


def _unknown_output(
    node, graph_module, input_tensor: SymTensor, channels: int, size=(H, W)
) -> SymTensor:
    # The layer has no rule: read its output shape from two real runs and accept it only when
    # it is the input shape (or does not change with the resolution). At a concrete size, one
    # run at that size gives it.
    if all(sp.sympify(d).is_Integer for d in size):
        sizes = tuple(int(d) for d in size)
        shape = concrete_shapes(graph_module, (1, channels, *sizes))[node.name]
        if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
            return SymTensor((BATCH, *(sp.Integer(d) for d in shape[1:])))
        raise UnsupportedLayer(f"{node.target}: unknown layer whose output is not one tensor")
    inputs = [(1, channels, *(side,) * len(size)) for side in (64, 96)]
    runs = [concrete_shapes(graph_module, shape)[node.name] for shape in inputs]
    first = node.args[0].name if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if first is not None:
        inputs = [concrete_shapes(graph_module, shape)[first] for shape in inputs]
    if runs[0] == inputs[0] and runs[1] == inputs[1]:
        return SymTensor(input_tensor.shape)
    if runs[0] == runs[1]:
        return SymTensor((BATCH, *(sp.Integer(d) for d in runs[0][1:])))
    if not all(isinstance(run, tuple) and all(isinstance(d, int) for d in run) for run in runs):
        raise UnsupportedLayer(
            f"{node.target}: no rule for this layer, and its output is not one tensor, so its "
            "shape cannot be read from a run either"
        )
    raise UnsupportedLayer(
        f"{node.target}: no rule for this layer, and its output shape changes with the input "
        f"size in a way that is not the input's shape ({tuple(runs[0][1:])} at 64, "
        f"{tuple(runs[1][1:])} at 96), so no formula in the input size can be read from runs"
    )


CAPTURES = ("auto", "fx", "export", "concrete")


@dataclass
class _Prepared:
    """A network built for analysis, with its hyperparameters and attribute table.

    `shapes` is the network built on the meta device (structure and shapes, no weights), which
    is all the fx rung needs; `network` is built with real weights on first use (the export
    and concrete rungs run it), or is the module the caller gave. `meta` keeps the meta build
    when `shapes` is given up (the export rung's size check runs on it).
    """

    built: nn.Module | None
    values: dict[str, int]
    names: dict[str, str]
    attributes: dict
    input_channels: sp.Expr
    name: str
    build: Callable[[], nn.Module] | None = None
    shapes: nn.Module | None = None
    axes: tuple[sp.Symbol, ...] = (H, W)  # the input's sizes after its channels (--input)
    meta: nn.Module | None = None
    copy_to_meta: bool = False  # a caller's module: meta_network() copies it on first use
    given: bool = False  # a caller's module (not built here)
    plain_traces: dict[int, torch.fx.GraphModule | ValueError] = field(default_factory=dict)
    # size -> the meta build's graph the fx rung traced there and refused for other sizes (a
    # pinned branch): the graph the concrete rung would trace at that size
    probe_graphs: dict[tuple[int, ...], torch.fx.GraphModule] = field(default_factory=dict)

    def trace(self, module: nn.Module, probe: torch.Tensor | None = None
              ) -> torch.fx.GraphModule:
        """Return trace(module, probe), a plain trace made once per module: the concrete rung
        counts the graph the fx rung traced and could not count symbolically (a ViT's size
        assert), and hears a refused trace's answer again without tracing again."""
        known = self.plain_traces.get(id(module))
        if isinstance(known, ValueError):
            if probe is None or "control flow" not in str(known):
                raise known
        elif known is not None:
            return known
        # a caller's module traced at a probe: its branches are decided on its meta copy
        copy = self.meta_network if probe is not None and module is self.built else None
        try:
            graph_module = trace(module, probe, meta_copy=copy)
        except ValueError as error:
            self.plain_traces[id(module)] = error
            raise
        if "branches" not in graph_module.meta:  # traced at the probe: not for other sizes
            self.plain_traces[id(module)] = graph_module
        return graph_module

    def meta_network(self) -> nn.Module | None:
        """Return the meta build, or a meta copy of the caller's module (made on first use:
        the fx rung, which most models stop at, does not need it)."""
        if self.meta is None and self.copy_to_meta:
            self.copy_to_meta = False
            self.meta = _meta_copy(self.network)
        return self.meta

    @property
    def network(self) -> nn.Module:
        """Return the network with real weights, building it on first use."""
        if self.built is None:
            self.built = self.build().eval()
        return self.built

    @property
    def channels(self) -> int:
        if self.input_channels.is_Integer:  # no hyperparameter in it (a caller's network)
            return int(self.input_channels)
        return int(
            self.input_channels.subs(
                {sp.Symbol(s, integer=True, positive=True): v for s, v in self.values.items()}
            )
        )


def parse_input(text: str) -> tuple[int | None, tuple[sp.Symbol, ...]]:
    """Return (channels or None, the symbolic sizes) from an --input such as '1xHxW', 'CxHxW',
    '2xT' (1-d) or '3xDxHxW' (3-d); C leaves the channels to the model."""
    parts = [p.strip() for p in text.split("x")]
    names = tuple(p.upper() for p in parts[1:])
    shapes = {tuple(map(str, axes)): axes for axes in AXES.values()}
    channels: int | None = None
    if parts[0].upper() != "C":
        try:
            channels = int(parts[0])
        except ValueError:
            channels = 0
    if names not in shapes or channels is not None and channels < 1:
        raise ValueError(
            f"bad --input {text!r}: use CxHxW (images), CxT (1-d) or CxDxHxW (3-d), with C the "
            "number of input channels or the letter C for the model's own, e.g. 1xHxW or 2xT"
        )
    return channels, shapes[names]


def _prepare(
    model: str | ModelSpec | nn.Module,
    settings: Mapping[str, int] | None,
    input_shape: str | None = None,
) -> _Prepared:
    prepared = _prepare_model(model, settings)
    if input_shape is not None:
        channels, prepared.axes = parse_input(input_shape)
        if channels is not None:
            prepared.input_channels = sp.Integer(channels)
    else:  # a network of Conv1d (Conv3d) layers reads C x T (C x D x H x W)
        network = prepared.shapes if prepared.shapes is not None else prepared.network
        prepared.axes = AXES[declared_input_rank(network)]
    return prepared


def _prepare_model(
    model: str | ModelSpec | nn.Module, settings: Mapping[str, int] | None
) -> _Prepared:
    if isinstance(model, str):
        model = resolve(model)
    if isinstance(model, ModelSpec):
        spec, settings = with_builder_keywords(model, settings)
        values = spec.settings(settings)
        # counting needs shapes, not weights: build on the meta device (no initialisation, no
        # memory) and make real weights only when something runs the network
        shapes = spec.build_meta(values)
        built = spec.build(values).eval() if shapes is None else None
        symbols = hyperparameter_symbols(spec)
        if isinstance(spec.input_channels, str):
            input_channels = symbols[spec.input_channels]
        elif spec.input_channels is None:  # a user's module: as its first convolution takes
            input_channels = sp.Integer(
                declared_input_channels(shapes if shapes is not None else built))
        else:
            input_channels = sp.Integer(spec.input_channels)
        return _Prepared(
            built,
            values,
            {hp.symbol: hp.name for hp in spec.hyperparameters},
            fit_attributes(spec, values, shapes if shapes is not None else built),
            input_channels,
            spec.name,
            build=lambda: spec.build(values),
            shapes=shapes.eval() if shapes is not None else None,
            meta=shapes,
        )
    # put in evaluation, as analysed; one already there (a benchmark's or a loop's network, built
    # once) is not walked again by train(False), which sets every module's flag anew
    network = model.eval() if any(module.training for module in each_module(model)) else model
    return _Prepared(
        network,
        {},
        {},
        concrete_attributes(network),
        sp.Integer(declared_input_channels(network)),
        type(network).__name__,
        copy_to_meta=True,
        given=True,
    )


def _meta_copy(network: nn.Module) -> nn.Module | None:
    """Return a copy of `network` in evaluation whose parameters and buffers are on the meta
    device (their data is never copied), for the size check and concrete count that need
    shapes only; None when the network cannot be copied."""
    memo: dict[int, Any] = {}
    try:
        return _module_copy(network, memo, {})
    except Exception:  # noqa: BLE001 - an unusual module: the deep copy decides
        pass
    for tensor in [*network.parameters(), *network.buffers()]:
        _meta_tensor(tensor, memo)
    try:
        return deepcopy(network, memo).eval()
    except Exception:  # a module that refuses deepcopy: the real network decides
        return None


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")


def _meta_tensor(tensor: torch.Tensor, tensors: dict[int, Any]) -> torch.Tensor:
    """Return the meta-device stand-in of a parameter or buffer (a Parameter for a Parameter),
    made once per tensor and kept in `tensors` by the original's id (a tensor registered
    twice stays one tensor; the originals outlive the copy, so no id is reused)."""
    found = tensors.get(id(tensor))
    if found is None:
        empty = torch.empty_like(tensor, device="meta")
        found = tensors[id(tensor)] = (
            nn.Parameter(empty, requires_grad=tensor.requires_grad)
            if isinstance(tensor, nn.Parameter) else empty)
    return found


def _module_copy(module: nn.Module, tensors: dict[int, Any], copies: dict[int, nn.Module]
                 ) -> nn.Module:
    """Return a copy of the module tree with its parameters and buffers swapped for their
    meta-device stand-ins (_meta_tensor, kept in `tensors`): each module a new object, its
    dicts, lists and sets copied one level (a cache the forward fills stays the caller's),
    other attributes shared. A deep copy walks every attribute of every module (cProfile: a
    tenth of timm bat_resnext26ts's analysis)."""
    if id(module) in copies:  # a module registered twice stays one module
        return copies[id(module)]
    clone = module.__class__.__new__(module.__class__)
    copies[id(module)] = clone
    state = {key: (value.copy() if isinstance(value, (dict, list, set)) else value)
             for key, value in module.__dict__.items() if key not in _MODULE_TABLES}
    # in evaluation, as .eval() would leave it (without walking the tree again, a fifth of
    # this copy): the network copied was put in evaluation by analyse, its own train() run
    state["training"] = False
    state["_parameters"] = {k: None if v is None else _meta_tensor(v, tensors)
                            for k, v in module._parameters.items()}
    state["_buffers"] = {k: None if v is None else _meta_tensor(v, tensors)
                         for k, v in module._buffers.items()}
    state["_modules"] = {k: None if v is None else _module_copy(v, tensors, copies)
                         for k, v in module._modules.items()}
    clone.__dict__.update(state)
    return clone


def analyse(
    model: str | ModelSpec | nn.Module,
    settings: Mapping[str, int] | None = None,
    convention: Convention = DEFAULT,
    exact: bool = False,
    allow_unknown: bool = False,
    capture: str = "auto",
    resolutions: Sequence[tuple[int, ...] | str] | None = None,
    input_shape: str | None = None,
) -> Analysis:
    """Return the cost table of `model` (registry name, spec or module).

    `capture` picks the rung: fx (symbolic, module rules), export (torch.export with dynamic
    H, W, ATen rules), concrete (counted at each of `resolutions`), or auto: the first of
    fx, export, concrete that works, the reasons the others did not said in the analysis.
    `input_shape` is the per-example input as --input spells it ('1xHxW', '2xT' for a 1-d
    input, '3xDxHxW' for a 3-d one); by default C x H x W with C as the model declares, or
    C x T (C x D x H x W) for a network of 1-d (3-d) convolutions. A resolution may be given
    as --res spells it ('16000'), read for the input's sizes.
    """
    if capture not in CAPTURES:
        raise ValueError(f"unknown capture {capture!r}; use one of {', '.join(CAPTURES)}")
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(
            f"settings must map hyperparameter names to integers (e.g. {{'NF': 32}}), got "
            f"{type(settings).__name__}; a convention is passed as convention=..."
        )
    if settings and isinstance(model, nn.Module):
        raise ValueError(
            f"settings {dict(settings)} are for a model built by name; "
            f"{type(model).__name__} is built already: build it with them, or pass its name"
        )
    with _collector_paused():
        return _analyse(model, settings, convention, exact, allow_unknown, capture,
                        resolutions, input_shape)._freeze()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a model is analysed: tracing and sympy
    allocate many small objects, and each full collection walks every object alive (torch's
    modules, sympy's caches), a third of a 0.2 s analysis (timm rexnet_100). What became
    garbage is collected when the collector next runs."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _analyse(model: str | ModelSpec | nn.Module, settings: Mapping[str, int] | None,
             convention: Convention, exact: bool, allow_unknown: bool, capture: str,
             resolutions: Sequence[tuple[int, ...] | str] | None,
             input_shape: str | None) -> Analysis:
    prepared = _prepare(model, settings, input_shape)
    if resolutions is not None:
        rank = len(prepared.axes)
        resolutions = [
            parse_resolution(r, rank) if isinstance(r, str) else tuple(r) for r in resolutions
        ]
    if capture == "fx":
        return _analyse_fx(prepared, convention, exact, allow_unknown, resolutions)
    if capture == "concrete":
        return _analyse_concrete(prepared, convention, allow_unknown, resolutions)
    if capture == "export":
        from convtally.analysis.export_capture import analyse_exported

        return analyse_exported(prepared, convention, exact, allow_unknown, resolutions)
    return _analyse_auto(prepared, convention, exact, allow_unknown, resolutions)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# auto's time for the export rung: PyTorch's symbolic shapes can take many minutes on windowed
# attention (timm's DaViT), where the concrete rung takes a second; --capture export waits.
# 90 s: mobilevit_s, mobilenetv5_300m and sequencer2d_l export in 60-90 s on a 2-core CPU
EXPORT_SECONDS = 90


def export_seconds() -> float:
    """Return auto's time for the export rung: CONVTALLY_EXPORT_SECONDS, else EXPORT_SECONDS."""
    text = os.environ.get("CONVTALLY_EXPORT_SECONDS")
    if text is None:
        return EXPORT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"CONVTALLY_EXPORT_SECONDS must be a positive number of seconds, got {text!r}; "
            "unset it for the default of 90"
        )
    return seconds


class OutOfTime(RuntimeError):
    """A rung ran past its time budget."""


@contextlib.contextmanager
def _time_budget(seconds: float, what: str):
    """Raise OutOfTime in the block after `seconds` (main thread only, by SIGALRM); an outer
    timer that fires sooner is left alone, and a later one is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if outer and outer <= seconds:
        yield
        return

    def out_of_time(*_):
        raise OutOfTime(f"{what} ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, out_of_time)
    started = time.monotonic()
    # the alarm repeats: one that lands where Python swallows exceptions (a weakref callback
    # run by the garbage collector inside torch.export: "Exception ignored in ...") let
    # davit's export run on for minutes; the next one, 5 s later (time for torch's own
    # clean-up as the first unwinds), stops it
    signal.setitimer(signal.ITIMER_REAL, seconds, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL,
                             max(outer - (time.monotonic() - started), 1e-3), outer_interval)


def _analyse_auto(prepared, convention, exact, allow_unknown, resolutions) -> Analysis:
    from convtally.analysis.export_capture import analyse_exported

    reasons: list[str] = []
    first_error: Exception | None = None
    budget = export_seconds()  # a bad CONVTALLY_EXPORT_SECONDS is refused before any rung

    def export_within_budget() -> Analysis:
        with _time_budget(budget, "torch.export"):
            return answers_every_size(
                analyse_exported(prepared, convention, exact, allow_unknown, resolutions))

    def fx() -> Analysis:
        return answers_every_size(
            _analyse_fx(prepared, convention, exact, allow_unknown, resolutions))

    def answers_every_size(analysis: Analysis) -> Analysis:
        for resolution in (resolutions or ()) if analysis.branches else ():
            try:
                analysis._check_branches(_branch_values(analysis, resolution), [resolution])
            except ResolutionError as error:  # one traced graph cannot answer every size
                raise ValueError(str(error).split(";")[0]) from None
        return analysis

    attempts = (
        ("fx", fx),
        ("export", export_within_budget),
        ("concrete", lambda: _analyse_concrete(prepared, convention, allow_unknown, resolutions)),
    )
    for rung, attempt in attempts:
        if rung == "export" and isinstance(first_error, NoClosedForm):
            # hieradet's pooled windows: torch.export ran out auto's whole budget on them
            reasons.append("export: not tried, since its symbolic shapes meet the same floors "
                           "and remainders (--capture export tries it)")
            continue
        if (rung == "export" and isinstance(first_error, PinnedBranch) and resolutions
                and tuple(resolutions[0]) == first_error.probe):
            # torch.export traces the same branch there and records the same equality, which
            # its rung refuses: efficientvit_m0 and tiny_vit spent 30-40 s learning that
            reasons.append("export: not tried, since torch.export takes the same branch at "
                           f"{size_label(first_error.probe, short=False)}, whose guard pins the "
                           "input size (--capture export tries it)")
            continue
        if rung == "export" and isinstance(first_error, AssertedSize):
            refusal = _export_refuses_assert(first_error, prepared, resolutions)
            if refusal:
                reasons.append(f"export: {refusal}")
                continue
        try:
            analysis = attempt()
        except (ValueError, NotImplementedError, RuntimeError, TypeError, KeyError) as error:
            first_error = first_error or error
            reasons.append(f"{rung}: {_first_line(error)}")
            continue
        if reasons:
            analysis.capture_note = "; ".join(
                [*reasons, *([analysis.capture_note] if analysis.capture_note else [])]
            )
        return analysis
    error_type = type(first_error) if isinstance(first_error, ValueError) else ValueError
    if "assert" in reasons[-1].lower():  # the model checks its input size at every rung
        reasons[-1] += (" (a size the model asserts against: ask for its own size, or build it at"
                        " yours: torchvision: and timm: models take builder keywords, e.g. "
                        "--set image_size=N for torchvision's ViT, img_size=N for timm's)")
    raise error_type(" | ".join(reasons)) from None


def _export_refuses_assert(error: AssertedSize, prepared: _Prepared, resolutions) -> str | None:
    """Return why the export rung would refuse a model whose forward asserts a pinned size:
    the assert fails at twice the size export probes, where the rung runs the model first (as
    botnet26t's and visformer's do); None where that is not certain."""
    from convtally.analysis.export_capture import PROBE

    if len(prepared.axes) != 2 or error.difference is None:
        return None
    probe = tuple(resolutions[0]) if resolutions else PROBE
    if error.branched:  # the assert may hold on another branch (a branch before it that
        return None  # pins the size was refused as a PinnedBranch where the fx rung met it)
    other = [2 * side for side in probe]
    value = error.difference.xreplace(
        {axis: sp.Integer(side) for axis, side in zip(prepared.axes, other, strict=True)})
    if not value.is_number or value == 0:
        return None
    return (f"not tried, since at {other[0]}x{other[1]}, twice {probe[0]}x{probe[1]}, the "
            "forward's assert fails (where the export rung runs it first): its input size is "
            "fixed")


def _branch_values(analysis: Analysis, resolution: Sequence[int]) -> np.ndarray:
    """Return each branch condition's lhs - rhs at one resolution (conditions x 1)."""
    at = {**dict(zip(analysis.axes, resolution, strict=True)), **analysis.substitutions()}
    return np.array([[sp.sympify(difference).subs(at)] for difference, _, _ in analysis.branches],
                    dtype=object)


def _probe(prepared: _Prepared, resolutions, network: nn.Module | None
           ) -> torch.Tensor | None:
    """Return the meta-device input a forward that branches on sizes is traced at: the first
    resolution asked for, else the size the model declares (timm's input_size), else 224."""
    if network is None or len(prepared.axes) != 2:
        return None
    if resolutions:
        size = tuple(resolutions[0])
    else:
        config = getattr(network, "pretrained_cfg", None)
        declared = config.get("input_size") if isinstance(config, dict) else None
        size = tuple(declared[1:]) if declared else (224, 224)
    return torch.zeros(1, int(prepared.channels), *size, device="meta")


def _analyse_fx(prepared: _Prepared, convention, exact, allow_unknown,
                resolutions=None) -> Analysis:
    if prepared.shapes is not None:
        # the meta-device build: the same graph and shapes without weights; anything it cannot
        # do (a layer without a rule run for its shape, code that reads tensor values) falls
        # back to the real build below, so the answer and the errors are the real build's. A
        # ValueError (an untraceable forward, an op without a rule, a size check on symbolic
        # sizes) is the real build's answer too: building real weights to hear it again cost
        # a ViT-B a second
        try:
            graph_module = prepared.trace(prepared.shapes,
                                           _probe(prepared, resolutions, prepared.shapes))
            return _count_fx(prepared, graph_module, convention, exact, allow_unknown)
        except ValueError as error:
            prepared.shapes = None
            if "meta" not in str(error):  # a trace that failed on meta tensors only is retried
                raise
        except Exception:
            prepared.shapes = None
    try:
        # a caller's module: traced once, its branches (if any) decided at the probe size
        graph_module = prepared.trace(prepared.network, _probe(
            prepared, resolutions, prepared.network) if prepared.given else None)
    except ValueError as error:
        # one that branches where its meta copy gives no value: its meta copy traced at the
        # probe size, as a forward of the meta build is
        meta = prepared.meta_network() if "control flow" in str(error) else None
        probe = _probe(prepared, resolutions, meta)
        if probe is None:
            raise
        prepared.plain_traces[id(meta)] = error  # its copy's plain trace refuses the same
        try:
            graph_module = trace(meta, probe, branching=True)
        except ValueError:
            raise error from None  # the real build's refusal is the answer
        return _count_fx(prepared, graph_module, convention, exact, allow_unknown)
    if "plain_refusal" in graph_module.meta:  # its meta copy's plain trace refuses the same
        prepared.plain_traces[id(prepared.meta_network())] = graph_module.meta["plain_refusal"]
    return _count_fx(prepared, graph_module, convention, exact, allow_unknown, shapes=False)


def _count_fx(prepared, graph_module, convention, exact, allow_unknown, shapes: bool = True
              ) -> Analysis:
    """Return the fx Analysis of a graph (of the meta build, or with `shapes` False of the real
    network); a graph traced at the probe size and refused for other sizes (a pinned branch or
    assert) is kept for the concrete rung, which needs that very graph at that size."""
    try:
        layers = _interpret_prepared(prepared, graph_module, convention, allow_unknown)
        return _finish_fx(prepared, graph_module, layers, convention, exact, shapes=shapes)
    except (PinnedBranch, AssertedSize):
        probe = graph_module.meta.get("probe")
        if probe is not None:
            prepared.probe_graphs[tuple(probe)] = graph_module
        raise


def _finish_fx(prepared, graph_module, layers, convention, exact, shapes) -> Analysis:
    """Return _finish's Analysis of the fx rows; a simplified one keeps the rows as counted, so
    that its exact form (floor() kept) is made from them without tracing again."""
    batch_note = _count_at_batch_one(layers)  # before the copies: both forms need it
    raw = [copy(layer) for layer in layers]
    used = _used_parameters(graph_module)
    analysis = _finish(prepared, graph_module, layers, convention, exact, shapes=shapes,
                       used_parameters=used, batch_note=batch_note)
    if not exact:
        analysis._exact_again = lambda: _finish(
            prepared, graph_module, [copy(layer) for layer in raw], convention, True,
            shapes=shapes, used_parameters=used, batch_note=batch_note,
        )
    return analysis


def _interpret_prepared(
    prepared, graph_module, convention, allow_unknown, size=None
) -> list[Layer]:
    """Return the rows of `prepared`'s traced graph with the input sizes `size` (integers, one
    per axis; by default the symbols H, W or what --input gave)."""
    return _interpret(
        graph_module,
        prepared.attributes,
        prepared.input_channels,
        convention,
        allow_unknown,
        prepared.channels,
        size=prepared.axes if size is None else size,
    )


def _analyse_concrete(prepared, convention, allow_unknown, resolutions) -> Analysis:
    """Count the fx graph at each resolution with concrete sizes (no formulas in H, W)."""
    if not resolutions:
        raise ValueError("the concrete capture counts at given resolutions; pass --res")
    traced_real = isinstance(prepared.plain_traces.get(id(prepared.built)), torch.fx.GraphModule)
    if not traced_real and prepared.meta_network() is not None:
        # shapes are all it needs: on the meta build when it counts every layer there (no
        # weights made); anything else is decided on the real build below, as before. A real
        # network the fx rung traced already (a caller's module) is counted from that graph
        try:
            graph_module = prepared.trace(prepared.meta)
        except ValueError:  # a forward fx cannot trace for every size: traced at each one
            counted = _count_traced_at_each_size(prepared, convention, allow_unknown,
                                                 resolutions)
            if counted is not None:
                return counted
        else:
            try:
                rows = _concrete_rows(prepared, graph_module, convention, allow_unknown,
                                      resolutions)
                analysis = concrete_analysis(prepared, graph_module, rows, convention,
                                             shapes=True)
                if analysis.complete:
                    return analysis
            except Exception:  # noqa: S110 - the real build below gives the answer and error
                pass
    try:
        graph_module = prepared.trace(prepared.network)
    except ValueError:
        from convtally.analysis.export_capture import analyse_exported_concrete

        return analyse_exported_concrete(prepared, convention, allow_unknown, resolutions)
    from convtally.analysis.export_capture import analyse_exported_concrete

    def through_aten() -> Analysis | None:
        # opaque functions in the fx graph (torchvision's shifted_window_attention) are ATen
        # ops the export rung has rules for: its count, when it is complete
        try:
            exported = analyse_exported_concrete(prepared, convention, allow_unknown, resolutions)
        except ResolutionError:  # the forward cannot run there (a table read past its end)
            raise
        except (ValueError, NotImplementedError, RuntimeError, TypeError, KeyError):
            return None
        return exported if exported.complete else None

    try:
        per_resolution = _concrete_rows(
            prepared, graph_module, convention, allow_unknown, resolutions)
    except UnsupportedLayer:
        exported = through_aten()
        if exported is not None:
            return exported
        raise
    analysis = concrete_analysis(prepared, graph_module, per_resolution, convention)
    if not analysis.complete:
        return through_aten() or analysis
    return analysis


def _count_traced_at_each_size(prepared, convention, allow_unknown, resolutions
                               ) -> Analysis | None:
    """Return the concrete count of the meta build traced anew at each resolution (its branches
    taken as there, len() and int() of sizes read there: what a forward pass at that size
    does), every layer known; None where that cannot count it (the export rung may)."""
    if len(prepared.axes) != 2:
        return None
    per_resolution: dict[tuple[int, ...], list[Layer]] = {}
    graphs: dict[tuple[int, ...], torch.fx.GraphModule] = {}
    try:
        for resolution in map(tuple, resolutions):
            graphs[resolution] = prepared.probe_graphs.get(resolution)
            if graphs[resolution] is None:
                probe = torch.zeros(1, int(prepared.channels), *resolution, device="meta")
                graphs[resolution] = trace(prepared.meta, probe, branching=True, concrete=True)
            graphs[resolution].meta["size_only"] = resolution
            per_resolution.update(_concrete_rows(prepared, graphs[resolution], convention,
                                                 allow_unknown, [resolution]))
        first = next(iter(graphs.values()))
        # a graph of the meta build, unless the fx rung traced the caller's network itself
        on_meta = all(p.is_meta for p in first.parameters())
        analysis = concrete_analysis(prepared, first, per_resolution, convention,
                                     shapes=on_meta)
    except ResolutionError:
        raise
    except Exception:  # the export rung's concrete count is the answer, or gives the error
        return None
    if not analysis.complete:
        return None
    analysis.size_graphs = graphs  # verify runs each size's own graph
    analysis.capture_note = "torch.fx traced it at each size (its forward reads sizes as numbers)"
    return analysis


def _concrete_rows(prepared, graph_module, convention, allow_unknown, resolutions
                   ) -> dict[tuple[int, ...], list[Layer]]:
    """Return resolution -> the rows of `graph_module` counted with concrete sizes there."""
    rows: dict[tuple[int, ...], list[Layer]] = {}
    for resolution in map(tuple, resolutions):
        if len(resolution) != len(prepared.axes):
            raise ResolutionError(
                f"expected {len(prepared.axes)} input size(s) "
                f"({'x'.join(map(str, prepared.axes))}), got {size_label(resolution)}"
            )
        try:
            rows[resolution] = _interpret_prepared(
                prepared, graph_module, convention, allow_unknown,
                tuple(sp.Integer(v) for v in resolution),
            )
        except UnsupportedLayer as error:
            raise UnsupportedLayer(f"at {size_label(resolution, short=False)}: {error}") from None
        refuse_reads_outside(prepared.name, rows[resolution], resolution)
    return rows


def refuse_reads_outside(model: str, layers: Sequence[Layer], size: tuple[int, ...]) -> None:
    """Raise ResolutionError where a row counted at one size reads past a table there (its
    margin is a number below 0), as the forward pass fails there."""
    for layer in layers:
        for margin, what in layer.bounds:
            if sp.sympify(margin) < 0:
                raise ResolutionError(f"{model} cannot run at {size_label(size, short=False)}: "
                                      f"{_read_outside(layer, size, what, -margin)}")


def _read_outside(layer: Layer, size: Sequence[int], what: str, beyond: Any) -> str:
    """Return 'getitem:4 (getitem) cannot run at 20x20: its index reaches ..., 8 beyond it'."""
    return (f"{layer.name} ({layer.type}) cannot run at {size_label(size, short=False)}: "
            f"{what}, {beyond} beyond it")


def concrete_analysis(
    prepared, graph_module, per_resolution, convention, used_targets=None, shapes: bool = False
) -> Analysis:
    """Return the Analysis of rows counted separately at each resolution (same rows at each)."""
    resolutions = list(per_resolution)
    first = per_resolution[resolutions[0]]
    for resolution, layers in per_resolution.items():
        if [layer.name for layer in layers] != [layer.name for layer in first]:
            raise ValueError(
                f"the network runs other layers at {size_label(resolution, short=False)} than "
                f"at {size_label(resolutions[0], short=False)}; analyse each resolution on its "
                "own"
            )
    analysis = _finish(prepared, graph_module, list(first), convention, True, used_targets,
                       shapes=shapes)
    analysis.capture = "concrete"
    analysis.assumptions = [
        a for a in analysis.assumptions if not a.startswith("formulas are exact")
    ]
    analysis.concrete = dict(per_resolution)
    analysis._rows_convention = convention  # the rows' counts are under it (_concrete_column)
    return analysis


@functools.lru_cache(maxsize=16384)  # a network repeats its rows' expressions
def _mentions_batch(value: sp.Basic) -> bool:
    return value.has(BATCH)


# the fields of a cost that hold values (sizes, counts, shapes), not names or flags
_COST_VALUES = tuple(f.name for f in fields(LayerCost)
                     if f.name not in ("kind", "op", "via", "affine"))


def _count_at_batch_one(layers: list[Layer]) -> list[str]:
    """Put B = 1 into rows whose per-example cost depends on the batch size (an op that mixes
    examples, e.g. timm csatv2's q @ k.T over the batch) and into shapes that carry the batch
    past their first dimension; return the note that says which rows mix examples."""
    mentions = remembered_by_identity(_mentions_batch)

    def has_batch(values: Iterable[Any]) -> bool:
        for v in values:  # a number (most values at one input size) holds no B: not looked up
            if isinstance(v, sp.Basic) and not v.is_Number and mentions(v):
                return True
        return False

    def counts_batch(layer: Layer) -> bool:
        return has_batch((layer.weights, layer.outputs, layer.connections))

    def at_one(value: Any) -> Any:
        if isinstance(value, sp.Basic):
            return value.xreplace({BATCH: sp.Integer(1)})
        if isinstance(value, SymTensor):  # the batch dimension itself stays B
            return replace(value, shape=(value.shape[0], *map(at_one, value.shape[1:])))
        if isinstance(value, (tuple, list)):
            return type(value)(at_one(v) for v in value)
        return value

    # a shape with B after the first dimension (timm's attention permutes q, k, v to
    # (3, B, heads, N, head_dim)) is the batch moved, not mixed: B = 1 in the shape, no note
    # a size check in which the batch is a factor of both sides (gcvit's batch read back from
    # its window count, `B * windows / windows` with floors kept) holds at B = 1 as at any B
    mixing, moved = [], []
    for layer in layers:
        if counts_batch(layer):
            mixing.append(layer)
        elif has_batch(layer.output_shape) or layer.requirements and has_batch(
                v for requirement in layer.requirements for v in requirement[:2]) or (
                layer.bounds and has_batch(bound[0] for bound in layer.bounds)):
            moved.append(layer)
    for layer in mixing + moved:
        layer.weights, layer.outputs, layer.connections, layer.output_shape = (
            at_one(sp.sympify(layer.weights)), at_one(sp.sympify(layer.outputs)),
            at_one(sp.sympify(layer.connections)), at_one(layer.output_shape),
        )
        layer.requirements = tuple((at_one(sp.sympify(a)), at_one(sp.sympify(b)), what)
                                   for a, b, what in layer.requirements)
        layer.bounds = tuple((at_one(sp.sympify(margin)), what) for margin, what in layer.bounds)
        layer.cost = _changed(layer.cost, **{
            name: at_one(getattr(layer.cost, name)) for name in _COST_VALUES})
    if not mixing:
        return []
    more = f" and {len(mixing) - 1} more rows" if len(mixing) > 1 else ""
    return [
        f"{mixing[0].name}{more} mix examples across the batch (their cost per example grows "
        "with the batch size): counted at batch size 1"
    ]


def _finish(prepared: _Prepared, graph_module, layers, convention, exact,
            used_targets: set[str] | None = None, shapes: bool = False,
            used_parameters: list[nn.Parameter] | None = None,
            batch_note: list[str] | None = None) -> Analysis:
    """Return the Analysis of `layers`; `shapes`: they were counted from the meta build;
    `used_parameters` and `batch_note`: _used_parameters(graph_module) and the note of
    _count_at_batch_one(layers), where the caller has made them already."""
    # first, as the cheap part: a size the forward pins sends auto to the rungs below
    branches, branch_notes = branch_conditions(graph_module)
    _refuse_pinned_sizes(branches, graph_module, prepared.axes)
    network = prepared.meta if shapes else prepared.network
    if graph_module is not None:
        used = {id(p) for p in (_used_parameters(graph_module) if used_parameters is None
                                else used_parameters)}
    else:  # an exported graph: the parameters its rows own
        named = dict(network.named_parameters())
        used = {id(named[t]) for t in used_targets or () if t in named}
    unused = [p for p in _parameters_of(network) if id(p) not in used]
    unused_weights = sum(p.numel() for p in unused)
    unused_trainable = sum(p.numel() for p in unused if p.requires_grad)
    batch_note = _count_at_batch_one(layers) if batch_note is None else batch_note
    divisor, assumptions = _apply_divisibility(layers, exact, prepared.axes)
    assumptions += batch_note
    if unused_weights:
        assumptions.append(_unused_note(unused_weights, convention.unused_weights))
    if any(not layer.known for layer in layers):
        unknown = ", ".join(layer.name for layer in layers if not layer.known)
        assumptions.append(
            f"no rule for {unknown}: counted from the running network, "
            "connections unknown (0 in totals)"
        )
    if unused_weights and convention.unused_weights:
        layers.append(_unused_row(convention, unused_weights, unused_trainable, divisor))
    analysis = Analysis(
        model=prepared.name,
        hyperparameters=dict(prepared.values),
        symbols=prepared.names,
        input_channels=prepared.input_channels,
        convention=convention,
        layers=layers,
        divisor=divisor,
        exact=exact,
        assumptions=assumptions,
        unused_weights=unused_weights,
        unused_trainable_weights=unused_trainable,
        _source=_NetworkSource(
            network, graph_module, (lambda: prepared.network) if shapes else None
        ),
    )
    analysis.branches = branches
    analysis.assumptions.extend(text for _, _, text in branches)
    analysis.assumptions.extend(branch_notes)
    if graph_module is not None and graph_module.meta.get("branches"):
        probe = "x".join(map(str, graph_module.meta["probe"]))
        analysis.capture_note = (f"traced at {probe}, where the forward's branches on the "
                                 "input size were decided (see the assumptions)")
    analysis.assumptions.extend(requirement_assumptions(analysis))
    return analysis


def _submodules(graph_module: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """Return qualified name -> module of every submodule, under each name it is registered
    by: one walk, where get_submodule per node walks each name through nn.Module's getattr
    (2 ms of timm efficientvit_b0's 55); made once per graph module (the interpreter, the
    parameters used and the exact form ask again)."""
    found = _SUBMODULES.get(graph_module)
    if found is None:
        # the graph module itself ('') left out: a value that holds its weak key keeps it alive
        found = _SUBMODULES[graph_module] = {
            name: module for name, module in graph_module.named_modules(remove_duplicate=False)
            if name}
    return found


_SUBMODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _used_parameters(graph_module: torch.fx.GraphModule) -> list[nn.Parameter]:
    """Return the parameters of the called modules and those read directly in forward."""
    used = []
    modules = _submodules(graph_module)
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            used.extend(_parameters_of(modules[node.target]))
        elif node.op == "get_attr":
            value = attribute_at(graph_module, node.target)
            if isinstance(value, nn.Parameter) and value.numel():
                used.append(value)
    return used


def _interpret(
    graph_module,
    attributes,
    input_channels,
    convention,
    allow_unknown,
    concrete_channels,
    size: tuple[sp.Expr, ...] = (H, W),
) -> list[Layer]:
    env: dict[str, Any] = {}
    layers: list[Layer] = []
    seen: dict[str, int] = {}  # label -> how many nodes have it so far
    counted_modules: set[int] = set()
    owned_parameters: set[str] = set()
    asserted: list[tuple] = []  # size conditions the forward asserts (_asserted_condition)
    placeholders = 0
    ranged_storage: dict[str, str] = {}  # node -> the node whose storage its values are in

    from_input: set[torch.fx.Node] | None = None  # _computed_from_the_input, when first needed
    meta = getattr(graph_module, "meta", None) or {}
    # a forward traced at a probe size: a branch that pins the size is refused where it is met
    watched = (dict(meta.get("branches", ())) if meta.get("probe")
               and all(isinstance(side, sp.Symbol) for side in size) else {})
    previous = None
    modules = _submodules(graph_module)

    def value_of(n: Any) -> Any:
        return env[n.name] if isinstance(n, torch.fx.Node) else n

    for node in graph_module.graph.nodes:
        if previous in watched and not _refuse_pinned_branch(
                graph_module, env, previous, watched[previous], size):
            watched = {}  # a branch that is no comparison: _finish refuses it first
        previous = node.name
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                if node.args:  # an optional argument with a default value
                    env[node.name] = node.args[0]
                    continue
                raise ValueError(
                    f"forward takes a second input ({node.target}); only "
                    "single-image-input networks can be analysed"
                )
            env[node.name] = SymTensor((BATCH, input_channels, *size))
            continue
        if node.op == "output":
            continue
        if node.op == "get_attr":
            env[node.name] = _attribute_value(graph_module, node.target)
            continue
        args = map_values(node.args, value_of)
        kwargs = map_values(node.kwargs, value_of) if node.kwargs else {}
        condition = _asserted_condition(node, args)
        if condition is not None:
            asserted.append(condition)
            env[node.name] = None
            continue
        label, function_name = _node_label(node, seen)
        if node.op == "call_module":
            module = modules[node.target]
            rule = rules.module_rule(module)
            type_name = type(module).__name__
            if rule is None:
                if not allow_unknown:
                    raise UnsupportedLayer(
                        f"no rule for {node.target} ({type_name}); add one in analysis/rules.py "
                        "or pass --allow-unknown to count it from the running network"
                    )
                output = _unknown_output(node, graph_module, args[0], concrete_channels, size)
                cost = LayerCost(
                    "unknown",
                    output,
                    weights=sp.Integer(sum(p.numel() for p in module.parameters())),
                )
                known = False
            else:
                try:
                    cost = rule(module, attributes.get(node.target, {}), *args, **kwargs)
                except UnsupportedLayer as error:
                    raise type(error)(f"{node.target} ({type_name}): {error}") from None
                known = True
            cost = _changed(
                cost,
                via=cost.via or rules.module_via(module),
                inputs=_first_input(args, kwargs) if cost.inputs is None else cost.inputs,
                parameters=cost.weights if cost.parameters is None else cost.parameters,
                trainable_weights=_trainable(module, cost.weights),
            )
            if id(module) in counted_modules:  # a module called twice owns its weights once
                cost = _changed(cost, weights=sp.Integer(0), trainable_weights=sp.Integer(0))
            counted_modules.add(id(module))
        else:
            key = node.target
            rule = _function_rule(key)
            if key in rules.SIZED_FUNCTION_RULES:
                if from_input is None:
                    from_input = _computed_from_the_input(graph_module.graph)
                if node in from_input:
                    rule = rules.SIZED_FUNCTION_RULES[key]
            type_name = function_name
            result = rule(*args, **kwargs) if rule is not None else None
            if rule is None and _contains_tensor((args, kwargs)):
                if not allow_unknown:
                    raise UnsupportedLayer(
                        f"no rule for {label} ({type_name}) in {node.op}; add one in "
                        "analysis/rules.py FUNCTION_RULES or pass --allow-unknown to count "
                        "it from the running network"
                    )
                tensor = _first_tensor((args, kwargs))
                output = _unknown_output(node, graph_module, tensor, concrete_channels, size)
                owned = _new_parameters((args, kwargs), owned_parameters)
                result = LayerCost(
                    "unknown", output, weights=owned, op=str(type_name),
                    via=rules.call_via(node.op, node.target),
                )
                known = False
            elif rule is None or (isinstance(result, PlainValue) and result.value is None):
                env[node.name] = _python_call(node, args, kwargs)
                continue
            else:
                known = True
            if isinstance(result, PlainValue):
                env[node.name] = result.value
                continue
            owned = _new_parameters((args, kwargs), owned_parameters) if known else 0
            cost = _changed(
                result,
                op=result.op or rules.function_op(node.op, node.target),
                via=result.via or rules.call_via(node.op, node.target),
                inputs=_first_input(args, kwargs) if result.inputs is None else result.inputs,
                weights=result.weights + owned,
                parameters=result.weights + owned,
            )
            if any(isinstance(a, torch.Tensor) or getattr(a, "value_range", None) is not None
                   for a in args) and node.target in rules.VALUE_RANGE_RULES:
                # a real tensor's range (min and max over its values) only where it is followed
                ranged = tuple(_known_positions(a) or a for a in args)
                cost = replace(cost, output=rules.with_value_range(node.target, ranged, kwargs,
                                                                     cost.output))
        if ranged_storage or getattr(cost.output, "value_range", None) is not None:
            track_ranged_storage(node, cost.output, env, ranged_storage,
                                 writes=_writes_in_place(node, kwargs),
                                 fresh=node.target in rules.NEW_TENSOR_ARITHMETIC)
        env[node.name] = cost.output
        output = cost.output
        if isinstance(output, tuple) and all(v is None or isinstance(v, SymTensor)
                                             for v in output):
            tensors = [v for v in output if v is not None]  # (output, None): MHA's weights
            output = tensors[0] if len(tensors) == 1 else output
        if cost.kind == "recurrent":  # (output, states): the output sequence's shape
            output = output[0]
        shape = output.shape[1:] if isinstance(output, SymTensor) else ()
        weights, connections = counted_pair(cost, known, convention)
        layers.append(
            Layer(
                name=label,
                type=type_name,
                kind=cost.kind,
                node=node.name,
                output_shape=(shape if all(isinstance(d, sp.Basic) for d in shape)
                              else tuple(sp.sympify(d) for d in shape)),
                weights=weights,
                connections=connections,
                outputs=cost.outputs,
                cost=cost,
                known=known,
                requirements=cost.requires,
                bounds=cost.bounds,
            )
        )
    if hasattr(graph_module, "meta"):  # what the formulas require of the input size
        probe, read = meta.get("probe", ()), meta.get("numbers_read", ())
        graph_module.meta["conditions"] = asserted + [
            (env.get(name), taken, name, _branch_reason(probe, name in read))
            for name, taken in graph_module.meta.get("branches", ())]
    return layers


def _computed_from_the_input(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Return the nodes whose value is computed from the graph's input (the image, its sizes
    included), not from parameters and constants alone."""
    found: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if not found and not node.args:  # the image, not an argument with a default
                found.add(node)
        elif any(argument in found for argument in node.all_input_nodes):
            found.add(node)
    return found


def _known_positions(value: Any) -> SymTensor | None:
    """Return a tensor the forward computed from sizes at a counted size (torch.arange of a
    number: PyTorch's own; float positions too, timm samvit's coordinates scaled by a ratio of
    sizes, which `.long()` truncates) as its shape and the exact range of its values, for the
    ranges of what is computed from it; None for anything else."""
    if (not isinstance(value, torch.Tensor) or value.is_meta or not value.numel()
            or value.is_complex() or value.dtype is torch.bool):
        return None
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return None
    # a float's binary value is an exact Rational; an integer's an Integer
    number = sp.Rational if value.is_floating_point() else sp.Integer
    return SymTensor(tuple(sp.Integer(d) for d in value.shape),
                     value_range=(number(value.min().item()), number(value.max().item())))


def track_ranged_storage(node: torch.fx.Node, output: Any, env: dict[str, Any],
                         storage: dict[str, str], writes: bool, fresh: bool) -> None:
    """Keep the value ranges of tensors computed from sizes sound under in-place writes: what
    is computed from such a tensor shares its storage (a view, a cast: conservatively, any
    call but arithmetic, `fresh`, which makes a new tensor), and a write into any of them
    (`writes`: `p += 1`, `p.clamp_(max=15)`, `p[0] = 100`, an inplace module, aten.add_)
    forgets the range of every tensor on that storage; the write's own result keeps the range
    its rule gave. Both the fx and the export rung's interpreters call it per node."""
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    tracked = first is not None and first.name in storage
    if tracked and writes:
        root = storage[first.name]
        for name, shared in storage.items():
            value = env.get(name)
            if shared == root and isinstance(value, SymTensor) and value.value_range:
                env[name] = replace(value, value_range=None)
        storage[node.name] = root
    elif tracked and not fresh:
        storage[node.name] = storage[first.name]
    elif getattr(output, "value_range", None) is not None:
        storage[node.name] = node.name  # torch.arange, or arithmetic: a tensor of its own


def _writes_in_place(node: torch.fx.Node, kwargs: dict) -> bool:
    """Return whether a call writes into its first argument (x += 1, x.add_(1), x[i] = v)."""
    if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.setitem):
        return True
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
        return True
    if node.op == "call_module":
        return bool(getattr(node.graph.owning_module.get_submodule(node.target), "inplace",
                            False))
    return bool(kwargs.get("inplace")) or kwargs.get("out") is not None


def _asserted_condition(node: torch.fx.Node, args: tuple) -> tuple | None:
    """Return (condition, True, node name, why) for torch._assert on a size condition that
    does not pin the size (timm's 'H divisible by the patch size'); None for any other call. An
    assert that the size equals a number (a ViT's) is refused: the model is of fixed size."""
    if node.target is not torch._assert or not args:
        return None
    condition = args[0]
    if not isinstance(condition, sp.core.relational.Relational):
        return None
    if isinstance(condition, sp.Eq) and not (condition.lhs - condition.rhs).has(
            sp.Mod, sp.floor, sp.ceiling):
        message = str(args[1]) if len(args) > 1 else ""
        raise AssertedSize(
            f"{node.name} (_assert): the forward asserts {condition.lhs} == {condition.rhs}"
            f"{f' ({message[:120]})' if message else ''}: its input size is fixed",
            condition.lhs - condition.rhs,
            node.graph.owning_module,
        )
    return (condition, True, node.name, ASSERTED)


class AssertedSize(UnsupportedLayer):
    """The forward asserts an equality of sizes that pins the input size: `difference` == 0
    (a ViT's H == 224, botnet26t's stage size == 16)."""

    def __init__(self, message: str, difference: sp.Expr | None = None,
                 graph_module: Any = None):
        super().__init__(message)
        self.difference = difference
        # traced at a probe size with branches decided there (crossvit resizes its input
        # when H differs from its own): the assert may hold only on the branch taken
        meta = getattr(graph_module, "meta", {}) or {}
        self.branched = bool(meta.get("branches"))
        self.probe = meta.get("probe")


ASSERTED = "the forward asserts it"


class PinnedBranch(ValueError):
    """The forward branched, at the probe size, on an equality that pins the input size
    (efficientvit_m0's last stage equal to its window)."""

    def __init__(self, message: str, probe: tuple[int, ...] = ()):
        super().__init__(message)  # () where auto raises it again with every rung's reason
        self.probe = probe


def pinned_away(difference: sp.Expr, axes: Sequence[sp.Symbol], base: Sequence[int]) -> str:
    """Return '448x448 nor 896x896' where `difference` == 0 holds at neither twice nor four
    times the traced size `base` (an equality that pins the input size), else ''."""
    scaled = [dict(zip(axes, (factor * side for side in base), strict=True)) for factor in (2, 4)]
    if any(difference.subs(at) == 0 for at in scaled):
        return ""
    return " nor ".join("x".join(str(factor * side) for side in base) for factor in (2, 4))


def _refuse_pinned_sizes(branches: Sequence[tuple[sp.Expr, str, str]], graph_module: Any,
                         axes: Sequence[sp.Symbol]) -> None:
    """Refuse formulas whose conditions pin the input size (a stage's size == the window, an
    assert that H matches the model's): an equality (not a divisibility) that fails at twice
    and at four times the traced size. The model is then counted by the rungs below, as a model
    of fixed size; bounds (H/32 >= 7) and divisibility are ranges the formulas hold on."""
    base = (getattr(graph_module, "meta", {}) or {}).get("probe") or (224,) * len(axes)
    # a pinned branch before a pinned assert: torch.export takes that branch too and refuses
    # it, so auto goes on without exporting (an AssertedSize after a branch leaves it to try)
    for difference, relation, text in sorted(branches, key=lambda b: b[2].endswith(
            f"({ASSERTED})")):
        message = _pinned(difference, relation, text, axes, base)
        if message and text.endswith(f"({ASSERTED})"):
            raise AssertedSize(message, difference, graph_module)
        if message:
            raise PinnedBranch(message, tuple(base))


def _pinned(difference: sp.Expr, relation: str, text: str, axes: Sequence[sp.Symbol],
            base: Sequence[int]) -> str:
    """Return the refusal of a condition (lhs - rhs, relation, text) that pins the input size,
    else '' (bounds and divisibility are ranges the formulas hold on)."""
    if relation != "==" or difference.has(sp.Mod):
        return ""
    sizes = pinned_away(difference, axes, base)
    return f"its input size is pinned: {text} holds at neither {sizes}" if sizes else ""


def _refuse_pinned_branch(graph_module: Any, env: dict[str, Any], name: str, taken: bool,
                          axes: Sequence[sp.Symbol]) -> bool:
    """Raise the PinnedBranch _finish would raise for the branch on `name` as soon as it is
    interpreted, without counting the layers after it (three quarters of timm efficientvit_m0's
    symbolic count, which the concrete rung then counts again); return False where the branch is
    not a comparison of sizes (_finish says why), True otherwise."""
    probe = graph_module.meta["probe"]
    try:
        row = _condition_row(env.get(name), taken, name, _branch_reason(
            probe, name in graph_module.meta.get("numbers_read", ())))
    except ValueError:
        return False
    if isinstance(row, tuple):
        message = _pinned(*row, axes, probe)
        if message:
            raise PinnedBranch(message, tuple(probe))
    return True


def _branch_reason(probe: Sequence[int], read: bool = False) -> str:
    """Return the reason a traced branch's condition gives (`read`: an int() of a size, read
    as the number it is at the probe)."""
    how = "reads it as a number" if read else "branches on it"
    return f"the forward {how}; traced at {'x'.join(map(str, probe))}"


def taken_condition(value: Any, taken: bool) -> Any:
    """Return the condition a branch on `value` (a relation of sizes, or a size tested against
    0) puts on the input where the side `taken` was traced."""
    condition = sp.sympify(value)
    # max(k / q, 1.0) (timm MViTv2): a whole float is printed as 1, not 1.00000000000000
    condition = condition.xreplace({number: sp.Integer(int(number))
                                    for number in condition.atoms(sp.Float)
                                    if float(number).is_integer()})
    if isinstance(condition, sp.Expr):  # `if H % 2:` tests a number against 0
        condition = sp.Ne(condition, 0)
    if isinstance(condition, (sp.logic.boolalg.BooleanAtom, sp.core.relational.Relational)):
        condition = condition if taken else sp.Not(condition)
    return condition


def branch_conditions(graph_module: Any) -> tuple[tuple[tuple[sp.Expr, str, str], ...],
                                                  list[str]]:
    """Return (conditions, notes). The conditions on the input size that the forward's asserts
    and the branches it took at the probe size impose, as (lhs - rhs, relation, text), e.g.
    (W/32 - 7, '>=', 'W/32 >= 7 (...)'); those that hold at every size are left out. A branch
    on a value that is not a size (v.device.type != 'meta') is taken as traced, and a note says
    so; a branch the rules cannot reduce to a comparison of sizes is refused."""
    meta = getattr(graph_module, "meta", {}) if graph_module is not None else {}
    found, notes = [], []
    for value, taken, name, why in meta.get("conditions") or ():
        row = _condition_row(value, taken, name, why)
        if isinstance(row, str):
            notes.append(row)
        elif row is not None:
            found.append(row)
    return tuple(dict.fromkeys(found)), notes


def _condition_row(value: Any, taken: bool, name: str, why: str
                   ) -> tuple[sp.Expr, str, str] | str | None:
    """Return the condition of one branch or assert as (lhs - rhs, relation, text); None where it
    holds at every size, a note where the value is not a size; ValueError where it is not a
    comparison of sizes."""
    if value is None:
        raise ValueError(f"the forward branches on {name}, which the rules give no value")
    if isinstance(value, sp.Basic) and _mentions_batch(value):
        # the batch size (`if x.shape[0] == 1`, int(B)): the probe's, one, as every row is
        # counted per example at batch size one; not a condition on the input's sizes
        at_one = value.xreplace({BATCH: sp.Integer(1)})
        if taken_condition(at_one, taken) == sp.true:
            relation = _branch_relation.__wrapped__(value, taken)
            text = relation[2] if isinstance(relation, tuple) else taken_condition(value, taken)
            return f"{name}: {text} holds at batch size 1, where the rows are counted ({why})"
        value = at_one
    try:
        relation = _branch_relation(value, taken)
    except TypeError:  # a value that cannot be remembered (unhashable)
        relation = _branch_relation.__wrapped__(value, taken)
    if relation is True:
        return None
    if relation is False:  # not a size: the meta device's answer (a device check)
        return (f"{name}: the forward branches on a value that is not a size; the side taken "
                "on the meta device was traced")
    if relation is None:
        raise ValueError(f"the forward branches on {name} ({value}): it is not a "
                         "comparison of the input's sizes")
    difference, operator_text, text = relation
    return difference, operator_text, f"{text} ({why})"


@functools.lru_cache(maxsize=4096, typed=True)  # blocks repeated per stage branch alike
def _branch_relation(value: Any, taken: bool) -> tuple[sp.Expr, str, str] | bool | None:
    """Return (lhs - rhs, relation, 'lhs relation rhs') of the condition a branch on `value`
    puts on the input where `taken` was traced; True where it holds at every size, False
    where it is not a size, None where it is no comparison of sizes. Remembered: sympy builds
    and simplifies each relation anew (a third of a millisecond each; bat_resnext26ts
    branches 16 times, asked once by the interpreter and once by the analysis)."""
    condition = taken_condition(value, taken)
    if condition == sp.true:
        return True
    if condition == sp.false:
        return False
    if not isinstance(condition, sp.core.relational.Relational):
        return None
    return (sp.expand(condition.lhs - condition.rhs), condition.rel_op,
            f"{condition.lhs} {condition.rel_op} {condition.rhs}")


def _function_rule(key: Any):
    try:
        return rules.FUNCTION_RULES.get(key)
    except TypeError:  # an unhashable target
        return None


def _attribute_value(graph_module: torch.fx.GraphModule, target: str) -> Any:
    """Return a get_attr node's value: a ParameterTensor for tensors, the object otherwise."""
    value = attribute_at(graph_module, target)
    if isinstance(value, torch.Tensor):
        numel = value.numel() if isinstance(value, nn.Parameter) else 0
        shape = tuple(sp.Integer(d) for d in value.shape)
        return rules.ParameterTensor(shape, target=target, numel=numel)
    return value


def _new_parameters(values: Any, owned: set[str]) -> sp.Expr:
    """Return the values of parameters among `values` not yet owned by a row (and own them)."""
    found: list[rules.ParameterTensor] = []
    map_values(values, lambda v: found.append(v) if isinstance(v, rules.ParameterTensor) else None)
    total = 0
    for parameter in found:
        if parameter.target not in owned:
            owned.add(parameter.target)
            total += parameter.numel
    return sp.Integer(total)


def _first_tensor(values: Any) -> SymTensor | None:
    found: list[SymTensor] = []
    map_values(values, lambda v: found.append(v) if isinstance(v, SymTensor) else None)
    return found[0] if found else None


def _changed(cost: LayerCost, **changes: Any) -> LayerCost:
    """Return dataclasses.replace(cost, **changes), made by copying its fields: replace runs
    the frozen dataclass' __init__, one object.__setattr__ per field (5 % of the interpreter's
    time, which makes a changed cost per layer)."""
    changed = object.__new__(type(cost))
    changed.__dict__.update(cost.__dict__, **changes)
    return changed


def _parameters_of(module: nn.Module) -> list[nn.Parameter]:
    """Return module.parameters() as a list (each parameter once), read from the modules' own
    tables without the qualified names parameters() makes; a leaf's from its own table."""
    found: dict[int, nn.Parameter] = {}
    for owner in each_module(module) if module._modules else (module,):
        for parameter in owner._parameters.values():
            if parameter is not None:
                found.setdefault(id(parameter), parameter)
    return list(found.values())


def _trainable(module: nn.Module, weights: sp.Expr) -> sp.Expr:
    if not module._parameters and not module._modules:  # GELU, Dropout: nothing to train
        return weights
    parameters = _parameters_of(module)
    if all(p.requires_grad for p in parameters):  # most layers: every weight trained
        return weights
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    if trainable == sum(p.numel() for p in parameters):
        return weights
    return sp.Integer(trainable)


def _unused_row(
    convention: Convention, weights: int, trainable: int, divisor: tuple[int, ...]
) -> Layer:
    cost = LayerCost(
        "unused",
        (),
        weights=sp.Integer(weights),
        op="unused",
        via="module",
        parameters=sp.Integer(weights),
        trainable_weights=sp.Integer(trainable),
    )
    return Layer(
        name=UNUSED_ROW,
        type="unused",
        kind="unused",
        node="",
        output_shape=(),
        **{q: sp.sympify(v) for q, v in counted(cost, False, convention).items()},
        outputs=sp.Integer(0),
        cost=cost,
        divisor=divisor,
        known=False,  # no running layer to measure it against
    )


def _unused_note(count: int, counted: bool) -> str:
    if counted:
        return (
            f"{count} parameters belong to modules forward never calls; in the weights "
            f"as the tool counts them (row {UNUSED_ROW})"
        )
    return f"{count} parameters belong to modules forward never calls; they are not in the totals"


def _first_input(args, kwargs) -> sp.Expr | None:
    if args and isinstance(args[0], SymTensor):  # the first tensor of most calls
        return args[0].per_example
    found: list[SymTensor] = []
    map_values((args, kwargs), lambda v: found.append(v) if isinstance(v, SymTensor) else None)
    return found[0].per_example if found else None


def _python_call(node, args, kwargs):
    def call(args, kwargs):
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def plain(value: Any) -> Any:  # torch.arange(Integer(39)) wants a Python int
        return int(value) if isinstance(value, sp.Integer) else value

    try:
        try:
            # H + (n - H % n) % n, a size padded to a multiple of n, as n*ceiling(H/n)
            return shapes.rounded_up(call(args, kwargs))
        except TypeError:
            if not any(isinstance(v, sp.Integer) for v in flat_values((args, kwargs))):
                raise
            return call(map_values(args, plain), map_values(kwargs, plain))
    except Exception as error:  # e.g. torch._assert on a symbolic size (vision transformers)
        name = getattr(node.target, "__name__", node.target)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsupportedLayer(
            f"{node.name} ({name}) cannot be evaluated on symbolic sizes: {first[:120]}"
        ) from None


# --- divisibility --------------------------------------------------------------------------


@functools.lru_cache(maxsize=16384)
def _required_multiple(expression: sp.Expr, symbol: sp.Symbol, multiple: int) -> int | None:
    """Return the smallest multiple m' of `multiple` with no floor left after symbol -> m'*t
    (remembered: the layers of a network repeat few distinct sizes)."""
    t = sp.Symbol("t", integer=True, positive=True)
    for _ in range(32):
        substituted = sp.sympify(expression).subs(symbol, multiple * t)
        atoms = [a for a in substituted.atoms(sp.floor, sp.ceiling) if a.has(t)]
        if not atoms:
            return multiple
        factor = 1
        for atom in atoms:
            argument = atom.args[0]
            if argument.atoms(sp.floor, sp.ceiling):
                continue  # the inner floor goes first
            try:
                polynomial = sp.Poly(argument, t)
            except sp.PolynomialError:
                return None
            if polynomial.degree() != 1:
                return None
            coefficient = sp.Rational(polynomial.coeff_monomial(t))
            factor = math.lcm(factor, int(coefficient.q))
        if factor == 1:
            return None
        multiple *= factor
    return None


def _apply_divisibility(
    layers: list[Layer], exact: bool, axes: Sequence[sp.Symbol] = (H, W)
) -> tuple[tuple[int, ...], list[str]]:
    multiples = [1] * len(axes)
    unresolved = False
    has = [remembered_by_identity(lambda size, symbol=symbol: size.has(symbol))
           for symbol in axes]
    for layer in [] if exact else layers:  # exact formulas assume no divisibility
        for axis, symbol in enumerate(axes):
            for dimension in layer.output_shape:
                if not has[axis](dimension):
                    continue
                needed = _required_multiple(dimension, symbol, multiples[axis])
                if needed is None:
                    unresolved = True
                else:
                    multiples[axis] = needed
        layer.divisor = tuple(multiples)
    assumptions = []
    if exact or unresolved:
        for layer in layers:
            layer.divisor = (1,) * len(axes)
        if unresolved and not exact:
            assumptions.append(FLOORS_KEPT)
        assumptions.append(
            f"formulas are exact for every {', '.join(map(str, axes))} (PyTorch's floor "
            "arithmetic kept)"
        )
        return (1,) * len(axes), assumptions
    divisor = tuple(multiples)
    simplify = remembered_by_identity(lambda expression: _simplify(expression, divisor))

    for layer in layers:
        layer.output_shape = tuple(simplify(d) for d in layer.output_shape)
        layer.weights = simplify(layer.weights)
        layer.outputs = simplify(layer.outputs)
        layer.connections = simplify(layer.connections)
        layer.requirements = tuple(
            (simplify(a), simplify(b), what) for a, b, what in layer.requirements
        )
    for symbol, multiple in zip(axes, multiples, strict=True):
        if multiple > 1:
            assumptions.append(f"{symbol} divisible by {multiple}")
    return divisor, assumptions


def answer_every_resolution(
    analysis: Analysis,
    resolutions: Sequence[tuple[int, ...]],
    exact_analysis: Callable[[], Analysis],
) -> Analysis:
    """Return an analysis that answers at every one of `resolutions`.

    The simple formulas are kept where they hold; when a requested size breaks the divisibility
    they assume, the exact formulas (with floor(), from `exact_analysis()`) are used instead and
    the assumptions say so. A size the network cannot run at is refused with the nearest sizes
    it can run at. An fx analysis makes its exact form from its own rows (the same as
    `exact_analysis()` gives, without building and tracing the network again).
    """
    symbolic = analysis.concrete is None
    for resolution in resolutions:
        analysis._check_rank(resolution)
    broken = []
    if symbolic and not analysis.exact:
        for resolution in resolutions:
            try:
                analysis._check_divisibility(*resolution)
            except ResolutionError as error:
                broken.append((resolution, str(error).split(";")[0]))
    if broken:
        again = getattr(analysis, "_exact_again", None)  # an fx analysis' own rows, exact
        try:
            analysis = again() if again is not None else exact_analysis()
        except Exception:  # whatever made it fail, the full path decides as it always did
            analysis = exact_analysis()
        sizes = ", ".join(size_label(r, short=False) for r, _ in broken)
        analysis.assumptions.append(
            f"formulas keep floor() (exact at every size) because {sizes} breaks the "
            f"divisibility the simple ones assume ({broken[0][1]})"
        )
    for resolution in resolutions:
        try:
            analysis.evaluate([resolution])
        except ResolutionError as error:
            if not symbolic:
                raise
            reason = str(error).split("; it holds at")[0].split("; try a larger")[0]
            near = nearest_runnable(analysis, *resolution)
            hint = f"; the nearest sizes it runs at: {', '.join(near)}" if near else ""
            raise ResolutionError(
                f"{analysis.model} cannot run at {size_label(resolution, short=False)}: "
                f"{reason}{hint}"
            ) from None
    return analysis


def nearest_runnable(analysis: Analysis, *sizes: int, reach: int = 64) -> list[str]:
    """Return up to two sizes near `sizes` (H, W; T; D, H, W), the same on every axis when they
    are, where every layer of `analysis` runs, nearest first."""
    sizes = tuple(sizes)
    if len(set(sizes)) == 1:
        candidates = [(side,) * len(sizes) for side in _around(sizes[0], reach)]
    else:
        candidates = [
            sizes[:axis] + (value,) + sizes[axis + 1 :]
            for axis in range(len(sizes))
            for value in _around(sizes[axis], reach)
        ]
        candidates.sort(key=lambda near: sum(abs(a - b) for a, b in zip(near, sizes)))
    found = []
    for candidate in candidates:
        if _runs_at(analysis, *candidate):
            found.append(size_label(candidate, short=False))
            if len(found) == 2:
                break
    return found


def _around(value: int, reach: int) -> list[int]:
    """Return value-1, value+1, value-2, value+2, ... (positive only), `reach` steps out."""
    sides = []
    for step in range(1, reach + 1):
        sides.extend(side for side in (value - step, value + step) if side >= 1)
    return sides


def _holding_sides(
    difference: sp.Expr, substitution: Mapping[sp.Symbol, int], axes: Sequence[sp.Symbol] = (H, W),
    limit: int | None = None,
) -> list[int]:
    """Return the sides up to 4096 where `difference` is 0, the same size on every axis (the
    first `limit` of them).

    Counted by evaluating at every size (floor() and all), not by solving: sympy's solver
    cannot invert floor().
    """
    return _holding_sides_of([difference], substitution, axes, limit)[0]


def _holding_sides_of(differences: Sequence[sp.Expr], substitution: Mapping[sp.Symbol, int],
                      axes: Sequence[sp.Symbol] = (H, W), limit: int | None = None
                      ) -> list[list[int]]:
    """Return _holding_sides of each difference, all evaluated in one pass (a network states
    its size agreements together: levit_128 has nine)."""
    first = axes[0]
    squares = [sp.sympify(d).subs(substitution).subs({a: first for a in axes[1:]})
               for d in differences]
    solvable = [i for i, square in enumerate(squares) if not square.free_symbols - {first}]
    holding: list[list[int]] = [[] for _ in squares]
    if not solvable:
        return holding
    sides = np.arange(1, 4097, dtype=object)
    values = IntegerEvaluator([squares[i] for i in solvable], (first,))(sides)
    for i, row in zip(solvable, values, strict=True):
        holding[i] = [int(side) for side in np.flatnonzero(row == 0)[:limit] + 1]
    return holding


SIDES_SHOWN = 64  # the sides where a size agreement holds that are checked to run


def _where_it_holds(sizes: Sequence[int], rank: int = 2, all_sizes: bool = True) -> str:
    """Return '; it holds at 32x32' for the sides given (the same on each of `rank` axes), or
    '' when there are none; `all_sizes` False: they are the first of more."""
    if not sizes:
        return ""
    shown = ", ".join(size_label((s,) * rank, short=False) for s in sizes[:6])
    more = ""
    if not all_sizes:
        more = ", ... (more up to 4096)"
    elif len(sizes) > 6:
        more = f", ... ({len(sizes)} sizes up to 4096)"
    return f"; it holds at {shown}{more}"


def _runs_at(analysis: Analysis, side: int, *others: int) -> bool:
    """Return True when every layer of `analysis` can run at `side` on every axis (or at
    side x others: the size of each axis given)."""
    resolution = (side, *others) if others else (side,) * len(analysis.axes)
    try:
        analysis.evaluate([resolution], explain=False)
    except (ResolutionError, rules.ShapeMismatch):
        return False
    return True


def requirement_assumptions(analysis: Analysis) -> list[str]:
    """Return one assumption line per size agreement a layer needs (e.g. fc's in_features)."""
    lines = []
    for layer in analysis.layers:
        kept = []
        for a, b, what in layer.requirements:
            difference = rules.simplified_difference(a, b)
            if difference == 0:
                continue  # holds wherever the divisibility assumption does
            if difference.is_number:
                raise rules.ShapeMismatch(
                    f"{layer.name} ({layer.type}) cannot run at any input size: {what} ({a} = {b})"
                )
            kept.append((a, b, what))
        layer.requirements = tuple(kept)
    analysis._compiled = None  # the requirements changed
    agreements = [(layer, a, b, what) for layer in analysis.layers
                  for a, b, what in layer.requirements]
    holding = _holding_sides_of([a - b for _, a, b, _ in agreements],
                                analysis.substitutions(), analysis.axes, SIDES_SHOWN + 1)
    # a root of the equation is a size only where the whole network runs (24x24 can solve a
    # Linear's size equation yet be too small for the layers before it); the same sides recur
    # (nasnetalarge's 198 agreements), so each is evaluated once, all of them together
    sides = sorted({side for found in holding for side in found[:SIDES_SHOWN]})
    rank = len(analysis.axes)
    runs = dict(zip(sides, analysis.runnable([(side,) * rank for side in sides]), strict=True))
    for (layer, a, b, what), found in zip(agreements, holding, strict=True):
        runnable = [side for side in found[:SIDES_SHOWN] if runs[side]]
        lines.append(
            f"{layer.name} ({layer.type}): {what}, {_printed(a)} = {_printed(b)}"
            f"{_where_it_holds(runnable, rank, len(found) <= SIDES_SHOWN)}"
        )
    return lines


def _simplify(expression: sp.Expr, divisor: tuple[int, ...]) -> sp.Expr:
    """Return `expression` with H, W (T; D, H, W: one per entry of `divisor`) divisible by
    `divisor` assumed (floors removed), expanded."""
    expression = sp.sympify(expression)
    try:
        return _simplify_once(expression, tuple(divisor))
    except TypeError:  # an unhashable expression (none known): simplify it uncached
        return _simplify_once.__wrapped__(expression, tuple(divisor))


@functools.lru_cache(maxsize=16384)
def _simplify_once(expression: sp.Expr, divisor: tuple[int, ...]) -> sp.Expr:
    """Return _simplify's answer; a network's layers repeat few distinct formulas (resnet152:
    67 among 3,086), and sympy expressions are immutable, so each is simplified once."""
    axes = AXES[len(divisor)]
    if not expression.has(*axes):
        return sp.expand(expression)
    steps = sp.symbols(" ".join(f"t_{a}" for a in axes), integer=True, positive=True, seq=True)
    forward = {a: d * t for a, d, t in zip(axes, divisor, steps, strict=True)}
    back = {t: a / d for a, d, t in zip(axes, divisor, steps, strict=True)}
    return sp.expand(expression.subs(forward).subs(back))


def size_label(sizes: Sequence[int], short: bool = True) -> str:
    """Return '32' for 32x32 (with `short`), else '32x48'; '16000' for a 1-d length."""
    sizes = [int(s) for s in sizes]
    if short and len(set(sizes)) == 1 and len(sizes) == 2:
        return str(sizes[0])
    return "x".join(map(str, sizes))


def parse_resolution(text: str, rank: int = 2) -> tuple[int, ...]:
    """Return (H, W) from '32' (32x32) or '32x48' (H=32, W=48); with `rank` 1, (T,) from
    '16000'; with `rank` 3, (D, H, W) from '16x112x112' or '16' (16x16x16)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * rank
    if len(sizes) != rank or min(sizes) < 1:
        usage = {
            1: "T (a length), e.g. 16000",
            2: "N (N x N) or HxW, e.g. 32 or 32x48",
            3: "N (N x N x N) or DxHxW, e.g. 16x112x112",
        }[rank]
        raise ValueError(f"bad resolution {text!r}: use {usage}")
    return tuple(sizes)


def parse_settings(items: Iterable[str]) -> dict[str, int]:
    """Return {name: int} from ['NF=64', 'K=5']."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad --set {item!r}: use NAME=INTEGER, e.g. NF=64")
        try:
            settings[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"bad --set {item!r}: {value!r} is not an integer") from None
        if settings[key.strip()] < 1:
            raise ValueError(f"bad --set {item!r}: hyperparameters must be positive integers")
    return settings
