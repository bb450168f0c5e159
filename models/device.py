"""Choosing the torch device the same way for every command."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Return the device for `name`: 'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name} asked for, but no CUDA GPU is available; use cpu or auto"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def device_description(device: torch.device) -> str:
    """Return a human-readable name for `device`, e.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'cpu'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
