"""Benchmark: symbolic analysis of DeepLabV3-ResNet101 and evaluation at 1,000 resolutions,
next to fvcore's FlopCountAnalysis on the same model, measured in the same run.

    .venv/bin/python benchmarks/analysis_speed.py [--model torchvision:deeplabv3_resnet101]
        [--fvcore-samples 3] [--out reports/benchmarks]

fvcore runs a real forward pass per resolution: by default all 1,000 resolutions are run
(minutes); with --fvcore-samples N < 1000 only every k-th is timed and the 1,000-resolution
figure is a projection, labelled as such.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convtally.analysis.accounting import analyse  # noqa: E402
from convtally.analysis.io import atomic_write_json, atomic_write_text  # noqa: E402
from convtally.models.registry import resolve  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:deeplabv3_resnet101")
    parser.add_argument("--fvcore-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    spec = resolve(args.model)
    start = time.perf_counter()
    network = spec.build().eval()
    build_seconds = time.perf_counter() - start

    start = time.perf_counter()
    analysis = analyse(network)
    analyse_seconds = time.perf_counter() - start

    step = analysis.divisor[0]
    resolutions = [(step * (8 + i % 50), step * (8 + i // 50)) for i in range(1000)]
    start = time.perf_counter()
    totals = analysis.totals_at(resolutions)
    first_evaluation = time.perf_counter() - start  # includes compiling the formulas
    start = time.perf_counter()
    analysis.totals_at(resolutions)
    evaluation_seconds = time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fvcore's import scripts a function with torch.jit
        from fvcore.nn import FlopCountAnalysis

    fvcore_times, fvcore_counts = [], []
    sample = resolutions[:: max(1, len(resolutions) // args.fvcore_samples)][: args.fvcore_samples]
    for height, width in sample:
        x = torch.zeros(1, 3, height, width)
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counter = FlopCountAnalysis(network, x)
            counter.unsupported_ops_warnings(False)
            counter.uncalled_modules_warnings(False)
            fvcore_counts.append(int(counter.total()))
        fvcore_times.append(time.perf_counter() - start)
    fvcore_one = statistics.mean(fvcore_times)
    measured_all = len(sample) == len(resolutions)
    fvcore_all = sum(fvcore_times) if measured_all else 1000 * fvcore_one
    how = "measured" if measured_all else "projected: 1000 x the mean"

    result = {
        "benchmark": "analysis_speed",
        "model": args.model,
        "layers": len(analysis.layers),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "command": "python benchmarks/analysis_speed.py " + " ".join(sys.argv[1:]),
        "build_model_seconds": round(build_seconds, 3),
        "symbolic_analysis_seconds": round(analyse_seconds, 3),
        "evaluate_1000_resolutions_seconds_first_call": round(first_evaluation, 3),
        "evaluate_1000_resolutions_seconds": round(evaluation_seconds, 4),
        "fvcore_one_resolution_seconds": round(fvcore_one, 3),
        "fvcore_1000_resolutions_seconds": round(fvcore_all, 1),
        "fvcore_1000_resolutions": how,
        "fvcore_resolutions_timed": len(sample),
        "fvcore_seconds_min_max": [round(min(fvcore_times), 3), round(max(fvcore_times), 3)],
        "resolution_range": f"{resolutions[0]} to {resolutions[-1]}",
        "example_total_connections": {
            f"{h}x{w}": totals["connections"][i] for i, (h, w) in enumerate(resolutions[:3])
        },
    }
    lines = [
        f"# Analysis speed: {args.model}",
        "",
        f"Measured {result['date']} on {result['machine']} (torch {result['torch']}), "
        f"command `{result['command']}`.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| build the model (torchvision, random weights) | {build_seconds:.3f} |",
        f"| full symbolic analysis ({len(analysis.layers)} layers) | {analyse_seconds:.3f} |",
        f"| evaluate every formula at 1,000 resolutions (first call, compiling) | "
        f"{first_evaluation:.3f} |",
        f"| evaluate every formula at 1,000 resolutions | {evaluation_seconds:.4f} |",
        f"| fvcore FlopCountAnalysis, one resolution (mean of {len(sample)}) | {fvcore_one:.3f} |",
        f"| fvcore, 1,000 resolutions ({how}) | {fvcore_all:.1f} |",
    ]
    atomic_write_json(args.out / "analysis_speed.json", result)
    atomic_write_text(args.out / "analysis_speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
