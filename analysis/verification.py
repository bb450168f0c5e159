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
    analyse,
    answer_every_resolution,
    size_label,
)
from convtally.analysis.conventions import DEFAULT, Convention
from convtally.analysis.rules import BATCH
from convtally.analysis.tracing import flat_values, module_scope, node_output_shapes
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


# what verify reads for a capture other than fx (printed above the table)
CAPTURE_HEADER = {
    "export": [
        "capture: export: rows are ATen ops; their shapes are read from running the exported",
        "graph on the network's own tensors (its output must equal the network's); an op inside",
        "a conv or linear module is checked against that module's counts, and the totals under",
        "the fvcore and torch presets must equal fvcore's and FlopCounterMode's totals; saved",
        "bytes are not checked (the memory model needs the fx capture)",
    ],
    "concrete": [
        "capture: concrete: rows are counted at each size apart; their shapes are read from the",
        "network's graph run at that size, and the totals under the fvcore and torch presets",
        "must equal fvcore's and FlopCounterMode's totals; saved bytes are not checked (the",
        "memory model needs the fx capture with formulas in H, W)",
    ],
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
class TotalCheck:
    """Our total under a tool's preset against the tool's own total at one resolution."""

    tool: str  # fvcore or torch (FlopCounterMode); graph: the exported graph against the network
    resolution: str
    ours: int
    tool_total: int
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def verdict(self) -> str:
        """Return 'ok', 'ok (not compared)' or 'MISMATCH: ...'."""
        if self.problems:
            return "MISMATCH: " + "; ".join(self.problems)
        return "ok (not compared)" if self.note else "ok"


@dataclass
class Verification:
    """All checks of one network over the requested resolutions."""

    model: str
    device: str
    resolutions: list[str]
    convention: dict
    checks: list[LayerCheck]
    checkpoint: str | None = None
    capture: str = "fx"
    totals: list[TotalCheck] = field(default_factory=list)  # export and concrete captures

    @property
    def mismatches(self) -> list[LayerCheck | TotalCheck]:
        """Return the checks (layers, then totals) with at least one must-match difference."""
        return [c for c in [*self.checks, *self.totals] if c.problems]

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
            "capture": self.capture,
            "checks": [{**asdict(c), "verdict": c.verdict} for c in self.checks],
            "totals": [{**asdict(c), "verdict": c.verdict} for c in self.totals],
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
    # nn.MultiheadAttention returns (output, None) when it is not asked for its weights, an
    # LSTM (output, (h_n, c_n))
    leaves = flat_values(value) if isinstance(value, (tuple, list)) else []
    if (any(isinstance(v, torch.Tensor) for v in leaves)
            and all(isinstance(v, torch.Tensor) or v is None for v in leaves)):
        return [tuple(v.shape) for v in leaves if isinstance(v, torch.Tensor)]
    return None


def measure(analysis: Analysis, resolution: tuple[int, ...], device: torch.device):
    """Return (per-node measured output shapes, fvcore by module, torch FLOPs by module) at
    `resolution` ((H, W), or (T,) and (D, H, W) for 1-d and 3-d inputs)."""
    run = _measure_run(analysis, tuple(resolution), device)
    return run.shapes, run.fvcore.per_module, run.torch.per_module


@dataclass
class _Run:
    """One forward pass measured: output shapes per graph node, the peer tools' counts, the
    parameters each row reads first, and the module whose tool counts each row is checked
    against (None: checked in the totals only)."""

    shapes: dict[str, Any]
    fvcore: Any  # peers.ToolResult
    torch: Any  # peers.ToolResult
    weights: dict[str, int] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    exported: bool = False  # rows are ATen ops of an exported graph


def _input(analysis: Analysis, resolution: tuple[int, ...], device: torch.device
           ) -> torch.Tensor:
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    return torch.zeros(1, channels, *resolution, device=device)


def _measure_run(analysis: Analysis, resolution: tuple[int, ...], device: torch.device) -> _Run:
    """Run the network once at `resolution` and read what the rows of `analysis` are checked
    against."""
    network = analysis.network
    x = _input(analysis, resolution, device)
    calls: dict[str, list] = defaultdict(list)
    names = {module: name for name, module in network.named_modules()}
    handles = [
        module.register_forward_hook(lambda m, i, o: calls[names[m]].append(_shape_of(o)))
        for module in network.modules()
    ]
    try:
        with torch.no_grad():
            expected = network(x)
    except RuntimeError as error:
        raise ValueError(
            f"{analysis.model} fails to run at {size_label(resolution, short=False)}: "
            f"{str(error).splitlines()[0][:160]}"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's jit tracing warns about deprecations
        fvcore = peers.run_tool("fvcore", network, x, threads=None)
        torch_counts = _run_torch_counter(network, x)
    graph_module = analysis.graph_at(resolution)
    if graph_module is None:
        program = _program_at(analysis, *resolution)
        shapes, problems = _run_exported(program, x, expected, network)
        run = _Run(shapes, fvcore, torch_counts, problems=problems, exported=True)
        _exported_owners(analysis, program, run, resolution)
        return run
    measured: dict[str, Any] = {}
    seen: dict[str, int] = defaultdict(int)
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            measured[node.name] = calls[node.target][seen[node.target]]
            seen[node.target] += 1
    with torch.no_grad():
        measured.update(_record_functional_shapes(graph_module, x))
    run = _Run(measured, fvcore, torch_counts)
    _fx_owners(analysis, run, resolution, graph_module)
    return run


def _run_torch_counter(network: nn.Module, x: torch.Tensor) -> Any:
    """Return FlopCounterMode's counts; where its module tracker fails under no_grad (a
    parameter passed to a module as its input has no gradient function there: timm's attention
    pooling), count again with gradients on (the same ops, but nn.MultiheadAttention then
    takes its unfused path, as under fvcore)."""
    try:
        return peers.run_tool("torch", network, x, threads=None)
    except AssertionError:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            network(x)
        root = type(network).__name__ + "."
        per_module = {
            key[len(root):]: int(sum(counts.values()))
            for key, counts in counter.get_flop_counts().items() if key.startswith(root)
        }
        return peers.ToolResult(int(counter.get_total_flops()), None, per_module)


def _rows_at(analysis: Analysis, resolution: tuple[int, int]) -> list:
    """Return the rows counted at `resolution` (a concrete capture counts each size apart)."""
    if analysis.concrete is None:
        return analysis.layers
    rows = analysis.concrete[tuple(resolution)]
    return [*rows, *analysis.layers[len(rows):]]  # the unused-parameters row, if any


def _fx_owners(analysis: Analysis, run: _Run, resolution: tuple[int, int],
               graph_module: torch.fx.GraphModule) -> None:
    """Fill `run` for the fx graph of the rows at `resolution`: a called module's parameters
    (its first call) and the parameters a node reads directly (get_attr, first read), and each
    module call's name."""
    module_nodes = {n.name for n in graph_module.graph.nodes if n.op == "call_module"}
    nodes = {n.name: n for n in graph_module.graph.nodes}
    parameters = dict(analysis.network.named_parameters())
    owners: set[str] = set()
    read: set[str] = set()
    for layer in _rows_at(analysis, resolution):
        node = nodes.get(layer.node)
        if node is None:
            continue
        count = 0
        if layer.node in module_nodes:
            name = layer.name.split(":")[0]
            run.modules[layer.node] = name
            if name not in owners:
                owners.add(name)
                module = analysis.network.get_submodule(name)
                count += sum(p.numel() for p in module.parameters())
        for source in node.all_input_nodes:
            if source.op == "get_attr" and source.target in parameters and (
                source.target not in read
            ):
                read.add(source.target)
                count += parameters[source.target].numel()
        run.weights[layer.node] = count


def _program_at(analysis: Analysis, *resolution: int) -> Any:
    """Return the exported program the rows at `resolution` (H, W) were counted from."""
    programs = getattr(analysis, "export_programs", None)
    if programs is not None:  # the concrete capture exported at each size
        return programs[tuple(resolution)]
    program = getattr(analysis, "export_program", None)
    if program is None:
        raise ValueError(
            f"{analysis.model} has no graph to verify against (capture {analysis.capture})"
        )
    return program


def _run_exported(program: Any, x: torch.Tensor, expected: Any,
                  network: nn.Module) -> tuple[dict, list[str]]:
    """Run the exported ATen graph on `x` with the network's own tensors (a checkpoint loaded
    into verify's copy included); return each node's output shapes, and a problem when its
    output differs from the network's."""
    from torch.export.graph_signature import InputKind

    own = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    values = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            values.append(x)
        elif spec.target in own:
            values.append(own[spec.target].to(x.device))
        elif spec.target in program.state_dict:
            values.append(program.state_dict[spec.target].to(x.device))
        else:
            values.append(program.constants[spec.target].to(x.device))
    shapes: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            shapes[node.name] = _shape_of(result)
            return result

    with torch.no_grad():
        outputs = Recorder(program.graph_module).run(*values)
    problems = []
    user = [o for o, spec in zip(outputs, program.graph_signature.output_specs, strict=True)
            if spec.kind.name == "USER_OUTPUT"]
    got = user[0] if len(user) == 1 else tuple(user)
    if not _same_output(got, expected):
        problems.append("the exported graph's output differs from the network's")
    return shapes, problems


def _same_output(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same_output(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(b, Mapping) and isinstance(a, (tuple, list)):
        return _same_output(a, list(b.values()))
    return True  # not tensors: nothing to compare


def _exported_owners(analysis: Analysis, program: Any, run: _Run,
                     resolution: tuple[int, int]) -> None:
    """Fill `run` for an exported graph: the network's parameters each ATen op reads first, and,
    for an op inside a leaf module (a Conv2d, a Linear, ...), that module's name."""
    nodes = {n.name: n for n in program.graph.nodes}
    to_parameter = program.graph_signature.inputs_to_parameters
    parameters = dict(analysis.network.named_parameters())
    leaves = {name for name, module in analysis.network.named_modules()
              if name and next(module.children(), None) is None}
    read: set[str] = set()
    for layer in _rows_at(analysis, resolution):
        node = nodes.get(layer.node)
        if node is None:
            continue
        count = 0
        for source in node.all_input_nodes:
            target = to_parameter.get(source.name)
            if target is not None and target not in read:
                read.add(target)
                count += parameters[target].numel() if target in parameters else 0
        run.weights[layer.node] = count
        scope = module_scope(node)
        if scope in leaves and layer.kind != "routing":
            run.modules[layer.node] = scope


def verify(
    model: str | Analysis,
    resolutions: Sequence[tuple[int, ...]] = ((32, 32), (64, 64)),
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
            analyse(model, settings, convention, resolutions=list(resolutions)), resolutions,
            lambda: analyse(model, settings, convention, exact=True,
                            resolutions=list(resolutions)),
        )
    check_forward_fits(analysis, resolutions)  # before anything runs
    device = resolve_device(device) if isinstance(device, str) else device
    analysis = _working_copy(analysis, checkpoint, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using padding='same'")
        checks, totals = _check_resolutions(analysis, resolutions, device)
    return Verification(
        model=analysis.model,
        device=device_description(device),
        resolutions=[resolution_label(*r) for r in resolutions],
        convention=analysis.convention.as_dict(),
        checks=checks,
        checkpoint=str(checkpoint) if checkpoint else None,
        capture=analysis.capture,
        totals=totals,
    )


def _working_copy(analysis: Analysis, checkpoint: str | Path | None,
                  device: torch.device) -> Analysis:
    """Return the analysis to verify: `analysis` itself when its network is used as it is, else
    a copy whose network (and traced graph, sharing its modules) is a copy loaded from
    `checkpoint` and moved to `device`, so the caller's analysis and network stay as they were."""
    network = analysis.network
    first = next(network.parameters(), None)
    if checkpoint is None and (first is None or first.device == device):
        return analysis
    network, graph_module = copy.deepcopy((network, analysis.graph_module))
    if checkpoint is not None:
        load_checkpoint(network, checkpoint)
    return analysis.with_network(network.to(device).eval(), graph_module)


def _check_resolutions(analysis: Analysis, resolutions: Sequence[tuple[int, ...]],
                       device: torch.device) -> tuple[list[LayerCheck], list]:
    """Return (one check per layer and resolution, the totals checks of a non-fx capture)."""
    from convtally.analysis.formatting import resolution_label

    values = analysis.evaluate(resolutions)
    substitution = analysis.substitutions()
    memory = _memory_model(analysis)
    checks = []
    totals = []
    # a bar on a terminal only (tqdm turns itself off when stderr is not one)
    for j, resolution in enumerate(
        tqdm(resolutions, desc="verify", unit="resolution", disable=None, leave=False)
    ):
        resolution = tuple(resolution)
        label = resolution_label(*resolution)
        run = _measure_run(analysis, resolution, device)
        fvcore, torch_counts = run.fvcore.per_module, run.torch.per_module
        saved = measure_saved_bytes(analysis, memory, *resolution) if memory else None
        at = {**dict(zip(analysis.axes, resolution, strict=True)), BATCH: 1, **substitution}
        rows = _rows_at(analysis, resolution)
        # fvcore and FlopCounterMode report a module called twice as the sum of its calls
        module_totals: dict[str, int] = defaultdict(int)
        module_calls: dict[str, int] = defaultdict(int)
        for row in rows:
            # an fx row in run.modules is one module call; an exported module's call is its
            # conv or linear op (a padded conv also pads; a LayerNorm2d also permutes)
            if row.node in run.modules and (not run.exported or row.kind in MUST_MATCH_FVCORE):
                name = run.modules[row.node]
                module_totals[name] += int(sp.sympify(row.cost.connections).subs(at))
                module_calls[name] += 1
        for index, (layer, row) in enumerate(zip(analysis.layers, rows, strict=True)):
            shapes = run.shapes.get(row.node)
            shape_measured = list(shapes[0][1:]) if shapes else []
            # at B=1 a row's outputs are all its values, wherever its batch dimension is
            outputs_measured = sum(int(torch.Size(s).numel()) for s in shapes or [])
            module_name = run.modules.get(row.node)
            weights_measured = run.weights.get(row.node, 0)
            raw_weights = int(sp.sympify(row.cost.weights).subs(at))
            raw_connections = int(sp.sympify(row.cost.connections).subs(at))
            if module_name is not None and module_calls[module_name] > 1:
                raw_connections = module_totals[module_name]
            shape_formula = [int(sp.sympify(d).subs(at)) for d in row.output_shape]
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
            elif layer.kind in MUST_MATCH_FVCORE and module_name is None and layer.known:
                check.note = "not inside one conv or linear module: checked in the totals"
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
        if analysis.capture != "fx":
            totals.extend(_total_checks(analysis, resolution, label, run))
    return checks, totals



def _total_checks(analysis: Analysis, resolution: tuple[int, int], label: str,
                  run: _Run) -> list[TotalCheck]:
    """Return our totals under the fvcore and torch presets against the tools' own totals.

    An exported or concrete capture has rows (ATen ops, functions) that are not one module's
    call, so the per-module checks cannot reach them all: the totals must match instead."""
    from convtally.analysis.conventions import preset

    checks = []
    for tool, result in (("fvcore", run.fvcore), ("torch", run.torch)):
        ours = analysis.with_convention(preset(tool)).totals_at([resolution])["connections"][0]
        check = TotalCheck(tool=tool, resolution=label, ours=int(ours), tool_total=result.total)
        if ours != result.total:
            if analysis.complete:
                check.problems.append(
                    f"total under the {tool} preset {ours} != {tool} {result.total}"
                )
            else:
                unknown = ", ".join(layer.name for layer in analysis.unknown_layers[:3])
                check.note = f"not compared: rows without a rule ({unknown}) count 0"
        checks.append(check)
    for problem in run.problems:
        checks.append(TotalCheck(tool="graph", resolution=label, ours=0, tool_total=0,
                                 problems=[problem]))
    return checks


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
    _, autograd = measure_saved(network, x, per_node=True, graph=analysis.graph_module)
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
    blank = dict.fromkeys(rows[0] if rows else (), "")
    rows += [
        {
            **blank,
            "layer": f"total under the {t.tool} preset" if t.tool != "graph" else "exported graph",
            "type": "total",
            "res": t.resolution,
            "connections": t.ours if t.tool != "graph" else "",
            "fvcore": t.tool_total if t.tool == "fvcore" else "",
            "torch (2/MAC)": t.tool_total if t.tool == "torch" else "",
            "verdict": t.verdict + (f" [{t.note}]" if t.note and fmt == "csv" else ""),
        }
        for t in result.totals
    ]
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        return frame.to_csv(index=False)
    from tabulate import tabulate

    notes = sorted({f"{c.kind}: {c.note}" for c in result.checks if c.note})
    notes += sorted({f"totals: {t.note}" for t in result.totals if t.note})
    header = [
        f"model: {result.model}  device: {result.device}"
        + (f"  checkpoint: {result.checkpoint}" if result.checkpoint else ""),
        *CAPTURE_HEADER.get(result.capture, []),
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
