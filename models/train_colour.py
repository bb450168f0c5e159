"""Colourization training (write-up Parts A.2, B.2, B.5, C.2) and the batch-size sweep.

Grayscale CIFAR-10 images (one category, default horse) go in; for every pixel the network
predicts one of NC colour classes (k-means centroids of the training pixels in RGB), trained
with per-pixel cross-entropy and Adam. The same code runs on the CPU and on a GPU: the whole
dataset lives on the device and batches are gathered there with device index tensors.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from convtally.analysis.io import atomic_write_text
from convtally.models import cifar, runs
from convtally.models.device import device_description, resolve_device
from convtally.models.registry import REGISTRY
from torch import nn
from tqdm import tqdm

MODEL_NAMES = ("poolupsample", "convtranspose", "unet")
NUM_IN_CHANNELS = 1  # training input is grayscale (the analysis tables use NIC=3)
SAMPLES_FILE = "samples.png"
SWEEP_BATCH_SIZES = (32, 64, 128, 256, 512)
TASK = "colour"


@dataclass(frozen=True)
class ColourConfig:
    """Settings of one colourization run (defaults: the write-up's)."""

    model: str = "convtranspose"
    epochs: int = 25
    batch_size: int = 100
    lr: float = 0.001
    kernel: int = 3
    filters: int = 32
    num_colours: int = 24
    seed: int = 0
    category: int | None = 7  # None: every class
    data_dir: str | None = None  # None: the download cache
    cache_dir: str | None = None  # None: cifar.default_cache_dir()
    device: str = "auto"
    out: str | None = None  # None: runs/<model>
    resume: bool = False
    progress: bool = True
    num_samples: int = 8

    def settings(self) -> dict[str, Any]:
        """Return the settings recorded in metrics.json (and checked on --resume)."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "kernel": self.kernel, "filters": self.filters,
                "num_colours": self.num_colours, "num_in_channels": NUM_IN_CHANNELS,
                "seed": self.seed, "category": "all" if self.category is None else self.category}

    def run_dir(self) -> Path:
        """Return the run folder: `out`, or runs/<model>."""
        return Path(self.out) if self.out else Path("runs") / self.model


def build_model(config: ColourConfig) -> nn.Module:
    """Return the registry network of `config` built for grayscale input."""
    return REGISTRY[config.model].build({"K": config.kernel, "NIC": NUM_IN_CHANNELS,
                                         "NF": config.filters, "NC": config.num_colours})


def validate_config(config: ColourConfig) -> None:
    """Raise ValueError with a one-line message for the first bad setting in `config`."""
    if config.model not in MODEL_NAMES:
        raise ValueError(f"unknown colourization model {config.model!r}; "
                         f"use one of {', '.join(MODEL_NAMES)}")
    positive = {"--epochs": config.epochs, "--batch-size": config.batch_size,
                "--kernel": config.kernel, "--filters": config.filters}
    for flag, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value} must be a positive integer")
    if not 2 <= config.num_colours <= 256:
        raise ValueError(f"--colours {config.num_colours} must lie in 2..256")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr {config.lr} must be a positive finite number")
    if config.seed < 0:
        raise ValueError(f"--seed {config.seed} must be non-negative")
    if config.category is not None and not 0 <= config.category < len(cifar.CLASS_NAMES):
        raise ValueError(f"--category {config.category} must be 0-9 or 'all'")
    try:
        with torch.no_grad():
            output = build_model(config).eval()(torch.zeros(1, NUM_IN_CHANNELS, 32, 32))
    except RuntimeError as error:
        raise ValueError(f"--kernel {config.kernel}: {config.model} cannot run on 32x32 input "
                         f"({str(error).splitlines()[0]}); use an odd kernel") from None
    shape = tuple(output.shape)
    if shape != (1, config.num_colours, 32, 32):
        raise ValueError(f"--kernel {config.kernel} makes {config.model} output {shape} for "
                         f"32x32 input, not (1, {config.num_colours}, 32, 32); use an odd kernel")


@dataclass(frozen=True)
class ColourData:
    """Grayscale inputs and colour-class targets on the training device, plus what made them."""

    train_gray: torch.Tensor  # N x 1 x 32 x 32 float
    train_labels: torch.Tensor  # N x 32 x 32 uint8 colour classes
    val_gray: torch.Tensor
    val_labels: torch.Tensor
    val_rgb: torch.Tensor  # N x 3 x 32 x 32 float on the CPU, for the sample figure
    centroids: torch.Tensor  # NC x 3 RGB on the CPU
    info: dict[str, Any]


def prepare_colour_data(config: ColourConfig, device: torch.device) -> ColourData:
    """Return the category's grayscale inputs and k-means colour labels, moved to `device`."""
    data = cifar.load_cifar(config.data_dir, config.category, config.cache_dir)
    train_rgb = cifar.to_unit_range(data.train.images)
    val_rgb = cifar.to_unit_range(data.test.images)
    cache_path = cifar.centroid_cache_path(
        config.cache_dir, config.num_colours, config.seed, config.category,
        cifar.data_fingerprint(data.train.images),
    )
    centroids = cifar.colour_centroids(train_rgb, config.num_colours, config.seed, cache_path)
    info = {
        "source": data.source,
        "description": data.description,
        "train_images": len(data.train),
        "val_images": len(data.test),
        "validation": "test_batch images of the category",
        "colours": {"method": "k-means++ then Lloyd, RGB, seeded",
                    "fit_pixels": min(len(data.train) * 32 * 32, cifar.KMEANS_MAX_PIXELS),
                    "cache": str(cache_path)},
    }

    def on_device(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = cifar.colour_labels(rgb, centroids).to(torch.uint8)
        return cifar.to_grayscale(rgb).to(device), labels.to(device)

    train_gray, train_labels = on_device(train_rgb)
    val_gray, val_labels = on_device(val_rgb)
    return ColourData(train_gray, train_labels, val_gray, val_labels, val_rgb, centroids, info)


def epoch_generator(device: torch.device, seed: int, epoch: int) -> torch.Generator:
    """Return the generator that shuffles `epoch`: seeded from (seed, epoch), so resume matches."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, gray: torch.Tensor,
                labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                description: str = "", progress: bool = False) -> torch.Tensor:
    """Run one shuffled epoch; return the per-batch mean losses (a device tensor).

    Losses stay on the device (no per-batch host sync); the caller checks them once.
    """
    model.train()
    order = torch.randperm(len(gray), generator=generator, device=gray.device)
    batches = list(torch.split(order, batch_size))
    losses = torch.empty(len(batches), device=gray.device)
    for step, index in enumerate(tqdm(batches, desc=description, leave=False, file=sys.stderr,
                                      disable=not progress, unit="batch")):
        logits = model(gray.index_select(0, index))
        loss = F.cross_entropy(logits, labels.index_select(0, index).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
    return losses


def epoch_mean_loss(batch_losses: torch.Tensor, count: int, batch_size: int, epoch: int,
                    lr: float) -> float:
    """Return the per-pixel mean of an epoch's batch losses; raise if any is NaN or infinite."""
    values = batch_losses.cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        step = int(bad[0, 0])
        runs.check_finite_loss(float(values[step]), epoch, step + 1, lr)
    sizes = torch.full((len(values),), float(batch_size))
    sizes[-1] = count - batch_size * (len(values) - 1)
    return float((values * sizes).sum() / count)


def warm_up(model: nn.Module, data: ColourData, batch_size: int, lr: float) -> float:
    """Run training steps and validation batches of every batch shape on a copy; return seconds.

    A GPU's first steps load kernels and choose convolution algorithms for each input shape;
    doing that here keeps it out of the epoch times. The copy (its own Adam) leaves the model,
    the optimizer and every random generator as they were, so results are unchanged.
    """
    start = time.perf_counter()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.Adam(twin.parameters(), lr=lr)
    twin.train()
    for count in batch_shapes(len(data.train_gray), batch_size):
        loss = F.cross_entropy(twin(data.train_gray[:count]), data.train_labels[:count].long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    twin.eval()
    with torch.no_grad():
        for count in batch_shapes(len(data.val_gray), batch_size):
            twin(data.val_gray[:count])
    if data.train_gray.device.type == "cuda":
        torch.cuda.synchronize(data.train_gray.device)
    return time.perf_counter() - start


def batch_shapes(count: int, batch_size: int) -> list[int]:
    """Return the distinct batch sizes an epoch over `count` items uses: full and last."""
    sizes = [min(batch_size, count)]
    if count > batch_size and count % batch_size:
        sizes.append(count % batch_size)
    return sizes


@torch.no_grad()
def evaluate(model: nn.Module, gray: torch.Tensor, labels: torch.Tensor,
             batch_size: int) -> tuple[float, float]:
    """Return (mean per-pixel cross-entropy, per-pixel accuracy as a fraction) in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=gray.device)
    correct = torch.zeros((), device=gray.device, dtype=torch.int64)
    for start in range(0, len(gray), batch_size):
        logits = model(gray[start:start + batch_size])
        target = labels[start:start + batch_size].long()
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    pixels = labels.numel()
    return float(loss_sum) / pixels, int(correct) / pixels


@torch.no_grad()
def predict_labels(model: nn.Module, gray: torch.Tensor) -> torch.Tensor:
    """Return the predicted colour class (N x H x W) of each pixel of N x 1 x H x W inputs."""
    model.eval()
    return model(gray).argmax(dim=1)


def plot_samples(gray: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor,
                 centroids: torch.Tensor, path: Path, title: str) -> Path:
    """Save a grid (rows: grayscale input, prediction, truth in the NC colours); return `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = centroids.cpu()
    rows = [("input (gray)", gray.cpu()[:, 0]),
            ("prediction", palette[predicted.cpu().long()]),
            (f"truth ({len(palette)} colours)", palette[truth.cpu().long()])]
    count = len(gray)
    figure, axes = plt.subplots(3, count, figsize=(1.3 * count + 1.2, 4.3), squeeze=False)
    for row, (label, images) in enumerate(rows):
        for column in range(count):
            axis = axes[row, column]
            if row == 0:
                axis.imshow(images[column].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                axis.imshow(images[column].clamp(0, 1).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return runs.save_and_close(figure, path)


EPOCH_TIMING = ("an epoch's seconds: its shuffled training steps and the validation pass, "
                "with the GPU synchronised at the end; not the saves after it. Before the first "
                "epoch a warm-up (warmup_seconds) runs each batch shape once on a copy of the "
                "network, so kernel loading and algorithm choice stay out of the epochs")


def build_metrics(config: ColourConfig, info: dict[str, Any], device: torch.device,
                  history: list[dict[str, float]], started_at: str,
                  finished_at: str | None, warmup_seconds: float | None = None
                  ) -> dict[str, Any]:
    """Return the metrics.json dict of a (possibly unfinished) run."""
    return {
        "task": TASK,
        "model": config.model,
        "settings": config.settings(),
        "data": info,
        "device": device_description(device),
        "epochs": history,
        "final": runs.final_summary(history) if history else None,
        "software": runs.software_versions(),
        "timing": {"epoch_seconds": EPOCH_TIMING,
                   "warmup_seconds": None if warmup_seconds is None else round(warmup_seconds, 3)},
        "started_at": started_at,
        "finished_at": finished_at,
        "status": "complete" if finished_at else "running",
    }


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """Return the one-line summary printed after an epoch."""
    return (f"Epoch [{row['epoch']}/{epochs}], train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val acc {100 * row['val_accuracy']:.1f}%, "
            f"time {row['seconds']:.1f} s")


def train_colourization(config: ColourConfig, log=print) -> dict[str, Any]:
    """Train one colourization network, writing its run folder; return the metrics dict.

    The run holds the folder's lock throughout (runs.RunFolderBusyError if another live run
    does). Raises runs.NonFiniteLossError when the loss becomes NaN or infinite.
    """
    validate_config(config)
    device = resolve_device(config.device)
    data = prepare_colour_data(config, device)
    with runs.run_folder_lock(config.run_dir()) as run_dir:
        runs.remove_stale_temporaries(run_dir)
        return _train_in_folder(config, data, device, run_dir, log)


def _train_in_folder(config: ColourConfig, data: ColourData, device: torch.device,
                     run_dir: Path, log) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history: list[dict[str, float]] = []
    started_at = runs.utc_timestamp()
    first_epoch = 1
    if config.resume:
        first_epoch, history, started_at = _resume(run_dir, config, model, optimizer)
        log(f"resuming {run_dir} after epoch {first_epoch - 1}")
        publish_epoch(run_dir, model, build_metrics(config, data.info, device, history,
                                                    started_at, None))
    else:
        runs.remove_training_state(run_dir)

    warmup_seconds = warm_up(model, data, config.batch_size, config.lr)
    for epoch in range(first_epoch, config.epochs + 1):
        start = time.perf_counter()
        batch_losses = train_epoch(
            model, optimizer, data.train_gray, data.train_labels, config.batch_size,
            epoch_generator(device, config.seed, epoch),
            description=f"{config.model} epoch {epoch}/{config.epochs}", progress=config.progress,
        )
        train_loss = epoch_mean_loss(batch_losses, len(data.train_gray), config.batch_size,
                                     epoch, config.lr)
        val_loss, val_accuracy = evaluate(model, data.val_gray, data.val_labels,
                                          config.batch_size)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
               "val_accuracy": round(val_accuracy, 6),
               "seconds": round(time.perf_counter() - start, 3)}
        history.append(row)
        runs.save_training_state(run_dir, runs.training_state(
            model, optimizer, epoch, config.settings(), history, task=TASK,
            network=config.model, started_at=started_at))
        publish_epoch(run_dir, model, build_metrics(config, data.info, device, history,
                                                    started_at, None, warmup_seconds))
        log(epoch_line(row, config.epochs))  # after the save: a printed epoch survives a kill

    metrics = build_metrics(config, data.info, device, history, started_at, runs.utc_timestamp(),
                            warmup_seconds)
    title = (f"{config.model}, {metrics['data']['train_images']} train / "
             f"{metrics['data']['val_images']} val images, {metrics['device']}")
    runs.plot_curves(history, run_dir / runs.CURVES_FILE, title)
    shown = data.val_gray[:config.num_samples]
    plot_samples(shown, predict_labels(model, shown), data.val_labels[:config.num_samples],
                 data.centroids, run_dir / SAMPLES_FILE,
                 f"{config.model}: validation images (val acc "
                 f"{100 * history[-1]['val_accuracy']:.1f}%)")
    runs.write_metrics(run_dir, metrics)
    return metrics


def publish_epoch(run_dir: Path, model: nn.Module, metrics: dict[str, Any]) -> None:
    """Write checkpoint.pt and metrics.json, the files derived from the saved training state."""
    runs.save_checkpoint(run_dir, model)
    runs.write_metrics(run_dir, metrics)


def _resume(run_dir: Path, config: ColourConfig, model: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, float]], str]:
    state = runs.load_training_state(run_dir)
    if (state.get("task"), state.get("network")) != (TASK, config.model):
        raise ValueError(f"--resume: {run_dir} holds a {state.get('task')} "
                         f"{state.get('network')} run, not colour {config.model}; use the same "
                         "--model or a new --out")
    runs.check_resume_settings(state["settings"], config.settings())
    saved_epoch = int(state["epoch"])
    if saved_epoch > config.epochs:
        raise ValueError(f"--resume: {run_dir} already finished {saved_epoch} epochs, more "
                         f"than --epochs {config.epochs}; use --epochs {saved_epoch} or more")
    runs.restore_training_state(state, model, optimizer)
    return saved_epoch + 1, list(state["history"]), state["started_at"]


def sweep_colourization(base: ColourConfig, batch_sizes: Sequence[int], out: str | Path,
                        log=print) -> list[dict[str, Any]]:
    """Train one run per batch size (subfolders batch_<N> of `out`); write and return the summary.

    Writes out/summary.csv and out/summary.png (final train/val loss against batch size),
    holding the lock of `out` throughout and each run's lock while it trains.
    """
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"--batch-sizes {list(batch_sizes)} must be positive integers")
    with runs.run_folder_lock(out) as out:
        runs.remove_stale_temporaries(out)
        rows = []
        # the sweep as a whole (each run also has its own bar per epoch); terminal only
        for batch_size in tqdm(batch_sizes, desc="sweep", unit="run", file=sys.stderr,
                               disable=None if base.progress else True):
            config = sweep_run_config(base, out, batch_size)
            log(f"--- {base.model}, batch size {batch_size} ---")
            metrics = train_colourization(config, log=log)
            rows.append({"batch_size": batch_size, **metrics["final"],
                         "device": metrics["device"], "run": config.out})
        atomic_write_text(out / "summary.csv", summary_csv(rows))
        plot_sweep(rows, out / "summary.png", f"{base.model}, {base.epochs} epochs")
    log(summary_table(rows))
    return rows


def sweep_run_config(base: ColourConfig, out: Path, batch_size: int) -> ColourConfig:
    """Return the config of one sweep run; with --resume, a run not yet begun starts afresh."""
    run_dir = out / f"batch_{batch_size}"
    resume = base.resume and (run_dir / runs.TRAINING_STATE_FILE).is_file()
    return replace(base, batch_size=batch_size, out=str(run_dir), resume=resume)


SWEEP_COLUMNS = ("batch_size", "train_loss", "val_loss", "val_accuracy", "total_seconds")


def summary_csv(rows: list[dict[str, Any]]) -> str:
    """Return the sweep rows as CSV text (columns SWEEP_COLUMNS, then device and run)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*SWEEP_COLUMNS, "device", "run"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Return the sweep rows as an aligned plain-text table."""
    lines = [f"{'batch':>6} {'train loss':>11} {'val loss':>9} {'val acc':>8} {'seconds':>8}"]
    for row in rows:
        lines.append(f"{row['batch_size']:>6} {row['train_loss']:>11.4f} {row['val_loss']:>9.4f} "
                     f"{100 * row['val_accuracy']:>7.1f}% {row['total_seconds']:>8.1f}")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Plot final train and val loss against batch size (log2 axis) to `path`; return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["batch_size"] for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(sizes, [row["train_loss"] for row in rows], marker="o", label="train loss")
    axis.plot(sizes, [row["val_loss"] for row in rows], marker="o", label="val loss")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.set_xlabel("batch size")
    axis.set_ylabel("final loss")
    axis.set_title(title, fontsize=10)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return runs.save_and_close(figure, path)


# --- command line -------------------------------------------------------------------------


def _add_shared_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    defaults = ColourConfig()
    parser.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--kernel", type=int, default=defaults.kernel, help="kernel size K")
    parser.add_argument("--filters", type=int, default=defaults.filters, help="filters NF")
    parser.add_argument("--colours", type=int, default=defaults.num_colours,
                        help="colour classes NC (k-means centroids)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the weights, shuffling and k-means (default %(default)s)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a cifar-10-batches-py folder (default: download into the cache)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where downloads and derived files (the k-means colours) go; "
                             "never the --data folder (default $CONVTALLY_CACHE, else "
                             "$XDG_CACHE_HOME/convtally, else ~/.cache/convtally)")
    parser.add_argument("--category", default="7",
                        help="class index or name (default 7, horse), or 'all'")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last saved epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def configure_colour_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `train colour` arguments to `parser` and set its handler to run_colour."""
    parser.add_argument("--model", required=True, help=" | ".join(MODEL_NAMES))
    parser.add_argument("--batch-size", type=int, default=ColourConfig.batch_size,
                        help="images per step (default %(default)s, as in the write-up)")
    _add_shared_arguments(parser, ColourConfig.epochs)
    parser.add_argument("--out", default=None, metavar="DIR", help="run folder (runs/<model>)")
    parser.set_defaults(handler=run_colour)


def configure_sweep_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `train colour-sweep` arguments to `parser` and set its handler to run_sweep."""
    parser.add_argument("--model", default="convtranspose", help=" | ".join(MODEL_NAMES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(SWEEP_BATCH_SIZES),
                        help="one run per batch size (default: "
                        f"{' '.join(map(str, SWEEP_BATCH_SIZES))})")
    _add_shared_arguments(parser, ColourConfig.epochs)
    parser.add_argument("--out", default="runs/sweep", metavar="DIR",
                        help="sweep folder (one subfolder per batch size)")
    parser.set_defaults(handler=run_sweep)


def config_from_args(args: argparse.Namespace) -> ColourConfig:
    """Return the ColourConfig of parsed `train colour` / `colour-sweep` arguments."""
    return ColourConfig(
        model=args.model, epochs=args.epochs, batch_size=getattr(args, "batch_size", 100),
        lr=args.lr, kernel=args.kernel, filters=args.filters, num_colours=args.colours,
        seed=args.seed, category=cifar.parse_category(args.category), data_dir=args.data,
        cache_dir=args.cache_dir, device=args.device, out=args.out, resume=args.resume,
        progress=not args.no_progress,
    )


def run_colour(args: argparse.Namespace) -> int:
    """Handle `convtally train colour`; return the exit code (1 when the loss diverged)."""
    config = config_from_args(args)
    try:
        metrics = train_colourization(config)
    except runs.NonFiniteLossError as error:
        print(f"convtally train colour: error: {error}", file=sys.stderr)
        return 1
    final = metrics["final"]
    print(f"{config.model}: val loss {final['val_loss']:.4f}, val acc "
          f"{100 * final['val_accuracy']:.1f}%, {final['total_seconds']:.1f} s on "
          f"{metrics['device']}; wrote {config.run_dir()}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """Handle `convtally train colour-sweep`; return the exit code (1 when a loss diverged)."""
    base = config_from_args(args)
    validate_config(base)
    try:
        sweep_colourization(base, args.batch_sizes, args.out)
    except runs.NonFiniteLossError as error:
        print(f"convtally train colour-sweep: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {Path(args.out) / 'summary.csv'} and {Path(args.out) / 'summary.png'}")
    return 0

