"""Fine-tune DeepLabV3's last layer on Oxford 17 Flowers (write-up Part D), CPU or GPU alike.

Two ways to run the same fine-tune (`--path`):

- fast (default): everything before classifier[4] is frozen, so its 256-channel output is
  computed once per image with the model in eval mode and cached; each step runs only the
  1x1 head on the cached features and upsamples the logits to the input size (bilinear,
  align_corners=False, as DeepLabV3 does). Validation uses the cached features too.
- slow (the write-up's): a full forward pass every step with `model.train()`, so BatchNorm
  uses batch statistics (and updates its running averages) and ASPP's dropout is active.

The run folder holds metrics.json, head.pt (the state_dict of classifier[4] only: load it
with `model.classifier[4].load_state_dict(torch.load(path, weights_only=True))`), curves.png,
predictions.png and training_state.pt (written after every epoch, in one atomic rename: what
`--resume` needs to continue exactly as an uninterrupted run would). A run holds the folder's
lock while it writes there.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from convtally.analysis.io import atomic_save_figure, atomic_torch_save
from convtally.models import runs
from convtally.models.device import device_description, resolve_device
from convtally.models.flowers import (
    FLOWERS_PAGE,
    FlowerSplit,
    ensure_flowers,
    load_flower_split,
    normalize_images,
)
from convtally.models.runs import software_versions, utc_timestamp, write_metrics
from convtally.models.segmentation import (
    BACKBONES,
    LOSSES,
    build_finetune_model,
    frozen_features,
    head_logits,
    iou_counts,
    learned_parameters,
    predicted_foreground,
    segmentation_scores,
)
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from tqdm import tqdm

PATHS = ("fast", "slow")
METRIC_DEFINITIONS = {
    "thresholded_iou": "per image, the fraction of thresholds 0.5, 0.55, ..., 0.95 that the "
    "foreground IoU exceeds (strictly), averaged over images; empty union counts as IoU 1",
    "mean_foreground_iou": "foreground IoU per image averaged over images; an image with no "
    "foreground in truth or prediction (empty union) counts as IoU 1",
    "class_mean_iou": "standard mIoU: background and foreground IoU from intersections and "
    "unions summed over all validation pixels, averaged over the two classes",
    "losses": "train_loss and val_loss: mean of per-batch losses weighted by batch size",
}


@dataclass
class SegmentConfig:
    """Settings of one fine-tuning run (the CLI's arguments)."""

    loss: str = "ce"
    backbone: str = "resnet101"
    weights: str = "coco"
    epochs: int = 10
    lr: float = 0.001  # Adam; the write-up does not record its optimiser settings
    batch_size: int = 8
    size: int = 224
    data: str = ".cache/flowers17"
    device: str = "auto"
    path: str = "fast"
    seed: int = 0
    out: str | None = None
    download: bool = True
    progress: bool = True
    grid_images: int = 4
    resume: bool = False

    def run_dir(self) -> Path:
        """Return the run folder: `out`, or runs/segment-<backbone>-<loss>-<path>."""
        return Path(self.out or f"runs/segment-{self.backbone}-{self.loss}-{self.path}")


def validate_config(config: SegmentConfig) -> None:
    """Raise ValueError (one line, naming the value) for a setting the run cannot use."""
    choices = {"loss": tuple(LOSSES), "backbone": tuple(BACKBONES), "path": PATHS}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(
                f"--{name} {getattr(config, name)!r} is not one of {', '.join(allowed)}"
            )
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("size", 32), ("grid_images", 0)):
        if getattr(config, name) < minimum:
            flag = name.replace("_", "-")
            raise ValueError(f"--{flag} {getattr(config, name)} must be at least {minimum}")
    if config.path == "slow" and config.batch_size < 2:
        raise ValueError(
            "--batch-size 1 with --path slow: BatchNorm in train mode needs at least 2 images "
            "per batch; use --batch-size 2 or more, or --path fast"
        )
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"--lr {config.lr} must be a positive number")


def batches(count: int, batch_size: int, order: Tensor | None = None,
            drop_single: bool = False) -> list[Tensor]:
    """Return index batches over range(count) (in `order` if given); optionally drop a last 1."""
    order = torch.arange(count) if order is None else order
    chunks = list(order.split(batch_size))
    if drop_single and len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks.pop()  # BatchNorm in train mode cannot normalise a batch of one
    return chunks


@torch.no_grad()
def cache_features(model: nn.Module, images: Tensor, batch_size: int, device: torch.device,
                   progress: bool = True, label: str = "features") -> Tensor:
    """Return frozen_features of uint8 `images` (eval mode), computed batch by batch on `device`."""
    model.eval()
    parts = [
        frozen_features(model, normalize_images(images[idx].to(device)))
        for idx in tqdm(batches(len(images), batch_size), desc=label, disable=not progress,
                        leave=False)
    ]
    return torch.cat(parts)


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Return Adam over exactly the learned parameters (classifier.4.*) of `model`."""
    return torch.optim.Adam(learned_parameters(model), lr=lr)


LogitsFn = Callable[[Tensor], Tensor]


def train_one_epoch(logits_of: LogitsFn, masks: Tensor, loss_fn: Callable, optimizer,
                    index_batches: Sequence[Tensor], progress: bool, label: str) -> float:
    """Run one optimiser step per batch; return the batch-size-weighted mean loss."""
    total, seen = 0.0, 0
    bar = tqdm(index_batches, desc=label, disable=not progress, leave=False)
    for idx in bar:
        loss = loss_fn(logits_of(idx), masks[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise ValueError(f"{label}: the loss became {value}; try a smaller --lr")
        total += value * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{value:.4f}")
    return total / seen


@torch.no_grad()
def evaluate(logits_of: LogitsFn, masks: Tensor, loss_fn: Callable,
             index_batches: Sequence[Tensor]) -> dict[str, float]:
    """Return val_loss (batch-size-weighted mean) and the IoU metrics over all batches."""
    total, seen, counts = 0.0, 0, []
    for idx in index_batches:
        logits = logits_of(idx)
        total += float(loss_fn(logits, masks[idx])) * len(idx)
        seen += len(idx)
        counts.append(iou_counts(predicted_foreground(logits), masks[idx]))
    return {"val_loss": total / seen, **segmentation_scores(torch.cat(counts))}


def full_forward(model: nn.Module, images: Tensor, device: torch.device) -> LogitsFn:
    """Return a function giving the model's full-forward logits for a batch of image indices."""
    return lambda idx: model(normalize_images(images[idx].to(device)))["out"]


def cached_forward(head: nn.Module, features: Tensor, size: int) -> LogitsFn:
    """Return a function giving the head's upsampled logits on cached features for a batch."""
    return lambda idx: head_logits(head, features[idx.to(features.device)], (size, size))


def path_logits(config: SegmentConfig, model: nn.Module, train_set: FlowerSplit,
                val_set: FlowerSplit, device: torch.device) -> tuple[LogitsFn, LogitsFn]:
    """Return the (train, val) logits functions of `config.path`; the fast path caches here."""
    if config.path == "slow":
        _say("slow path: full forward every step, model.train() (BatchNorm batch statistics)")
        return (full_forward(model, train_set.images, device),
                full_forward(model, val_set.images, device))
    start = time.perf_counter()
    train_features, val_features = (
        cache_features(model, split.images, config.batch_size, device, config.progress,
                       f"caching {split.name} features")
        for split in (train_set, val_set)
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    megabytes = (train_features.numel() + val_features.numel()) * 4 / 2**20
    _say(f"fast path: cached frozen features {tuple(train_features.shape[1:])} per image "
         f"({megabytes:.0f} MiB) in {time.perf_counter() - start:.1f} s; "
         "training classifier[4] on them")
    head = model.classifier[4]
    return (cached_forward(head, train_features, config.size),
            cached_forward(head, val_features, config.size))


def train_segmentation(config: SegmentConfig) -> dict:
    """Fine-tune as `config` says, write the run folder, and return the metrics dict.

    The run holds the folder's lock while it writes there (runs.RunFolderBusyError if another
    live run does); with `config.resume` it continues from the folder's training_state.pt.
    """
    validate_config(config)
    started_at = utc_timestamp()
    device = resolve_device(config.device)
    downloaded = ensure_flowers(config.data, download=config.download)
    train_set = load_flower_split(config.data, "train", config.size)
    val_set = load_flower_split(config.data, "val", config.size)
    data = _data_summary(config, train_set, val_set, downloaded)
    with runs.run_folder_lock(config.run_dir()) as run_dir:
        runs.remove_stale_temporaries(run_dir)
        metrics, model = _train_in_folder(config, run_dir, device, train_set, val_set, data,
                                          started_at)
        write_run_folder(run_dir, metrics, model, val_set, device, config.grid_images)
    _say(f"wrote {run_dir}")
    return metrics


def _train_in_folder(config: SegmentConfig, run_dir: Path, device: torch.device,
                     train_set: FlowerSplit, val_set: FlowerSplit, data: dict,
                     started_at: str) -> tuple[dict, nn.Module]:
    torch.manual_seed(config.seed)
    model = build_finetune_model(config.backbone, config.weights).to(device)
    optimizer = build_optimizer(model, config.lr)
    loss_fn = LOSSES[config.loss]
    order_generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    first_epoch, seconds_before = 1, 0.0
    if config.resume:
        state = resume_state(run_dir, config)
        runs.restore_training_state(state, model, optimizer)
        order_generator.set_state(state["order_generator"])
        history, started_at = list(state["history"]), state["started_at"]
        first_epoch, seconds_before = int(state["epoch"]) + 1, float(state["seconds"])
        _say(f"resuming {run_dir} after epoch {first_epoch - 1}")
    else:
        runs.remove_training_state(run_dir)
    train_masks, val_masks = train_set.masks.to(device), val_set.masks.to(device)
    val_batches = batches(len(val_set), config.batch_size)
    _say(f"segment: {len(train_set)} train / {len(val_set)} val images at {config.size}x"
         f"{config.size}, deeplabv3_{config.backbone} (weights {config.weights}), loss "
         f"{config.loss}, path {config.path}, on {device_description(device)}")

    run_start = time.perf_counter()
    train_logits, val_logits = path_logits(config, model, train_set, val_set, device)
    cache_seconds = time.perf_counter() - run_start if config.path == "fast" else None

    for epoch in range(first_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train(config.path == "slow")
        order = torch.randperm(len(train_set), generator=order_generator)
        train_loss = train_one_epoch(
            train_logits, train_masks, loss_fn, optimizer,
            batches(len(train_set), config.batch_size, order, drop_single=config.path == "slow"),
            config.progress, f"epoch {epoch}/{config.epochs}",
        )
        model.eval()
        scores = evaluate(val_logits, val_masks, loss_fn, val_batches)
        row = {"epoch": epoch, "train_loss": train_loss, **scores,
               "seconds": time.perf_counter() - epoch_start}
        history.append(row)
        runs.save_training_state(run_dir, runs.training_state(
            model, optimizer, epoch, _settings(config), history, task="segment",
            network=f"deeplabv3_{config.backbone}", started_at=started_at,
            seconds=seconds_before + time.perf_counter() - run_start,
            order_generator=order_generator.get_state()))
        _say(f"Epoch [{epoch}/{config.epochs}], Loss: {train_loss:.4f}, Val loss: "
             f"{row['val_loss']:.4f}, thresholded IoU: {row['thresholded_iou']:.4f}, mean fg "
             f"IoU: {row['mean_foreground_iou']:.4f}, class-mean IoU: "
             f"{row['class_mean_iou']:.4f}, Time (s): {row['seconds']:.1f}")
    total_seconds = seconds_before + time.perf_counter() - run_start

    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")}
    final["total_seconds"] = total_seconds
    if cache_seconds is not None:
        final["feature_cache_seconds"] = cache_seconds
    metrics = {
        "task": "segment",
        "model": f"deeplabv3_{config.backbone}",
        "settings": {**_settings(config), "optimizer": "Adam",
                     "learned_parameters": "classifier.4.weight, classifier.4.bias"},
        "data": data,
        "device": device_description(device),
        "epochs": history,
        "final": final,
        "metric_definitions": METRIC_DEFINITIONS,
        "software": {**software_versions(), "torchvision": torchvision.__version__},
        "started_at": started_at,
        "finished_at": utc_timestamp(),
    }
    return metrics, model


def resume_state(run_dir: Path, config: SegmentConfig) -> dict:
    """Return the saved training state of `run_dir` after checking it belongs to `config`."""
    state = runs.load_training_state(run_dir)
    network = f"deeplabv3_{config.backbone}"
    if (state.get("task"), state.get("network")) != ("segment", network):
        raise ValueError(f"--resume: {run_dir} holds a {state.get('task')} "
                         f"{state.get('network')} run, not segment {network}; use the same "
                         "--backbone or a new --out")
    runs.check_resume_settings(state["settings"], _settings(config), ignore=("epochs", "out"))
    if int(state["epoch"]) > config.epochs:
        raise ValueError(f"--resume: {run_dir} already finished {state['epoch']} epochs, more "
                         f"than --epochs {config.epochs}; use --epochs {state['epoch']} or more")
    return state


def _settings(config: SegmentConfig) -> dict:
    skip = ("progress", "grid_images", "download", "resume")
    settings = {k: v for k, v in asdict(config).items() if k not in skip}
    return {**settings, "out": str(config.run_dir())}


def _data_summary(config: SegmentConfig, train_set: FlowerSplit, val_set: FlowerSplit,
                  downloaded: list[str]) -> dict:
    source = str(Path(config.data).resolve())
    if downloaded:
        source += f" ({', '.join(downloaded)} downloaded from {FLOWERS_PAGE})"
    return {
        "source": source,
        "description": (
            "Oxford 17 Flowers images with trimaps: train = trn1 ∪ trn2 ∪ trn3, validation = "
            "val1 (datasplits.mat), images without a trimap skipped, foreground = trimap "
            f"(128, 0, 0), resized to {config.size}x{config.size}, ImageNet normalisation"
        ),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "train_skipped_without_trimap": len(train_set.skipped),
        "val_skipped_without_trimap": len(val_set.skipped),
        # the write-up's split lets trn2/trn3 share images with val1; say how many
        "val_images_also_in_train": len(set(train_set.indices) & set(val_set.indices)),
    }


def write_run_folder(run_dir: Path, metrics: dict, model: nn.Module, val_set: FlowerSplit,
                     device: torch.device, grid_images: int) -> None:
    """Write metrics.json, head.pt, curves.png and predictions.png into `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    head_state = {k: v.detach().cpu() for k, v in model.classifier[4].state_dict().items()}
    atomic_torch_save(head_state, run_dir / "head.pt")
    atomic_save_figure(curves_figure(metrics["epochs"]), run_dir / "curves.png", dpi=120)
    count = min(grid_images, len(val_set))
    if count:
        with torch.no_grad():
            model.eval()
            idx = torch.arange(count)
            predicted = predicted_foreground(full_forward(model, val_set.images, device)(idx))
        figure = prediction_grid(val_set.images[:count], val_set.masks[:count], predicted.cpu())
        atomic_save_figure(figure, run_dir / "predictions.png", dpi=120)
    write_metrics(run_dir, metrics)


def curves_figure(history: list[dict]) -> Figure:
    """Return a figure of train/val loss and the validation IoU metrics per epoch."""
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    loss_axes, iou_axes = figure.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        loss_axes.plot(epochs, [row[key] for row in history], marker="o", label=key)
    for key in ("thresholded_iou", "mean_foreground_iou", "class_mean_iou"):
        iou_axes.plot(epochs, [row[key] for row in history], marker="o", label=key)
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    iou_axes.set(xlabel="epoch", ylabel="IoU", title="validation IoU", ylim=(0, 1))
    for axes in (loss_axes, iou_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def prediction_grid(images: Tensor, truth: Tensor, predicted: Tensor) -> Figure:
    """Return a figure with one row per image: the image, its true mask, the predicted mask."""
    rows = len(images)
    figure = Figure(figsize=(7.5, 2.5 * rows))
    axes = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 1].imshow(truth[row].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[row, 2].imshow(predicted[row].numpy(), cmap="gray", vmin=0, vmax=1)
        for column, title in enumerate(("image", "truth", "prediction")):
            axes[row, column].set_title(title)
            axes[row, column].axis("off")
    figure.tight_layout()
    return figure


def _say(message: str) -> None:
    tqdm.write(message)


def configure_segment_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train segment` arguments to `parser` and set its handler; return `parser`."""
    defaults = SegmentConfig()
    parser.add_argument("--loss", default=defaults.loss,
                        help="ce (cross-entropy) or iou (soft IoU); default %(default)s")
    parser.add_argument("--backbone", default=defaults.backbone,
                        help=f"{' | '.join(BACKBONES)}; default %(default)s")
    parser.add_argument("--weights", default=defaults.weights,
                        help="coco (torchvision COCO_WITH_VOC_LABELS_V1), none (random) or the "
                        "PATH of a DeepLabV3 state_dict file; default %(default)s")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"passes over the training images (default {defaults.epochs})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"images per step (default {defaults.batch_size})")
    parser.add_argument("--size", type=int, default=defaults.size,
                        help="images and masks are resized to SIZE x SIZE; default %(default)s")
    parser.add_argument("--data", default=defaults.data,
                        help="Oxford 17 Flowers directory (jpg/, trimaps/, datasplits.mat); "
                        "what is missing is downloaded there; default %(default)s")
    parser.add_argument("--no-download", action="store_true",
                        help="fail instead of downloading missing data")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu or cuda[:N]")
    parser.add_argument("--path", default=defaults.path,
                        help="fast (train the head on cached frozen features) or slow (the "
                        "write-up's full forward in train mode every step); default %(default)s")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the head's weights and the shuffling (default %(default)s)")
    parser.add_argument("--out", default=None,
                        help="run folder; default runs/segment-<backbone>-<loss>-<path>")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last saved epoch")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run_segment)
    return parser


def config_from_args(args: argparse.Namespace) -> SegmentConfig:
    """Return the SegmentConfig described by parsed `train segment` arguments."""
    return SegmentConfig(
        loss=args.loss, backbone=args.backbone, weights=args.weights, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, size=args.size, data=args.data,
        device=args.device, path=args.path, seed=args.seed, out=args.out,
        download=not args.no_download, progress=not args.no_progress, resume=args.resume,
    )


def run_segment(args: argparse.Namespace) -> int:
    """Handle `convtally train segment`; return the exit code (0 when the run was written)."""
    config = config_from_args(args)
    metrics = train_segmentation(config)
    final = metrics["final"]
    print(f"{metrics['model']} ({config.path} path, {config.loss} loss): thresholded IoU "
          f"{final['thresholded_iou']:.4f}, mean foreground IoU "
          f"{final['mean_foreground_iou']:.4f}, class-mean IoU {final['class_mean_iou']:.4f}, "
          f"{final['total_seconds']:.1f} s -> {config.run_dir()}")
    return 0
