"""Channel counts and kernel sizes as exact affine functions of a network's hyperparameters.

The network is built at the requested setting and at one probe per hyperparameter; every
integer attribute of every module is fitted as c0 + sum(ci * hp_i) and confirmed at a further
probe that moves all hyperparameters at once. Attributes that are not affine stay concrete.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy as sp
from convtally.models.registry import ModelSpec
from torch import nn


def hyperparameter_symbols(spec: ModelSpec) -> dict[str, sp.Symbol]:
    """Return symbol name -> positive-integer sympy Symbol for the spec's hyperparameters."""
    return {
        hp.symbol: sp.Symbol(hp.symbol, integer=True, positive=True) for hp in spec.hyperparameters
    }


def integer_attributes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Return module name -> {attribute: int or tuple of ints} for every module of `model`."""
    return {name: _integers(module) for name, module in model.named_modules()}


def _integers(module: nn.Module) -> dict[str, Any]:
    """Return {attribute: int or tuple of ints} of one module."""
    attributes = {}
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int) or (
            isinstance(value, tuple)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            attributes[key] = value
    return attributes


class ConcreteAttributes(Mapping):
    """Module name -> {attribute: sympy Integer or tuple of them} for every module of a network
    (no hyperparameters), each module's entry made when a rule first reads it: the rules read
    those of the modules a graph calls (making every entry was 2 ms of timm efficientvit_b0's
    46), and most of those (activations, dropout, identity) read none."""

    def __init__(self, model: nn.Module):
        self._model = model
        self._made: dict[str, ModuleIntegers] = {}

    def __getitem__(self, name: str) -> ModuleIntegers:
        made = self._made.get(name)
        if made is None:
            module = self._model
            for part in name.split(".") if name else ():  # the registry, not getattr
                child = module._modules.get(part)
                if child is None:
                    raise KeyError(name)
                module = child
            made = self._made[name] = ModuleIntegers(module)
        return made

    def get(self, name: str, default: Any = None) -> Any:
        """Return self[name], or `default` where the network has no such module."""
        try:
            return self[name]
        except KeyError:
            return default

    def __iter__(self):
        return (name for name, _ in self._model.named_modules())

    def __len__(self) -> int:
        return sum(1 for _ in self._model.named_modules())


class ModuleIntegers(Mapping):
    """One module's {attribute: sympy Integer or tuple of them}, made when first read."""

    __slots__ = ("_module", "_table")

    def __init__(self, module: nn.Module):
        self._module = module
        self._table: dict[str, Any] | None = None

    def _made(self) -> dict[str, Any]:
        if self._table is None:
            self._table = {key: _to_sympy(value) for key, value in _integers(self._module).items()}
        return self._table

    def __getitem__(self, key: str) -> Any:
        return self._made()[key]

    def __iter__(self):
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._made())


def concrete_attributes(model: nn.Module) -> Mapping[str, dict[str, Any]]:
    """Return the attribute table with every value as a sympy Integer (no hyperparameters)."""
    return ConcreteAttributes(model)


def _to_sympy(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(sp.Integer(v) for v in value)
    return sp.Integer(value)


def _shapes_build(spec: ModelSpec, setting: Mapping[str, int]) -> nn.Module:
    """Return the network at `setting` built on the meta device (attributes need no weights),
    or built for real when its factory cannot build there."""
    network = spec.build_meta(setting)
    return network if network is not None else spec.build(setting)


def _probe(spec: ModelSpec, setting: Mapping[str, int]):
    """Return a probe build; a memory refusal says it was a probe, not the user's setting."""
    from convtally.analysis.limits import MemoryLimitError

    try:
        return _shapes_build(spec, setting)
    except MemoryLimitError as error:
        raise MemoryLimitError(
            f"fitting the formulas in {', '.join(setting)} needs probe builds near the setting "
            f"asked for, and {error}"
        ) from None


def fit_attributes(
    spec: ModelSpec, settings: Mapping[str, int], network: nn.Module | None = None
) -> dict[str, dict[str, Any]]:
    """Return module name -> {attribute: sympy expression in the hyperparameter symbols}.

    `network` is the spec built at `settings` when the caller has it (on any device: only its
    integer attributes are read); the probes are built on the meta device where they can be.
    """
    symbols = hyperparameter_symbols(spec)
    base = spec.settings(settings)
    if spec.hyperparameters:
        # the fit is a function of the factory and the setting alone: an analysis asked again
        # (the exact form after the simple one, a sweep over conventions) reuses it
        declared = tuple((hp.name, hp.symbol, hp.probe_step) for hp in spec.hyperparameters)
        key = (spec.name, spec.factory, declared, tuple(sorted(base.items())))
        try:
            fitted = _FITTED.get(key)
        except TypeError:  # a spec that cannot be hashed (its factory): fitted each time
            return _fit(spec, base, symbols, network)
        if fitted is None:
            fitted = _FITTED[key] = _fit(spec, base, symbols, network)
        return {name: dict(attributes) for name, attributes in fitted.items()}
    if network is None:
        network = _shapes_build(spec, base)
    return concrete_attributes(network)


_FITTED: dict[tuple, dict[str, dict[str, Any]]] = {}


def _fit(spec: ModelSpec, base: Mapping[str, int], symbols: Mapping[str, sp.Symbol],
         network: nn.Module | None) -> dict[str, dict[str, Any]]:
    if network is None:
        network = _shapes_build(spec, base)
    base_table = integer_attributes(network)
    steps = {hp.symbol: hp.probe_step for hp in spec.hyperparameters}
    probes = {}
    for symbol, step in steps.items():
        probes[symbol] = integer_attributes(_probe(spec, {**base, symbol: base[symbol] + step}))
    confirm_setting = {symbol: base[symbol] + 2 * step for symbol, step in steps.items()}
    confirm_table = integer_attributes(_probe(spec, confirm_setting))

    fitted: dict[str, dict[str, Any]] = {}
    for name, attributes in base_table.items():
        fitted[name] = {}
        for key, value in attributes.items():
            fitted[name][key] = _fit_one(
                name, key, value, base, steps, probes, confirm_setting, confirm_table, symbols
            )
    return fitted


def _fit_one(name, key, value, base, steps, probes, confirm_setting, confirm_table, symbols):
    values = value if isinstance(value, tuple) else (value,)
    results = []
    for index, base_value in enumerate(values):
        expression = sp.Integer(base_value)
        for symbol, step in steps.items():
            probe_value = _lookup(probes[symbol], name, key, index)
            if probe_value is None:
                return _to_sympy(value)
            slope = sp.Rational(probe_value - base_value, step)
            expression += slope * (symbols[symbol] - base[symbol])
        expression = sp.expand(expression)
        confirm_value = _lookup(confirm_table, name, key, index)
        substituted = expression.subs({symbols[s]: v for s, v in confirm_setting.items()})
        if confirm_value is None or substituted != confirm_value:
            return _to_sympy(value)  # not affine in the hyperparameters: keep it concrete
        results.append(expression)
    return tuple(results) if isinstance(value, tuple) else results[0]


def _lookup(table, name, key, index):
    value = table.get(name, {}).get(key)
    if value is None:
        return None
    values = value if isinstance(value, tuple) else (value,)
    return values[index] if index < len(values) else None
