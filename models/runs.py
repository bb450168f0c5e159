"""Run-folder helpers shared by the trainers: metrics, checkpoints, resume state, lock, curves.

A run folder holds `metrics.json`, `checkpoint.pt` (the model's state_dict only),
`training_state.pt` (everything --resume needs, in one file) and plots. Every file is
written atomically, and every .pt file loads with `torch.load(..., weights_only=True)`.

A resume reads `training_state.pt` alone: trained weights, optimizer, RNG states, the last
finished epoch, the history and the settings are written together by one atomic rename, so
a kill between any two writes leaves either the previous epoch's state or the new one, never
a mixture. The other files are derived from it and rewritten on resume. While a run writes
its folder it holds an exclusive `flock` on `.run.lock` there; the kernel drops the lock when
the process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import platform
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from convtally.analysis.io import atomic_save_figure, atomic_torch_save, atomic_write_json

METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_STATE_FILE = "training_state.pt"
CURVES_FILE = "curves.png"
LOCK_FILE = ".run.lock"
STATE_FORMAT = 2  # 1 (no "format" key): optimizer, epoch, RNG only, weights in checkpoint.pt


class RunFolderBusyError(ValueError):
    """Another live process holds the run folder's lock."""


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
    """Return the python, torch, CUDA (as torch was built), cuDNN and convtally versions.

    `cuda` and `cudnn` are "none" for a CPU-only torch build.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        convtally = version("convtally")
    except PackageNotFoundError:
        convtally = "unknown (not installed)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "cudnn": str(cudnn) if cudnn else "none",
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


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return (on the CPU) what training can change: the parameters that need grad, all buffers."""
    frozen = {name for name, parameter in model.named_parameters()
              if not parameter.requires_grad}
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()
            if name not in frozen}


def load_trained_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a `trained_state` into `model`; raise ValueError if it does not fit the model."""
    frozen = {name for name, parameter in model.named_parameters()
              if not parameter.requires_grad}
    result = model.load_state_dict(dict(state), strict=False)
    unfitting = [*result.unexpected_keys,
                 *(name for name in result.missing_keys if name not in frozen)]
    if unfitting:
        raise ValueError(f"--resume: the saved weights do not fit this model ({unfitting[0]}); "
                         "use the same settings or a new --out")


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                   settings: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                   **extra: Any) -> dict[str, Any]:
    """Return everything a resume after `epoch` needs, as one weights_only-loadable dict."""
    return {"format": STATE_FORMAT, "epoch": int(epoch), "model": trained_state(model),
            "optimizer": optimizer.state_dict(), "rng": rng_state(),
            "settings": dict(settings), "history": [dict(row) for row in history], **extra}


def save_training_state(run_dir: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write a `training_state` dict to run_dir/training_state.pt in one atomic rename."""
    return atomic_torch_save(dict(state), Path(run_dir) / TRAINING_STATE_FILE)


def load_training_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the saved training state of a run folder (weights only, loaded on the CPU).

    Raises FileNotFoundError when there is none and ValueError for the old two-file format,
    whose weights in checkpoint.pt may belong to a later epoch than its optimizer state.
    """
    path = Path(run_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; nothing to --resume (run without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file gets the same one line
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--resume: cannot read {path} ({first_line}); "
                         "run without --resume to start again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume: {path} is from an older convtally whose checkpoint.pt may "
                         "belong to a later epoch; run without --resume to start again")
    return state


def restore_training_state(state: Mapping[str, Any], model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """Put a saved state's weights, optimizer state and RNG states back in place."""
    load_trained_state(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])


def remove_training_state(run_dir: str | os.PathLike) -> None:
    """Delete run_dir/training_state.pt, so that a fresh run cannot resume an older one."""
    (Path(run_dir) / TRAINING_STATE_FILE).unlink(missing_ok=True)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the half-written `.NAME.*.tmp` files a killed atomic write left; return them."""
    stale = sorted(Path(run_dir).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def run_folder_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `run_dir` (created if needed) for the `with` block.

    Raises RunFolderBusyError when a live process holds it; a lock left by a dead process
    is free, because the kernel releases a flock when its holder exits.
    """
    run_dir = Path(run_dir)
    descriptor = _acquire_lock(run_dir / LOCK_FILE)
    try:
        yield run_dir
    finally:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(descriptor)  # unlink first: whoever locks next makes a fresh file


def _acquire_lock(path: Path) -> int:
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise ValueError(f"cannot use {path.parent} as a run folder ({error.strerror}); "
                             "choose another --out") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise RunFolderBusyError(f"{path.parent} is in use by another run{holder}; wait "
                                     "for it to finish or choose another --out") from None
        if _same_file(descriptor, path):
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            return descriptor
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _lock_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return f" (process {text})" if text.isdigit() else ""


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
    percent = "accuracy" in metric_key  # accuracies are read in %, as every other output
    metric_axis.plot(numbers, [row[metric_key] * (100 if percent else 1) for row in epochs],
                     marker="o", markersize=3, color="tab:green")
    metric_axis.set_xlabel("epoch")
    metric_axis.set_ylabel(f"{metric_label} (%)" if percent else metric_label)
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
