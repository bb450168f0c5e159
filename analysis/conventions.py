"""Counting conventions: which terms go into weights and connections (DESIGN.md's defaults)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from analysis.rules import LayerCost

ELEMENTWISE_KINDS = frozenset({"norm", "activation", "elementwise"})


@dataclass(frozen=True)
class Convention:
    """The switches that decide what counts; every table prints the one it used."""

    name: str = "default"
    bias_in_connections: bool = False
    batchnorm_in_weights: bool = True
    elementwise_in_connections: bool = True

    def weights(self, cost: LayerCost) -> sp.Expr:
        """Return the layer's weights under this convention."""
        if cost.kind == "norm" and not self.batchnorm_in_weights:
            return sp.Integer(0)
        return cost.weights

    def connections(self, cost: LayerCost) -> sp.Expr:
        """Return the layer's connections under this convention."""
        if cost.kind in ELEMENTWISE_KINDS and not self.elementwise_in_connections:
            return sp.Integer(0)
        if self.bias_in_connections:
            return cost.connections + cost.bias_connections
        return cost.connections

    def describe(self) -> str:
        """Return a one-line statement of the switches, printed with every table."""
        return (
            f"convention {self.name}: biases {'in' if self.bias_in_connections else 'not in'} "
            f"connections; BatchNorm parameters {'in' if self.batchnorm_in_weights else 'not in'} "
            f"weights; element-wise layers {'in' if self.elementwise_in_connections else 'not in'} "
            "connections"
        )

    def as_dict(self) -> dict:
        """Return the convention as JSON-ready data."""
        return {
            "name": self.name,
            "bias_in_connections": self.bias_in_connections,
            "batchnorm_in_weights": self.batchnorm_in_weights,
            "elementwise_in_connections": self.elementwise_in_connections,
        }


DEFAULT = Convention()


def make_convention(
    bias_in_connections: bool = False,
    batchnorm_in_weights: bool = True,
    elementwise_in_connections: bool = True,
) -> Convention:
    """Return the default convention with the given switches, named 'custom' if any differ."""
    convention = replace(
        DEFAULT,
        bias_in_connections=bias_in_connections,
        batchnorm_in_weights=batchnorm_in_weights,
        elementwise_in_connections=elementwise_in_connections,
    )
    return convention if convention == DEFAULT else replace(convention, name="custom")
