"""Speed of the segmentation fine-tune's fast path (cached frozen features) against the slow path.

Both paths run `train_segmentation` with the same settings on a generated miniature Oxford 17
Flowers dataset in the official layout (ellipses on noise; the data only has to have the right
shapes, so no accuracy is reported). Timed: the training loop with validation after every
epoch, the fast path's one-off feature caching included; not timed: reading the data, building
the model, writing the run folder. A warm-up forward pass runs first for each backbone.

    .venv/bin/python benchmarks/segment_fast_path.py --threads 1 --repeats 3

(one torch thread gives steady timings on a CPU that other work shares; the 1-minute load
average before and after the run is recorded with the results).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from convtally.analysis.io import atomic_write_json, atomic_write_text  # noqa: E402
from convtally.models.device import device_description, resolve_device  # noqa: E402
from convtally.models.flowers import write_synthetic_flowers  # noqa: E402
from convtally.models.segmentation import build_finetune_model  # noqa: E402
from convtally.models.train_segment import SegmentConfig, train_segmentation  # noqa: E402


def warm_up(backbone: str, size: int, batch_size: int, device: torch.device) -> None:
    """Run one eval-mode forward pass so one-off start-up costs stay out of the timings."""
    model = build_finetune_model(backbone, weights="none").to(device).eval()
    with torch.no_grad():
        model(torch.zeros(batch_size, 3, size, size, device=device))


def time_path(config: SegmentConfig, repeats: int) -> dict[str, Any]:
    """Return the timings of the fastest of `repeats` `train_segmentation` runs."""
    runs = [train_segmentation(config) for _ in range(repeats)]
    metrics = min(runs, key=lambda run: run["final"]["total_seconds"])
    seconds = [row["seconds"] for row in metrics["epochs"]]
    return {
        "total_seconds": metrics["final"]["total_seconds"],
        "feature_cache_seconds": metrics["final"].get("feature_cache_seconds"),
        "epoch_seconds": seconds,
        "median_epoch_seconds": statistics.median(seconds),
        "total_seconds_of_each_repeat": [run["final"]["total_seconds"] for run in runs],
        "final_train_loss": metrics["final"]["train_loss"],
        "train_images": metrics["data"]["train_images"],
        "val_images": metrics["data"]["val_images"],
    }


def benchmark_backbone(backbone: str, args: argparse.Namespace, data: Path,
                       work: Path, device: torch.device) -> dict[str, Any]:
    """Return slow and fast timings of one backbone and the speed-ups between them."""
    warm_up(backbone, args.size, args.batch_size, device)
    timings = {}
    for path in ("slow", "fast"):
        config = SegmentConfig(
            loss=args.loss, backbone=backbone, weights="none", epochs=args.epochs,
            batch_size=args.batch_size, size=args.size, data=str(data), device=args.device,
            path=path, seed=0, out=str(work / f"{backbone}-{path}"), download=False,
            progress=False, grid_images=0,
        )
        timings[path] = time_path(config, args.repeats)
    slow, fast = timings["slow"], timings["fast"]
    return {
        "model": f"deeplabv3_{backbone}",
        "slow": slow,
        "fast": fast,
        "speedup_total": slow["total_seconds"] / fast["total_seconds"],
        "speedup_per_epoch": slow["median_epoch_seconds"] / fast["median_epoch_seconds"],
    }


def markdown_report(report: dict[str, Any]) -> str:
    """Return the benchmark report as Markdown."""
    settings, load = report["settings"], report["load_average_1min"]
    first = report["results"][0]["slow"]
    lines = [
        "# Segmentation fine-tune: fast path vs slow path",
        "",
        f"- date: {report['date']}",
        f"- device: {report['device']}; 1-minute load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after, on {load['cpu_count']} CPUs",
        f"- command: `{report['command']}`",
        f"- data: {report['data']}; {first['train_images']} train / {first['val_images']} "
        "val images",
        f"- settings: weights {settings['weights']}, {settings['size']}x{settings['size']}, "
        f"loss {settings['loss']}, batch {settings['batch_size']}, {settings['epochs']} epochs "
        f"(validation after each); fastest of {settings['repeats']} runs per path, "
        f"{settings['torch_threads']} torch thread(s)",
        f"- timed: {report['timed']}",
        "",
        "| model | slow total (s) | fast total (s) | fast: feature cache (s) | "
        "slow epoch (s, median) | fast epoch (s, median) | speed-up total | "
        "speed-up per epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        slow, fast = row["slow"], row["fast"]
        lines.append(
            f"| {row['model']} | {slow['total_seconds']:.2f} | {fast['total_seconds']:.2f} | "
            f"{fast['feature_cache_seconds']:.2f} | {slow['median_epoch_seconds']:.3f} | "
            f"{fast['median_epoch_seconds']:.4f} | {row['speedup_total']:.1f}x | "
            f"{row['speedup_per_epoch']:.0f}x |"
        )
    lines += ["", report["note"], ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v3_large", "resnet50"])
    parser.add_argument("--images", type=int, default=16, help="generated images (1/4 are val)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadier on a busy CPU")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per path; the fastest is reported")
    parser.add_argument("--out-dir", default=str(REPO / "reports" / "benchmarks"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write segment_fast_path.json and .md; return 0."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "flowers"
        write_synthetic_flowers(data, count=args.images, image_size=(320, 240))
        results = [benchmark_backbone(b, args, data, Path(tmp), device) for b in args.backbones]
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = {
        "benchmark": "segment_fast_path",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f".venv/bin/python benchmarks/segment_fast_path.py {argv_text}".strip(),
        "device": device_description(device),
        "torch": torch.__version__,
        # other work on a shared machine slows both paths; the 1-minute load average says how busy
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0],
                              "cpu_count": os.cpu_count()},
        "data": (
            f"generated miniature Oxford 17 Flowers layout: {args.images} images of 320x240 "
            "(ellipses on noise, write_synthetic_flowers), not the real dataset"
        ),
        "settings": {"weights": "none", "size": args.size, "loss": args.loss,
                     "batch_size": args.batch_size, "epochs": args.epochs,
                     "repeats": args.repeats, "torch_threads": torch.get_num_threads()},
        "timed": "training loop incl. validation every epoch and the fast path's feature "
                 "caching; excludes data loading, model building and writing the run folder",
        "results": results,
        "note": (
            "The fast path computes the frozen 256-channel features once (eval mode) and trains "
            "only the 1x1 head on them; the slow path (the write-up's) runs the whole network "
            "in train mode every step (and a full eval-mode pass for validation). Each slow "
            "epoch runs the network over every train and val image once, the fast path does "
            "so once in all, so the total speed-up grows with the number of epochs; the "
            "per-epoch speed-up is what each further epoch gains. Timed on generated data: "
            "speed only, no accuracy."
        ),
    }
    out_dir = Path(args.out_dir)
    atomic_write_json(out_dir / "segment_fast_path.json", report)
    atomic_write_text(out_dir / "segment_fast_path.md", markdown_report(report))
    print(markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
