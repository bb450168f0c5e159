"""Limits checked before work: a network or a forward pass that cannot fit is refused up front.

Without these checks `table poolupsample --set NF=100000000` allocated 12.9 GB before failing
with a traceback, and `verify --res 100000` asked for 120 GB. The memory available is read
from the machine (MemAvailable, and the cgroup limit when there is one), or set with the
environment variable CONVTALLY_MEMORY_LIMIT (e.g. `512MiB`, `8GB`), for shared machines.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

MEMORY_LIMIT_VARIABLE = "CONVTALLY_MEMORY_LIMIT"
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


class MemoryLimitError(ValueError):
    """The work would need more memory than is available (one line, exit 2)."""


def parse_bytes(text: str) -> int:
    """Return the byte count of '24GiB', '512MB', '1e9' or '4096'; ValueError when malformed."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[0-9]{1,2})?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or len(text) > 40:
        raise ValueError(
            f"bad memory size {text[:40]!r}: use a number with an optional unit, e.g. 512MiB, "
            "24GiB or 8GB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(count: int | float) -> str:
    """Return a byte count for people: '1.5 GiB', '512.0 MiB', '120 bytes'."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                       ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{int(count)} bytes"


def available_memory() -> int:
    """Return the bytes this process may still allocate: the override, or what the OS reports."""
    override = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if override:
        try:
            return parse_bytes(override)
        except ValueError as error:
            raise ValueError(f"{MEMORY_LIMIT_VARIABLE}: {error}") from None
    candidates = [_meminfo_available(), _cgroup_available()]
    known = [c for c in candidates if c is not None]
    if not known:
        return 2**62  # no way to tell (not Linux): no limit
    return min(known)


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max" or not limit.isdigit() or not usage.isdigit():
        return None
    return max(int(limit) - int(usage), 0)


def check_fits(needed: int, what: str, remedy: str) -> None:
    """Raise MemoryLimitError naming `what`, the estimate and the limit when `needed` is too big."""
    limit = available_memory()
    if needed > limit:
        raise MemoryLimitError(
            f"{what} needs about {format_bytes(needed)}, more than the {format_bytes(limit)} of "
            f"memory available (set {MEMORY_LIMIT_VARIABLE} to change the limit); {remedy}"
        )


def meta_parameter_bytes(factory: Callable[[], object]) -> int | None:
    """Return the bytes of the parameters and buffers `factory()` builds, built on the meta
    device (no memory, no initialisation); None when the factory cannot build there."""
    import torch

    try:
        with torch.device("meta"):
            network = factory()
        tensors = [*network.parameters(), *network.buffers()]
    except Exception:  # a factory that computes with tensors while building; checked by running
        return None
    return sum(t.numel() * t.element_size() for t in tensors)


def check_forward_fits(analysis, resolutions, bytes_per_value: int = 4) -> None:
    """Raise MemoryLimitError when a forward pass at one of `resolutions` cannot fit: the
    estimate is the input plus every layer's output, all kept, as float32 (an upper bound)."""
    import numpy as np

    outputs = analysis.evaluate(resolutions)["outputs"]
    for column, resolution in enumerate(resolutions):
        channels = int(analysis.input_channels.subs(analysis.substitutions()))
        values = channels * math.prod(resolution) + int(np.sum(outputs[:, column]))
        check_fits(
            values * bytes_per_value,
            f"a forward pass of {analysis.model} at {'x'.join(map(str, resolution))} (input "
            "and every layer's output as float32)",
            "choose a smaller --res",
        )
