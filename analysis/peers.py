"""The peer tools, run one way: each FLOP counter's total, parameters and per-module counts.

One runner per tool (fvcore, ptflops, thop, torchinfo, PyTorch's FlopCounterMode), shared by
`verify`, `crosscheck`, the benchmarks and the tests, so each tool is set up and its module
names are read in one place. The tools are the presets of analysis.conventions, less the
default: adding a preset with a runner here adds a witness everywhere.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from convtally.analysis.conventions import PRESETS
from torch import nn

TOOLS = tuple(name for name in PRESETS if name != "default")


@dataclass
class ToolResult:
    """What one tool reported for one input: its headline number, parameters, per-module counts.

    `per_module` maps a submodule's qualified name (as `named_modules()` writes it, the root
    left out) to the tool's count for every call of it, children included.
    """

    total: int
    parameters: int | None
    per_module: dict[str, int] | None


@contextlib.contextmanager
def quiet(threads: int | None = 1) -> Iterator[None]:
    """Silence the tools' printing and warnings; run on `threads` torch threads (None: as is)."""
    # thop prints [INFO] lines, ptflops tables, fvcore warns while tracing; counts do not
    # depend on threads, and batch-1 passes run fastest on one thread where cores are shared.
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(before)


def fvcore_counter(network: nn.Module, x: torch.Tensor):
    """Return fvcore's FlopCountAnalysis(network, x), its warnings about ops and modules off.

    Nothing is counted until it is asked (`.total()`, `.by_module()`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import scripts a function with torch.jit
        from fvcore.nn import FlopCountAnalysis

    counter = FlopCountAnalysis(network, x)
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    return counter


@contextlib.contextmanager
def _unfused_attention():
    """Run nn.MultiheadAttention's unfused path, as it runs with gradients on: under no_grad its
    fast path is one fused op that fvcore skips (aten::_native_multi_head_attention), and
    fvcore's total of torchvision's ViT-B/16 at 224 read 11,290,036,992 instead of the
    16,867,412,736 it counts called the usual way (verify runs it under no_grad)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def run_fvcore(network: nn.Module, x: torch.Tensor) -> ToolResult:
    """Return fvcore's FlopCountAnalysis(network, x).total(), parameter_count and by_module, as
    fvcore counts called the usual way whatever the grad mode (unfused attention)."""
    from fvcore.nn import parameter_count

    with _unfused_attention():
        counter = fvcore_counter(network, x)
        total = int(counter.total())
        per_module = {k: int(v) for k, v in counter.by_module().items() if k}
    return ToolResult(total, int(parameter_count(network)[""]), per_module)


def run_ptflops(network: nn.Module, x: torch.Tensor) -> ToolResult:
    """Return ptflops' get_model_complexity_info (pytorch backend) MACs and parameters.

    ptflops adds the F.* and tensor-method calls it patches to its total outside any module
    (nn.ReLU is counted by its module hook and again as F.relu); here each such call is put
    on the innermost module that made it, so the per-module counts add up to the total.
    """
    from ptflops import get_model_complexity_info, pytorch_engine

    names = {module: name for name, module in network.named_modules()}
    per_module: dict[str, int] = defaultdict(int)
    hooked: dict[str, int] = {}
    running: list[str] = [""]

    class Attributing(list):
        """ptflops' collector of patched calls, also counting each call for its module."""

        def __init__(self, collector: list) -> None:
            super().__init__()
            self.collector = collector

        def append(self, flops) -> None:
            self.collector.append(flops)
            per_module[running[-1]] += int(flops)

    def enter(module, inputs) -> None:
        running.append(names[module])

    def leave(module, inputs, output) -> None:
        running.pop()
        if module is network:  # the root's hook runs after every child's
            hooked.update(
                {names[m]: int(m.__flops__) for m in network.modules() if hasattr(m, "__flops__")}
            )

    handles = [m.register_forward_pre_hook(enter) for m in network.modules()]
    handles += [m.register_forward_hook(leave) for m in network.modules()]
    patches = {
        "patch_functional": pytorch_engine.patch_functional,
        "patch_tensor_ops": pytorch_engine.patch_tensor_ops,
    }
    for attribute, patch in patches.items():
        setattr(pytorch_engine, attribute,
                lambda collector, patch=patch: patch(Attributing(collector)))
    try:
        macs, params = get_model_complexity_info(
            network,
            tuple(x.shape[1:]),
            as_strings=False,
            print_per_layer_stat=False,
            ost=io.StringIO(),
        )
    finally:
        for attribute, patch in patches.items():
            setattr(pytorch_engine, attribute, patch)
        for handle in handles:
            handle.remove()
    if macs is None:
        raise RuntimeError("ptflops failed on this network (it printed the traceback)")
    for name, flops in hooked.items():
        per_module[name] += flops
    per_module.pop("", None)
    return ToolResult(int(macs), int(params), dict(per_module))


def run_thop(network: nn.Module, x: torch.Tensor) -> ToolResult:
    """Return thop's profile(network, inputs=(x,)) operations and parameters."""
    from thop import profile

    ops, params, layers = profile(network, inputs=(x,), ret_layer_info=True)
    per_module: dict[str, int] = {}

    def flatten(info: Mapping, prefix: str) -> None:
        for name, (module_ops, _, children) in info.items():
            per_module[prefix + name] = int(module_ops)
            flatten(children, prefix + name + ".")

    flatten(layers, "")
    return ToolResult(int(ops), int(params), per_module)


def run_torchinfo(network: nn.Module, x: torch.Tensor) -> ToolResult:
    """Return torchinfo's summary(network, input_size=x.shape).total_mult_adds and parameters."""
    from torchinfo import summary

    statistics = summary(network, input_size=tuple(x.shape), verbose=0, device=x.device)
    per_module: dict[str, int] = defaultdict(int)
    for info in statistics.summary_list:
        if info.is_leaf_layer:
            parts, node = [], info
            while node is not None and node.depth > 0:
                parts.append(node.var_name)
                node = node.parent_info
            per_module[".".join(reversed(parts))] += int(info.macs)
    return ToolResult(
        int(statistics.total_mult_adds), int(statistics.total_params), dict(per_module)
    )


def run_torch(network: nn.Module, x: torch.Tensor) -> ToolResult:
    """Return FlopCounterMode's total FLOPs and per-module FLOPs (it reports no parameters)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(x)
    root = type(network).__name__ + "."  # its keys are the module names under the class name
    per_module = {
        key[len(root) :]: int(sum(counts.values()))
        for key, counts in counter.get_flop_counts().items()
        if key.startswith(root)
    }
    return ToolResult(int(counter.get_total_flops()), None, per_module)


RUNNERS: dict[str, Callable[[nn.Module, torch.Tensor], ToolResult]] = {
    "fvcore": run_fvcore,
    "ptflops": run_ptflops,
    "thop": run_thop,
    "torchinfo": run_torchinfo,
    "torch": run_torch,
}
assert set(RUNNERS) == set(TOOLS), "every preset but the default needs a runner"


def tool_package(tool: str) -> str:
    """Return 'package version' of a tool (the package has its name), or raise ImportError."""
    if importlib.util.find_spec(tool) is None:
        raise ImportError(tool)
    try:
        return f"{tool} {importlib.metadata.version(tool)}"
    except importlib.metadata.PackageNotFoundError:
        return tool


def run_tool(tool: str, network: nn.Module, x: torch.Tensor, threads: int | None = 1) -> ToolResult:
    """Return what `tool` reports for `network` on input `x`, quietly, on `threads` threads."""
    if tool not in RUNNERS:
        raise ValueError(f"unknown tool {tool!r}; use one of {', '.join(TOOLS)}")
    with quiet(threads):
        return RUNNERS[tool](network, x)
