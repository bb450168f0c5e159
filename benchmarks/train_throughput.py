"""Training throughput of the three colourization networks, and the write-up's schedule time.

For each network and device: train images per second (forward, backward and Adam step; no
validation) over full epochs of `--images` grayscale horses (the category's training images
repeated to that count, as the full CIFAR-10 has 5000 horses), and the time of the write-up's
schedule (25 epochs, batch 100). When the schedule would take longer than --max-full-seconds,
one full epoch is measured and the schedule time is reported as projected (25 x that epoch).

    .venv/bin/python benchmarks/train_throughput.py --data ../shared/data/cifar-10-batches-py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from convtally.analysis.io import atomic_write_json, atomic_write_text  # noqa: E402
from convtally.models import runs  # noqa: E402
from convtally.models.device import device_description, resolve_device  # noqa: E402
from convtally.models.train_colour import (  # noqa: E402
    MODEL_NAMES,
    ColourConfig,
    build_model,
    epoch_generator,
    epoch_mean_loss,
    prepare_colour_data,
    train_epoch,
)


def repeat_to(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Return the first `count` rows of `tensor` repeated end to end."""
    repeats = -(-count // len(tensor))
    return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))[:count]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_model(config: ColourConfig, gray: torch.Tensor, labels: torch.Tensor,
                    device: torch.device, max_full_seconds: float,
                    warmup_batches: int = 3, compile_mode: str | None = None) -> dict[str, Any]:
    """Return the measured throughput and (measured or projected) schedule time of one network.

    `compile_mode` (e.g. "default", "reduce-overhead": CUDA graphs, "max-autotune") trains the
    torch.compile'd network instead; compilation happens in the untimed warm-up batches.
    """
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    warm = epoch_generator(device, config.seed, 0)
    warmup_start = time.perf_counter()
    train_epoch(model, optimizer, gray[:warmup_batches * config.batch_size],
                labels[:warmup_batches * config.batch_size], config.batch_size, warm)
    synchronize(device)
    warmup_seconds = time.perf_counter() - warmup_start

    load_before = os.getloadavg()[0]
    epoch_seconds: list[float] = []
    schedule_start = time.perf_counter()
    loss = float("nan")
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        losses = train_epoch(model, optimizer, gray, labels, config.batch_size,
                             epoch_generator(device, config.seed, epoch))
        loss = epoch_mean_loss(losses, len(gray), config.batch_size, epoch, config.lr)
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        if epoch == 1 and epoch_seconds[0] * config.epochs > max_full_seconds:
            break
    measured = len(epoch_seconds) == config.epochs
    typical_epoch = statistics.median(epoch_seconds)
    return {
        "model": config.model,
        "device": device_description(device),
        "compile": compile_mode or "none (eager)",
        "warmup_seconds": round(warmup_seconds, 3),
        "images_per_second": round(len(gray) / typical_epoch, 1),
        "images_per_second_best_epoch": round(len(gray) / min(epoch_seconds), 1),
        "epoch_seconds_median": round(typical_epoch, 3),
        "epoch_seconds_min": round(min(epoch_seconds), 3),
        "epochs_timed": len(epoch_seconds),
        "epoch_seconds": [round(seconds, 3) for seconds in epoch_seconds],
        "schedule_seconds": round(time.perf_counter() - schedule_start if measured
                                  else typical_epoch * config.epochs, 1),
        "schedule": "measured" if measured else "projected (25 x one measured epoch)",
        "final_train_loss": round(loss, 4),
        # the 1-minute load average: other jobs sharing the CPU slow some epochs down
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every requested network on every requested device; return the results."""
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    results, data_info = [], None
    for device_name in devices:
        device = resolve_device(device_name)
        base = ColourConfig(data_dir=args.data, cache_dir=args.cache_dir, epochs=args.epochs,
                            batch_size=args.batch_size, device=device_name, progress=False)
        data = prepare_colour_data(base, device)
        data_info = data.info
        gray = repeat_to(data.train_gray, args.images)
        labels = repeat_to(data.train_labels, args.images)
        for model in args.models:
            config = ColourConfig(model=model, epochs=args.epochs, batch_size=args.batch_size)
            result = benchmark_model(config, gray, labels, device, args.max_full_seconds,
                                     compile_mode=args.compile)
            print(f"{model:>14} on {result['device']}: {result['images_per_second']:.0f} "
                  f"images/s, {args.epochs}-epoch schedule {result['schedule_seconds']:.1f} s "
                  f"({result['schedule']})", flush=True)
            results.append(result)
    return {
        "benchmark": "colourization training throughput",
        "date": runs.utc_timestamp(),
        "command": args.command_line,
        "torch_threads": torch.get_num_threads(),
        "software": runs.software_versions(),
        "data": {"source": data_info["source"], "description": data_info["description"],
                 "category_train_images": data_info["train_images"],
                 "images_per_epoch": args.images,
                 "note": "the category's training images repeated to images_per_epoch"},
        "settings": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.001,
                     "kernel": 3, "filters": 32, "num_colours": 24, "num_in_channels": 1},
        "compile": args.compile or "none (eager)",
        "timing": "train step only (forward, backward, Adam); no validation; after "
                  "3 warm-up batches (compilation too, with --compile); images/s from the "
                  "median epoch (and from the fastest epoch, the least disturbed by other jobs "
                  "sharing the CPU)",
        "cpu_count": os.cpu_count(),
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    """Return the benchmark report as Markdown."""
    settings = report["settings"]
    lines = [
        "# Colourization training throughput",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- data: {report['data']['description']}; {report['data']['category_train_images']} "
        f"horse training images repeated to {report['data']['images_per_epoch']} per epoch",
        f"- settings: {settings['epochs']} epochs, batch {settings['batch_size']}, "
        f"K={settings['kernel']}, NF={settings['filters']}, NC={settings['num_colours']}, "
        f"NIC={settings['num_in_channels']}, Adam lr {settings['lr']}",
        f"- timing: {report['timing']}",
        f"- software: torch {report['software']['torch']}, CUDA "
        f"{report['software'].get('cuda', 'none')}, python {report['software']['python']}",
        f"- torch.compile: {report.get('compile', 'none (eager)')}",
        "",
        f"| network | device | images/s (median epoch) | images/s (fastest epoch) "
        f"| epoch s (median) | {settings['epochs']}-epoch schedule s | schedule | load avg |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['device']} | {row['images_per_second']:.0f} | "
                     f"{row['images_per_second_best_epoch']:.0f} | "
                     f"{row['epoch_seconds_median']:.2f} | {row['schedule_seconds']:.1f} | "
                     f"{row['schedule']} | {row['load_average_before']:.2f} -> "
                     f"{row['load_average_after']:.2f} |")
    lines += [
        "",
        "A measured schedule is the wall time of all its epochs; where it exceeds epochs x the "
        "median epoch, other jobs sharing the CPU slowed some epochs down (each epoch's time is "
        "in `epoch_seconds` of the JSON, the 1-minute load average before and after in the "
        "last column). A projected schedule is epochs x one measured epoch.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="cifar-10-batches-py folder")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, and cuda when present")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    parser.add_argument("--images", type=int, default=5000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-full-seconds", type=float, default=240.0,
                        help="project the schedule from one epoch when it would take longer")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="train the torch.compile'd networks in this mode (reduce-overhead "
                             "uses CUDA graphs); default: eager, as the trainer")
    parser.add_argument("--out-dir", default=str(REPO / "reports" / "benchmarks"))
    parser.add_argument("--name", default="train_throughput",
                        help="file name (without suffix) of the .json and .md written")
    args = parser.parse_args(argv)
    args.command_line = " ".join(["python benchmarks/train_throughput.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write train_throughput.json and .md; return the exit code."""
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out_dir)
    atomic_write_json(out / f"{args.name}.json", report)
    atomic_write_text(out / f"{args.name}.md", markdown(report))
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
