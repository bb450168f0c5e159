"""Run-folder helpers shared by the trainers: metrics, checkpoints, resume state and curves.

A run folder holds `metrics.json`, `checkpoint.pt` (the model's state_dict only),
`training_state.pt` (optimizer, epoch and RNG, for --resume) and plots. Every file is
written atomically, and every .pt file loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from analysis.io import atomic_save_figure, atomic_torch_save, atomic_write_json

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_STATE_FILE = "training_state.pt"
CURVES_FILE = "curves.png"


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


def check_finite_loss(loss: float, epoch: int, step: int, lr: float) -> None:
    """Raise NonFiniteLossError with a one-line message when `loss` is NaN or infinite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss became {loss} at epoch {epoch}, batch {step}; training stopped "
            f"(lr {lr:g} may be too high: try a smaller --lr)"
        )


def utc_timestamp() -> str:
    """Return the current UTC time as ISO-8601 text, e.g. '2024-05-01T12:00:00Z'."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def software_versions() -> dict[str, str]:
    """Return the python, torch and convtally versions."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        convtally = version("convtally")
    except PackageNotFoundError:
        convtally = "unknown (not installed)"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "convtally": convtally}


def write_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics` to run_dir/metrics.json atomically; return the path."""
    return atomic_write_json(Path(run_dir) / METRICS_FILE, dict(metrics))


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the metrics.json of a run folder (FileNotFoundError naming it when absent)."""
    import json

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the run folder has no metrics to resume")
    return json.loads(path.read_text(encoding="utf-8"))


def save_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module) -> Path:
    """Save the model's state_dict (on the CPU) to run_dir/checkpoint.pt; return the path."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return atomic_torch_save(state, Path(run_dir) / CHECKPOINT_FILE)


def load_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module) -> torch.nn.Module:
    """Load run_dir/checkpoint.pt (weights only) into `model`; return the model."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; cannot resume without the model weights")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def rng_state() -> dict[str, Any]:
    """Return the torch CPU (and CUDA, when present) random generator states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_training_state(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer,
                        epoch: int, settings: Mapping[str, Any]) -> Path:
    """Save what --resume needs (optimizer state, last finished epoch, RNG, settings)."""
    state = {"optimizer": optimizer.state_dict(), "epoch": int(epoch), "rng": rng_state(),
             "settings": dict(settings)}
    return atomic_torch_save(state, Path(run_dir) / TRAINING_STATE_FILE)


def load_training_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the saved training state of a run folder (weights only, loaded on the CPU)."""
    path = Path(run_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; nothing to --resume (run without --resume)")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resume_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                          ignore: Sequence[str] = ("epochs",)) -> None:
    """Raise ValueError naming the first setting that differs between a saved run and now."""
    for key, value in current.items():
        if key in ignore or key not in saved:
            continue
        if saved[key] != value:
            raise ValueError(f"--resume: setting {key} is {value!r} but the saved run used "
                             f"{saved[key]!r}; use the same settings or a new --out")


def plot_curves(epochs: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str,
                loss_keys: Sequence[str] = ("train_loss", "val_loss"),
                metric_key: str = "val_accuracy", metric_label: str = "val accuracy") -> Path:
    """Plot losses (left) and a validation metric (right) per epoch to `path`; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    numbers = [row["epoch"] for row in epochs]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in loss_keys:
        loss_axis.plot(numbers, [row[key] for row in epochs], marker="o", markersize=3,
                       label=key.replace("_", " "))
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    metric_axis.plot(numbers, [row[metric_key] for row in epochs], marker="o", markersize=3,
                     color="tab:green")
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel(metric_label)
    metric_axis.grid(alpha=0.3)
    for axis in (loss_axis, metric_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_and_close(figure, path)


def save_and_close(figure, path: str | os.PathLike) -> Path:
    """Save a pyplot figure atomically at 100 dpi, close it, and return `path`."""
    import matplotlib.pyplot as plt

    try:
        return atomic_save_figure(figure, path, dpi=100)
    finally:
        plt.close(figure)


def final_summary(epochs: Sequence[Mapping[str, float]],
                  keys: Sequence[str] = ("train_loss", "val_loss", "val_accuracy")
                  ) -> dict[str, float]:
    """Return the last epoch's `keys` and the summed seconds of all epochs."""
    last = epochs[-1]
    summary = {key: last[key] for key in keys}
    summary["total_seconds"] = round(sum(row["seconds"] for row in epochs), 3)
    return summary
