"""`convtally crosscheck`: each FLOP counter's number next to our formula under its convention.

For every installed tool (fvcore, ptflops, thop, torchinfo, PyTorch's FlopCounterMode) the tool
runs on the network, our formulas are evaluated under the tool's preset (analysis.conventions),
and the two numbers must be equal. The difference between each tool and our default convention
is then broken down by cause (bias terms, normalisation, activations, pooling, upsampling,
element-wise ops, ops the tool does not see), each with its count and its layers. The tools
are witnesses only: the presets never call them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from convtally.analysis.accounting import Analysis, analyse, answer_every_resolution
from convtally.analysis.conventions import make_convention, preset
from convtally.analysis.formatting import resolution_label
from convtally.analysis.peers import TOOLS, ToolResult, run_tool, tool_package
from convtally.models.registry import ModelSpec, resolve, with_builder_keywords
from torch import nn
from tqdm import tqdm

CAUSES = {
    "bias": "bias terms",
    "macs": "conv/linear multiply-adds (unit or formula)",
    "norm": "normalisation",
    "activation": "activations",
    "pool": "pooling",
    "upsample": "upsampling",
    "elementwise": "element-wise ops",
    "unseen": "ops the tool does not see or counts as zero",
}
KIND_CAUSE = {
    "conv": "macs",
    "linear": "macs",
    "norm": "norm",
    "activation": "activation",
    "pool": "pool",
    "adaptive_pool": "pool",
    "upsample": "upsample",
    "elementwise": "elementwise",
    "routing": "elementwise",
    "unknown": "unseen",
}


@dataclass
class Cause:
    """One cause of a tool's difference from the default: the count and the layers it comes from."""

    cause: str
    difference: int
    layers: list[str]


@dataclass
class ToolCheck:
    """One tool at one resolution: its number, our preset's number, and the breakdown."""

    tool: str
    package: str
    counts: str
    number: int
    preset: int
    parameters: int | None
    preset_weights: int
    causes: list[Cause]
    per_module: dict[str, int] | None = field(default=None, repr=False)

    @property
    def equal(self) -> bool:
        """Return True when the number (and the parameters, where reported) equal the preset."""
        return self.number == self.preset and (
            self.parameters is None or self.parameters == self.preset_weights
        )

    @property
    def difference(self) -> int:
        """Return the preset's difference from the default convention (the causes' sum)."""
        return sum(c.difference for c in self.causes)


@dataclass
class LayerRow:
    """One layer (a module's calls summed) with the default count and each tool's and preset's."""

    layer: str
    type: str
    default: int
    presets: dict[str, int]
    tools: dict[str, int | None]


@dataclass
class ResolutionCheck:
    """All tools at one resolution."""

    resolution: str
    default: int
    default_weights: int
    tools: list[ToolCheck]
    layers: list[LayerRow]


@dataclass
class CrossCheck:
    """The cross-check of one model over its resolutions."""

    model: str
    input_shape: list[int]
    resolutions: list[ResolutionCheck]
    skipped: list[str]

    @property
    def mismatches(self) -> list[tuple[str, str]]:
        """Return (resolution, tool) for every preset that differs from its tool."""
        return [(r.resolution, t.tool) for r in self.resolutions for t in r.tools if not t.equal]

    def to_dict(self) -> dict:
        """Return JSON-ready data."""
        return {
            "model": self.model,
            "input_shape": self.input_shape,
            "skipped": self.skipped,
            "resolutions": [
                {
                    "resolution": r.resolution,
                    "default": r.default,
                    "default_weights": r.default_weights,
                    "tools": [
                        {
                            **{k: v for k, v in asdict(t).items() if k != "per_module"},
                            "equal": t.equal,
                            "difference_from_default": t.difference,
                        }
                        for t in r.tools
                    ],
                    "layers": [asdict(row) for row in r.layers],
                }
                for r in self.resolutions
            ],
            "mismatches": [list(m) for m in self.mismatches],
        }


# --- our side ------------------------------------------------------------------------------


def causes_of(
    analysis: Analysis, default: np.ndarray, counted: np.ndarray, unbiased: np.ndarray
) -> list[Cause]:
    """Return the causes of a preset's difference from the default, from per-layer counts.

    `default`, `counted` and `unbiased` hold each layer's connections under the default
    convention, the preset, and the preset without its bias terms.
    """
    causes: dict[str, Cause] = {}

    def add(cause: str, amount: int, layer: str) -> None:
        if amount:
            entry = causes.setdefault(cause, Cause(CAUSES[cause], 0, []))
            entry.difference += int(amount)
            entry.layers.append(layer)

    for index, layer in enumerate(analysis.layers):
        ours, theirs = int(default[index]), int(counted[index])
        if theirs == 0 and ours != 0:
            add("unseen", -ours, layer.name)
            continue
        add("bias", theirs - int(unbiased[index]), layer.name)
        add(KIND_CAUSE.get(layer.kind, "unseen"), int(unbiased[index]) - ours, layer.name)
    return [causes[key] for key in CAUSES if key in causes]


def _module_of(analysis: Analysis, index: int) -> str | None:
    layer = analysis.layers[index]
    if layer.cost.via in ("module", "module_subclass"):
        return layer.name.split(":")[0]
    return None


def _layer_rows(
    analysis: Analysis,
    default: np.ndarray,
    presets: Mapping[str, np.ndarray],
    results: Mapping[str, ToolResult],
) -> list[LayerRow]:
    rows: dict[str, LayerRow] = {}
    for index, layer in enumerate(analysis.layers):
        module = _module_of(analysis, index)
        key = module or layer.name
        if key not in rows:
            tools = {}
            for tool, result in results.items():
                per_module = result.per_module or {}
                tools[tool] = per_module.get(module) if module is not None else None
            rows[key] = LayerRow(key, layer.type, 0, dict.fromkeys(presets, 0), tools)
        rows[key].default += int(default[index])
        for tool, values in presets.items():
            rows[key].presets[tool] += int(values[index])
    return list(rows.values())


def _builder(
    model: str | ModelSpec | nn.Module, settings: Mapping[str, int] | None
) -> Callable[[], nn.Module]:
    # Each tool gets a fresh network: they add hooks, buffers and attributes while counting.
    if isinstance(model, str):
        model = resolve(model)
    if isinstance(model, ModelSpec):
        spec, settings = with_builder_keywords(model, settings)
        values = spec.settings(settings)
        return lambda: spec.build(values).eval()
    return lambda: copy.deepcopy(model).eval()


def crosscheck(
    model: str | ModelSpec | nn.Module,
    resolutions: Sequence[tuple[int, int]] = ((224, 224),),
    settings: Mapping[str, int] | None = None,
    tools: Sequence[str] = TOOLS,
    exact: bool = False,
) -> CrossCheck:
    """Return each installed tool's number next to our preset for it, with the breakdown.

    A resolution that breaks the simple formulas' divisibility is counted with the exact
    (floor) formulas, as `exact=True` does for all of them.
    """
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool {unknown[0]!r}; use some of {', '.join(TOOLS)}")
    first = analyse(model, settings, exact=exact, resolutions=list(resolutions))
    first.require_images("convtally crosscheck")  # the peer tools take images
    analysis = answer_every_resolution(
        first, resolutions,
        lambda: analyse(model, settings, exact=True, resolutions=list(resolutions)),
    )
    build = _builder(model, settings)
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    skipped, packages = [], {}
    for tool in tools:
        try:
            packages[tool] = tool_package(tool)
        except ImportError:
            skipped.append(
                f"{tool}: skipped, package {tool!r} is not installed "
                "(pip install 'convtally[peers]')"
            )
    for resolution in resolutions:
        analysis.check_resolution(*resolution)
    # Each convention's formulas are compiled once and evaluated at every resolution.
    default = analysis.evaluate(resolutions)
    counted, unbiased = {}, {}
    for tool in packages:
        convention = preset(tool)
        counted[tool] = analysis.with_convention(convention).evaluate(resolutions)
        unbiased[tool] = analysis.with_convention(
            make_convention(bias_in_connections=False, base=convention)
        ).evaluate(resolutions)["connections"]
    checks = []
    # a bar on a terminal only (tqdm turns itself off when stderr is not one)
    progress = tqdm(total=len(resolutions) * len(packages), desc="crosscheck", unit="run",
                    disable=None, leave=False)
    for j, resolution in enumerate(resolutions):
        x = torch.zeros(1, channels, *resolution)
        tool_checks, presets, results = [], {}, {}
        for tool, package in packages.items():
            progress.set_postfix_str(f"{tool} at {resolution_label(*resolution)}")
            result = run_tool(tool, build(), x)
            progress.update()
            connections = counted[tool]["connections"][:, j]
            tool_checks.append(
                ToolCheck(
                    tool=tool,
                    package=package,
                    counts=preset(tool).counts,
                    number=result.total,
                    preset=int(connections.sum()),
                    parameters=result.parameters,
                    preset_weights=int(counted[tool]["weights"][:, j].sum()),
                    causes=causes_of(
                        analysis, default["connections"][:, j], connections, unbiased[tool][:, j]
                    ),
                    per_module=result.per_module,
                )
            )
            presets[tool], results[tool] = connections, result
        checks.append(
            ResolutionCheck(
                resolution=resolution_label(*resolution),
                default=int(default["connections"][:, j].sum()),
                default_weights=int(default["weights"][:, j].sum()),
                tools=tool_checks,
                layers=_layer_rows(analysis, default["connections"][:, j], presets, results),
            )
        )
    progress.close()
    return CrossCheck(analysis.model, [channels], checks, skipped)


# --- rendering -----------------------------------------------------------------------------


def _layers_text(layers: list[str], limit: int = 6) -> str:
    shown = ", ".join(layers[:limit])
    more = f", ... (+{len(layers) - limit} more)" if len(layers) > limit else ""
    return f"{len(layers)} layer{'s' if len(layers) != 1 else ''}: {shown}{more}"


def _summary_rows(check: ResolutionCheck, text: bool = True) -> list[dict]:
    def number(value: int | None) -> int | str:
        if value is None:
            return "-" if text else ""
        return f"{value:,}" if text else value

    rows = []
    for t in check.tools:
        rows.append(
            {
                "tool": t.tool,
                "package": t.package,
                "tool's number": t.number,
                "our preset": t.preset,
                "equal": "yes" if t.number == t.preset else "NO",
                "params (tool)": number(t.parameters),
                "weights (preset)": number(t.preset_weights),
                "params equal": "-"
                if t.parameters is None
                else ("yes" if t.parameters == t.preset_weights else "NO"),
            }
        )
    return rows


def _cause_rows(check: ResolutionCheck, full: bool) -> list[dict]:
    rows = []
    for t in check.tools:
        for cause in t.causes:
            rows.append(
                {
                    "tool": t.tool,
                    "cause": cause.cause,
                    "difference": cause.difference,
                    "layers": "; ".join(cause.layers) if full else _layers_text(cause.layers),
                }
            )
        if t.number != t.preset:
            rows.append(
                {
                    "tool": t.tool,
                    "cause": "unexplained (tool - our preset)",
                    "difference": t.number - t.preset,
                    "layers": "",
                }
            )
    return rows


def _layer_table(check: ResolutionCheck) -> list[dict]:
    rows = []
    for row in check.layers:
        entry = {"layer": row.layer, "type": row.type, "default": row.default}
        for tool, theirs in row.tools.items():
            ours = row.presets[tool]
            if theirs is None:
                entry[tool] = f"({ours:,})" if ours else ""
            else:
                entry[tool] = f"{theirs:,}" + ("" if theirs == ours else f" *{ours:,}")
        rows.append(entry)
    return rows


LAYER_NOTE = (
    "per module as each tool reports it; (N): our preset for a call the tool reports in its "
    "total only; 'T *N': the tool's module shows T, our preset's row N (ptflops counts F.relu "
    "and other patched functional calls made inside a module's forward in its total only, "
    "fvcore and torch include a module's children)"
)


def render_crosscheck(result: CrossCheck, fmt: str = "text", layers: bool = False) -> str:
    """Return the cross-check as 'text', 'json', 'csv' or 'markdown'."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2) + "\n"
    import pandas as pd
    from tabulate import tabulate

    if fmt == "csv":
        frames = []
        for check in result.resolutions:
            summary = pd.DataFrame(_summary_rows(check, text=False)).assign(
                resolution=check.resolution
            )
            causes = pd.DataFrame(_cause_rows(check, full=True)).assign(resolution=check.resolution)
            frames.append(summary.merge(causes, on=["tool", "resolution"], how="left"))
        frame = pd.concat(frames) if frames else pd.DataFrame()
        columns = ["resolution", *[c for c in frame.columns if c != "resolution"]]
        return frame[columns].to_csv(index=False) if len(frame) else ""
    table_format = "github" if fmt == "markdown" else "simple"

    def table(rows: list[dict]) -> str:
        return tabulate(pd.DataFrame(rows), headers="keys", tablefmt=table_format,
                        showindex=False, intfmt=",")
    lines = [
        f"crosscheck {result.model}: each tool on a 1x{result.input_shape[0]}xHxW input, "
        "our formulas under its preset (--convention NAME; docs/conventions.md)",
        *result.skipped,
    ]
    for check in result.resolutions:
        lines += ["", f"## {check.resolution}" if fmt == "markdown" else f"at {check.resolution}:"]
        lines.append("")
        lines.append(table(_summary_rows(check)))
        lines += [
            "",
            f"default convention (docs/counting.md): {check.default:,} connections, "
            f"{check.default_weights:,} weights; each tool's difference from it, by cause:",
            "",
        ]
        rows = []
        for t in check.tools:
            rows.append(
                {
                    "tool": t.tool,
                    "cause": "total difference",
                    "difference": f"{t.number - check.default:+,}",
                    "layers": "",
                }
            )
            rows += [
                {**row, "tool": "", "difference": f"{row['difference']:+,}"}
                for row in _cause_rows(check, full=False)
                if row["tool"] == t.tool
            ]
        lines.append(table(rows))
        if layers:
            lines += ["", LAYER_NOTE, ""]
            lines.append(table(_layer_table(check)))
    mismatches = result.mismatches
    lines += [
        "",
        f"{len(mismatches)} preset(s) differ from their tool"
        + (": " + ", ".join(f"{t} at {r}" for r, t in mismatches) if mismatches else ""),
    ]
    return "\n".join(lines) + "\n"
