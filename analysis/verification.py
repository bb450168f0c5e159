"""Proving the formulas against the running network: forward hooks, fvcore and PyTorch's counter.

Weights and outputs must equal what the network has and produces; conv and linear connections
must equal fvcore's count (one per multiply-add) and half of PyTorch's FlopCounterMode count
(two FLOPs per multiply-add). For other layers the tools follow other conventions: both
numbers are shown, and a difference there is not a mismatch. Each layer's bytes saved for
backward (analysis/memory.py) must equal what autograd keeps (saved_tensors_hooks, on the CPU).
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sympy as sp
import torch
import torch.fx
from convtally.analysis import peers
from convtally.analysis.accounting import (
    Analysis,
    H,
    W,
    analyse,
    answer_every_resolution,
    node_output_shapes,
)
from convtally.analysis.conventions import DEFAULT, Convention
from convtally.analysis.rules import BATCH
from torch import nn
from tqdm import tqdm

MUST_MATCH_FVCORE = ("conv", "linear")
FVCORE_CONVENTION = {
    "norm": "fvcore counts inference batch_norm as 2 per value with affine parameters; ours 1",
    "upsample": "fvcore counts upsampling per output, 1 nearest and 4 bilinear, as ours",
    "adaptive_pool": "fvcore counts adaptive_avg_pool2d as 1 per input value",
    "pool": "fvcore does not count max_pool2d",
    "activation": "fvcore does not count activations",
    "elementwise": "fvcore does not count element-wise add/mul",
    "routing": "no arithmetic",
}


# BatchNorm in training needs more than one value per channel; the saved bytes are checked at B=2
MEMORY_BATCH = 2


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used for the named network."""


@dataclass
class LayerCheck:
    """One layer at one resolution: the formula's values, the measured ones, and a verdict."""

    layer: str
    type: str
    kind: str
    resolution: str
    shape_formula: list[int]
    shape_measured: list[int]
    weights_formula: int
    weights_measured: int | None
    outputs_formula: int
    outputs_measured: int
    connections_formula: int
    fvcore: int | None
    torch_flops: int | None
    problems: list[str] = field(default_factory=list)
    note: str = ""
    saved_formula: int | None = None  # bytes kept for backward at B=2 (None: not checked)
    saved_measured: int | None = None  # what autograd keeps (saved_tensors_hooks, CPU)

    @property
    def verdict(self) -> str:
        """Return 'ok', 'ok (convention differs)' or 'MISMATCH: ...'."""
        if self.problems:
            return "MISMATCH: " + "; ".join(self.problems)
        return "ok (convention differs)" if self.note else "ok"


@dataclass
class Verification:
    """All checks of one network over the requested resolutions."""

    model: str
    device: str
    resolutions: list[str]
    convention: dict
    checks: list[LayerCheck]
    checkpoint: str | None = None

    @property
    def mismatches(self) -> list[LayerCheck]:
        """Return the checks with at least one must-match difference."""
        return [c for c in self.checks if c.problems]

    def summary(self) -> str:
        """Return the one-line summary."""
        layers = len({c.layer for c in self.checks})
        return (
            f"verified {layers} layers of {self.model} at {len(self.resolutions)} "
            f"resolution(s) ({', '.join(self.resolutions)}) on {self.device}: "
            f"{len(self.mismatches)} mismatch(es)"
        )

    def to_dict(self) -> dict:
        """Return JSON-ready data."""
        return {
            "model": self.model,
            "device": self.device,
            "resolutions": self.resolutions,
            "checkpoint": self.checkpoint,
            "convention": self.convention,
            "torch_flops_note": "PyTorch's FlopCounterMode counts 2 FLOPs per multiply-add",
            "checks": [{**asdict(c), "verdict": c.verdict} for c in self.checks],
            "mismatches": len(self.mismatches),
            "summary": self.summary(),
        }


def _unsafe_global(message: str) -> str | None:
    """Return the global a weights-only load refused ('posix.system'), None for other errors."""
    match = re.search(r"unsupported GLOBAL ([\w.]+)|add_safe_globals\(\[([\w.]+)\]\)", message)
    if match:
        return match.group(1) or match.group(2)
    return "an object" if "GLOBAL" in message or "global" in message.split("error:")[-1] else None


def load_checkpoint(network: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into `network` (weights_only), or raise a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .pt file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_global(str(error))
        if unsafe is None:
            raise CheckpointError(
                f"checkpoint {path} is truncated or not a torch file (UnpicklingError); "
                "save it with torch.save(model.state_dict(), PATH)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} holds Python objects beyond tensors ({unsafe}: a pickled module "
            "or code), which a weights-only load refuses because unpickling them could run "
            "code; nothing was loaded: save torch.save(model.state_dict(), PATH) instead"
        ) from None
    except Exception as error:  # weights_only: nothing ran; any failure means unreadable bytes
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch file ({type(error).__name__}); "
            "save it with torch.save(model.state_dict(), PATH)"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} is not a state_dict (got {type(state).__name__}); save "
            "model.state_dict()"
        )
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"checkpoint {path} does not fit the network: {'; '.join(parts)}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the network: shape mismatch at {key}: "
                f"checkpoint {tuple(state[key].shape)}, network {tuple(value.shape)} "
                "(built with other hyperparameters? use --set)"
            )
    network.load_state_dict(state)


def _record_functional_shapes(graph_module: torch.fx.GraphModule, x: torch.Tensor) -> dict:
    functional = {
        n.name for n in graph_module.graph.nodes if n.op in ("call_function", "call_method")
    }
    shapes = node_output_shapes(graph_module, x)
    return {name: _shape_list(shapes[name]) for name in functional}


def _shape_list(shape: Any) -> list[tuple[int, ...]] | None:
    """Return a recorded output as a list of shapes (one per tensor), None for non-tensors."""
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return [shape]  # one tensor (an empty tuple is a 0-d tensor)
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(t, tuple) for t in shape):
        return list(shape)
    return None


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def measure(analysis: Analysis, height: int, width: int, device: torch.device):
    """Return (per-node measured output shapes, fvcore by module, torch FLOPs by module)."""
    network = analysis.network
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    x = torch.zeros(1, channels, height, width, device=device)
    calls: dict[str, list] = defaultdict(list)
    names = {module: name for name, module in network.named_modules()}
    handles = [
        module.register_forward_hook(lambda m, i, o: calls[names[m]].append(_shape_of(o)))
        for module in network.modules()
    ]
    try:
        with torch.no_grad():
            network(x)
    except RuntimeError as error:
        raise ValueError(
            f"{analysis.model} fails to run at {height}x{width}: {str(error).splitlines()[0][:160]}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    measured: dict[str, Any] = {}
    seen: dict[str, int] = defaultdict(int)
    for node in analysis.graph_module.graph.nodes:
        if node.op == "call_module":
            measured[node.name] = calls[node.target][seen[node.target]]
            seen[node.target] += 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's jit tracing warns about deprecations
        measured.update(_record_functional_shapes(analysis.graph_module, x))
        fvcore = peers.run_tool("fvcore", network, x, threads=None).per_module
        torch_counts = peers.run_tool("torch", network, x, threads=None).per_module
    return measured, fvcore, torch_counts


def verify(
    model: str | Analysis,
    resolutions: Sequence[tuple[int, int]] = ((32, 32), (64, 64)),
    settings: Mapping[str, int] | None = None,
    convention: Convention = DEFAULT,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Verification:
    """Return every layer's formula values checked against hooks, fvcore and FlopCounterMode."""
    from convtally.analysis.formatting import resolution_label
    from convtally.analysis.limits import check_forward_fits
    from convtally.models.device import device_description, resolve_device

    if isinstance(model, Analysis):
        analysis = model
    else:
        analysis = answer_every_resolution(
            analyse(model, settings, convention), resolutions,
            lambda: analyse(model, settings, convention, exact=True),
        )
    check_forward_fits(analysis, resolutions)  # before anything runs
    device = resolve_device(device) if isinstance(device, str) else device
    if checkpoint is not None:
        load_checkpoint(analysis.network, checkpoint)
    analysis.network.to(device).eval()
    warnings.filterwarnings("ignore", message="Using padding='same'")
    values = analysis.evaluate(resolutions)
    substitution = analysis.substitutions()
    memory = _memory_model(analysis)
    checks = []
    # a bar on a terminal only (tqdm turns itself off when stderr is not one)
    for j, (height, width) in enumerate(
        tqdm(resolutions, desc="verify", unit="resolution", disable=None, leave=False)
    ):
        label = resolution_label(height, width)
        measured, fvcore, torch_counts = measure(analysis, height, width, device)
        saved = measure_saved_bytes(analysis, memory, height, width) if memory else None
        at = {H: height, W: width, BATCH: 1, **substitution}
        owners = set()
        # fvcore and FlopCounterMode report a module called twice as the sum of its calls
        module_totals: dict[str, int] = defaultdict(int)
        module_calls: dict[str, int] = defaultdict(int)
        for layer in analysis.layers:
            if layer.node in _module_nodes(analysis):
                name = layer.name.split(":")[0]
                module_totals[name] += int(sp.sympify(layer.cost.connections).subs(at))
                module_calls[name] += 1
        for index, layer in enumerate(analysis.layers):
            shapes = measured.get(layer.node)
            shape_measured = list(shapes[0][1:]) if shapes else []
            outputs_measured = sum(int(torch.Size(s[1:]).numel()) for s in shapes or [])
            module_name = (
                layer.name.split(":")[0] if layer.node in _module_nodes(analysis) else None
            )
            weights_measured = 0
            if module_name is not None and module_name not in owners:
                owners.add(module_name)
                module = analysis.network.get_submodule(module_name)
                weights_measured = sum(p.numel() for p in module.parameters())
            raw_weights = int(sp.sympify(layer.cost.weights).subs(at))
            raw_connections = int(sp.sympify(layer.cost.connections).subs(at))
            if module_name is not None and module_calls[module_name] > 1:
                raw_connections = module_totals[module_name]
            shape_formula = [int(sp.sympify(d).subs(at)) for d in layer.output_shape]
            check = LayerCheck(
                layer=layer.name,
                type=layer.type,
                kind=layer.kind,
                resolution=label,
                shape_formula=shape_formula,
                shape_measured=shape_measured,
                weights_formula=int(values["weights"][index, j]),
                weights_measured=weights_measured,
                outputs_formula=int(values["outputs"][index, j]),
                outputs_measured=outputs_measured,
                connections_formula=int(values["connections"][index, j]),
                fvcore=int(fvcore[module_name]) if module_name in fvcore else None,
                torch_flops=torch_counts.get(module_name) if module_name else None,
            )
            if shapes is not None and len(shapes) == 1 and shape_formula != shape_measured:
                check.problems.append(f"shape {shape_formula} != measured {shape_measured}")
            if int(values["outputs"][index, j]) != outputs_measured:
                check.problems.append(
                    f"outputs {check.outputs_formula} != measured {outputs_measured}"
                )
            if raw_weights != weights_measured and layer.known:
                check.problems.append(f"weights {raw_weights} != parameters {weights_measured}")
            if _fvcore_blind(analysis, module_name, check.fvcore):
                check.note = (
                    "fvcore does not see convolutions with padding='same' "
                    "(aten::_convolution_mode); PyTorch's counter is the witness"
                )
                if 2 * raw_connections != check.torch_flops:
                    check.problems.append(
                        f"2 x connections {2 * raw_connections} != torch {check.torch_flops}"
                    )
            elif layer.kind in MUST_MATCH_FVCORE and check.fvcore is not None:
                if raw_connections != check.fvcore:
                    check.problems.append(f"connections {raw_connections} != fvcore {check.fvcore}")
                if check.torch_flops is not None and 2 * raw_connections != check.torch_flops:
                    check.problems.append(
                        f"2 x connections {2 * raw_connections} != torch {check.torch_flops}"
                    )
            elif layer.kind not in MUST_MATCH_FVCORE:
                fv = check.fvcore or 0
                if fv != check.connections_formula:
                    check.note = FVCORE_CONVENTION.get(layer.kind, "conventions differ")
            if saved is not None and layer.node:
                _check_saved(check, layer, *saved)
            if module_name is not None and module_calls[module_name] > 1 and not check.note:
                check.note = (
                    f"module called {module_calls[module_name]} times: fvcore and "
                    "PyTorch report the sum of its calls, checked against ours"
                )
            checks.append(check)
    return Verification(
        model=analysis.model,
        device=device_description(device),
        resolutions=[resolution_label(*r) for r in resolutions],
        convention=analysis.convention.as_dict(),
        checks=checks,
        checkpoint=str(checkpoint) if checkpoint else None,
    )


def _memory_model(analysis: Analysis) -> Any:
    """Return the analysis' memory model (float32, SGD), None where it has no formulas."""
    from convtally.analysis.memory import memory_model

    try:
        return memory_model(analysis)
    except ValueError:  # not an fx capture: no memory formulas to check
        return None


def measure_saved_bytes(analysis: Analysis, memory: Any, height: int, width: int
                        ) -> tuple[dict[str, int], dict[str, int], dict[str, bool]] | None:
    """Return (ours, autograd's, rule known) saved bytes per graph node at B=2 on the CPU, or
    None when a training-mode pass would not fit in memory (the check is then left out)."""
    from convtally.analysis.limits import available_memory
    from convtally.analysis.memory import measure_saved

    point = [(MEMORY_BATCH, height, width)]
    result = memory.evaluate(point)
    if 4 * (result["totals"]["saved"][0] + result["transient"][0]) > available_memory():
        return None
    network = analysis.network
    if next(network.parameters(), torch.empty(0)).device.type != "cpu":
        network = copy.deepcopy(network).cpu()  # the witness is exact on the CPU
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    x = torch.randn(MEMORY_BATCH, channels, height, width)
    _, autograd = measure_saved(network, x, per_node=True, graph=analysis.graph_module.graph)
    rows = list(zip(analysis.layers, memory.layers, strict=True))
    ours = {layer.node: int(result["layers"]["saved"][i, 0])
            for i, (layer, _) in enumerate(rows) if layer.node}
    known = {layer.node: row.known for layer, row in rows if layer.node}
    return ours, autograd, known


def _check_saved(check: LayerCheck, layer: Any, ours: Mapping[str, int],
                 autograd: Mapping[str, int], known: Mapping[str, bool]) -> None:
    check.saved_formula = ours.get(layer.node, 0)
    check.saved_measured = autograd.get(layer.node, 0)
    if check.saved_formula == check.saved_measured:
        return
    if known.get(layer.node, True):
        check.problems.append(
            f"saved {check.saved_formula} bytes != autograd {check.saved_measured}")
    elif not check.note:
        check.note = "no memory rule: its saved bytes are unknown (counted 0)"


def _fvcore_blind(analysis: Analysis, module_name: str | None, count: int | None) -> bool:
    if module_name is None or count != 0:
        return False
    module = analysis.network.get_submodule(module_name)
    return isinstance(module, nn.Conv2d) and isinstance(module.padding, str)


def _module_nodes(analysis: Analysis) -> set[str]:
    if not hasattr(analysis, "_module_nodes"):
        analysis._module_nodes = {
            n.name for n in analysis.graph_module.graph.nodes if n.op == "call_module"
        }
    return analysis._module_nodes


def render_verification(result: Verification, fmt: str) -> str:
    """Return the verification as 'text', 'json' or 'csv'."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=2) + "\n"
    import pandas as pd

    rows = [
        {
            "layer": c.layer,
            "type": c.type,
            "res": c.resolution,
            "shape": "x".join(map(str, c.shape_formula)),
            "weights": c.weights_formula,
            "params (hook)": c.weights_measured,
            "outputs": c.outputs_formula,
            "outputs (hook)": c.outputs_measured,
            "connections": c.connections_formula,
            "fvcore": "" if c.fvcore is None else c.fvcore,
            "torch (2/MAC)": "" if c.torch_flops is None else c.torch_flops,
            f"saved B={MEMORY_BATCH}": "" if c.saved_formula is None else c.saved_formula,
            "saved (autograd)": "" if c.saved_measured is None else c.saved_measured,
            "verdict": c.verdict + (f" [{c.note}]" if c.note and fmt == "csv" else ""),
        }
        for c in result.checks
    ]
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        return frame.to_csv(index=False)
    from tabulate import tabulate

    notes = sorted({f"{c.kind}: {c.note}" for c in result.checks if c.note})
    header = [
        f"model: {result.model}  device: {result.device}"
        + (f"  checkpoint: {result.checkpoint}" if result.checkpoint else ""),
        "weights and outputs must equal the running network (parameter counts, forward hooks);",
        "conv/linear connections must equal fvcore (1 per multiply-add) and half of PyTorch's",
        "FlopCounterMode (2 FLOPs per multiply-add); bytes saved for backward at "
        f"B={MEMORY_BATCH} must equal",
        "what autograd keeps (saved_tensors_hooks, CPU); elsewhere the conventions differ:",
        *[f"  {n}" for n in notes],
    ]
    body = tabulate(frame, headers="keys", tablefmt="simple", showindex=False, intfmt=",")
    buffer = io.StringIO()
    buffer.write("\n".join(header) + "\n\n" + body + "\n\n" + result.summary() + "\n")
    return buffer.getvalue()
