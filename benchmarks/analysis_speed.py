"""Benchmark: convtally's one-resolution analysis next to fvcore's FlopCountAnalysis over a list
of models, the 1,000-resolution sweep rendered to CSV and JSON, and how fast the command starts.

    .venv/bin/python benchmarks/analysis_speed.py [--models NAME[,KEY=VALUE...][@SIDE] ...]
        [--threads 1] [--rounds 5] [--sweep-model torchvision:deeplabv3_resnet101]
        [--fvcore-samples 10] [--out reports/benchmarks]

Every figure is measured in this run, in one process, with `--threads` torch threads (default
1: on a shared machine two threads slow every forward pass, which would flatter us). For each
model the rounds interleave the three timings, and the table gives their medians:

- built: `analyse(network)` plus the totals at the resolution, the network built once and
  reused (what fvcore is given);
- by name: `analyse("torchvision:resnet18")` plus the totals, the network built from its name
  (what a user types);
- fvcore: `FlopCountAnalysis(network, x).total()` under no_grad, on the same network.

Before every timed call the garbage of the earlier ones is collected, untimed, so no call pays
for another's.

The first round is reported too ("first"): the analysis remembers simplified formulas across
calls, so later rounds, like later models in a loop, are faster than a cold start.

The sweep evaluates every formula of `--sweep-model` at 1,000 resolutions and renders them as
CSV and JSON; fvcore is timed at `--fvcore-samples` resolutions spread over the whole grid and
its 1,000-resolution time projected from a fit linear in H*W (labelled as a projection).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convtally.analysis import peers  # noqa: E402
from convtally.analysis.accounting import analyse, answer_every_resolution  # noqa: E402
from convtally.analysis.export_capture import export  # noqa: E402
from convtally.analysis.formatting import render  # noqa: E402
from convtally.analysis.io import atomic_write_json, atomic_write_text  # noqa: E402
from convtally.models.registry import resolve, with_builder_keywords  # noqa: E402

SEEDS = ["poolupsample", "convtranspose", "unet"]
TORCHVISION = [
    "torchvision:resnet18",
    "torchvision:resnet50",
    "torchvision:efficientnet_b0",
    "torchvision:densenet121",
    "torchvision:mobilenet_v3_large",
    "torchvision:convnext_tiny",
    "torchvision:regnet_y_400mf",
    "torchvision:vgg16",
]
TIMM = ["timm:selecsls42", "timm:convnext_atto", "timm:efficientnet_b0", "timm:hrnet_w18"]
DEFAULT_MODELS = [*SEEDS, *TORCHVISION, *TIMM, "torchvision:deeplabv3_resnet101@520"]


def model_and_side(entry: str) -> tuple[str, dict[str, int], int]:
    """Return (model, settings, side) of 'NAME[,KEY=VALUE...]@SIDE' (side 32 for the seed
    networks, 224 otherwise); the settings are --set's (torchvision:vit_h_14,image_size=518@518
    builds the ViT at its published crop, as `--set image_size=518` does)."""
    name, _, side = entry.rpartition("@") if "@" in entry else (entry, "", "")
    name, *pairs = name.split(",")
    settings = {key: int(value) for key, _, value in (pair.partition("=") for pair in pairs)}
    return name, settings, int(side) if side else (32 if ":" not in name else 224)


def analyse_at(model, side: int, settings: dict[str, int] | None = None
               ) -> tuple[str, dict[str, list[int]]]:
    """Return (the capture used, the totals) of `model` at side x side, as `convtally table
    --res side [--set ...]` answers."""
    sizes = [(side, side)]
    analysis = answer_every_resolution(  # sizes given, as the CLI gives --res: a model with a
        analyse(model, settings, resolutions=sizes), sizes,  # fixed size (vit) is counted there
        lambda: analyse(model, settings, exact=True, resolutions=sizes),
    )
    return analysis.capture, analysis.totals_at(sizes)


def fvcore_total(network, x) -> int:
    """Return fvcore's FlopCountAnalysis(network, x).total(), its warnings off."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(peers.fvcore_counter(network, x).total())


def timed(function) -> tuple[float, object]:
    """Return (seconds, result) of function(), the garbage of earlier calls collected first
    (untimed): analyse pauses the cyclic collector, and what it leaves must not be collected
    inside the next call's time, fvcore's or ours."""
    gc.collect()
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure_model(entry: str, rounds: int) -> dict:
    """Return the interleaved timings of one model (medians, first round, ratios)."""
    name, settings, side = model_and_side(entry)
    spec, hyperparameters = with_builder_keywords(resolve(name), settings)
    network = spec.build(hyperparameters).eval()
    x = torch.zeros(1, spec.input_channel_count(hyperparameters), side, side)
    times: dict[str, list[float]] = {"built": [], "by_name": [], "fvcore": []}
    totals = fvcore = capture = None
    for round_index in range(rounds):
        steps = [
            ("built", lambda: analyse_at(network, side)),
            ("by_name", lambda: analyse_at(name, side, settings)),
            ("fvcore", lambda: fvcore_total(network, x)),
        ]
        shift = round_index % len(steps)  # rotate the order so none always runs first
        for key, step in steps[shift:] + steps[:shift]:
            seconds, result = timed(step)
            times[key].append(seconds)
            if key == "fvcore":
                fvcore = result
            else:
                capture, totals = result
    if capture == "export":  # PyTorch's own part of the rung, which no rule can speed up
        for _ in range(rounds):
            seconds, _ = timed(lambda: export(network, x.shape[1], (side, side), dynamic=True))
            times.setdefault("torch_export", []).append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    # the first measurement of each (round 0 runs them in the order built, by name, fvcore)
    first = {key: values[0] for key, values in times.items()}
    return {
        "model": spec.name,
        "resolution": f"{side}x{side}",
        "capture": capture,
        "rounds": rounds,
        "seconds_median": {k: round(v, 4) for k, v in median.items()},
        "seconds_first": {k: round(v, 4) for k, v in first.items()},
        "seconds_all": {k: [round(v, 4) for v in values] for k, values in times.items()},
        "ratio_built_to_fvcore": round(median["built"] / median["fvcore"], 3),
        "ratio_by_name_to_fvcore": round(median["by_name"] / median["fvcore"], 3),
        **({"ratio_torch_export_to_fvcore": round(median["torch_export"] / median["fvcore"], 3)}
           if "torch_export" in median else {}),
        "connections": totals["connections"][0],
        "fvcore_total": fvcore,
    }


def sweep_resolutions(step: int, count: int = 1000) -> list[tuple[int, int]]:
    """Return `count` resolutions: H over 50 multiples of `step`, W over count/50 of them."""
    return [(step * (8 + i % 50), step * (8 + i // 50)) for i in range(count)]


def spread_sample(resolutions: list, count: int) -> list:
    """Return `count` resolutions spread evenly over the whole list (first and last included),
    so the sample covers every H and W, not one row of the grid."""
    if count >= len(resolutions):
        return list(resolutions)
    if count == 1:
        return [resolutions[len(resolutions) // 2]]
    return [resolutions[round(i * (len(resolutions) - 1) / (count - 1))] for i in range(count)]


def measure_sweep(model: str, samples: int, rounds: int) -> dict:
    """Return the 1,000-resolution sweep's timings: analysis, evaluation, CSV, JSON, fvcore."""
    analysis_seconds, analysis = timed(lambda: analyse(model))
    resolutions = sweep_resolutions(analysis.divisor[0])
    first_evaluation, _ = timed(lambda: analysis.evaluate(resolutions))
    runs: dict[str, list[float]] = {"evaluate": [], "csv": [], "json": []}
    sizes = {}
    for _ in range(rounds):
        runs["evaluate"].append(timed(lambda: analysis.evaluate(resolutions))[0])
        for fmt in ("csv", "json"):
            seconds, text = timed(lambda fmt=fmt: render(analysis, resolutions, fmt))
            runs[fmt].append(seconds)
            sizes[fmt] = len(text)
    network = resolve(model).build().eval()
    sample = spread_sample(resolutions, samples)
    fvcore_times = []
    for height, width in sample:
        x = torch.zeros(1, 3, height, width)
        fvcore_times.append(timed(lambda x=x: fvcore_total(network, x))[0])
    pixels = np.array([h * w for h, w in sample], dtype=float)
    if len(sample) == len(resolutions):
        fvcore_all, how = sum(fvcore_times), "measured at every resolution"
    else:  # a fit a + b*H*W over the sample, summed over all 1,000 resolutions
        slope, intercept = np.polyfit(pixels, np.array(fvcore_times), 1)
        every = np.array([h * w for h, w in resolutions], dtype=float)
        fvcore_all = float(np.sum(intercept + slope * every))
        how = f"projected from {len(sample)} resolutions by a fit linear in H*W"
    return {
        "model": model,
        "layers": len(analysis.layers),
        "resolutions": len(resolutions),
        "resolution_range": f"{resolutions[0][0]}x{resolutions[0][1]} to "
        f"{resolutions[-1][0]}x{resolutions[-1][1]}",
        "analysis_seconds": round(analysis_seconds, 3),
        "evaluate_seconds_first_call": round(first_evaluation, 3),
        "evaluate_seconds": round(statistics.median(runs["evaluate"]), 4),
        "render_csv_seconds": round(statistics.median(runs["csv"]), 3),
        "render_json_seconds": round(statistics.median(runs["json"]), 3),
        "render_bytes": sizes,
        "fvcore_sample": [f"{h}x{w}" for h, w in sample],
        "fvcore_sample_seconds": [round(t, 3) for t in fvcore_times],
        "fvcore_1000_seconds": round(fvcore_all, 1),
        "fvcore_1000": how,
    }


def command_seconds(argv: list[str], rounds: int) -> list[float]:
    """Return the wall seconds of each of `rounds` runs of `argv` (output discarded)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return times


def measure_startup(rounds: int) -> dict:
    """Return the medians of the command-line timings, interleaved, with the interpreter's."""
    executable = shutil.which("convtally", path=str(Path(sys.executable).parent)) or "convtally"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch, torchvision'": [
            sys.executable, "-c", "import torch, torchvision"
        ],
        "convtally --help": [executable, "--help"],
        "convtally padding --kernel 5": [executable, "padding", "--kernel", "5"],
        "convtally table torchvision:resnet50 --res 224": [
            executable, "table", "torchvision:resnet50", "--res", "224"
        ],
    }
    runs: dict[str, list[float]] = {key: [] for key in commands}
    for _ in range(rounds):
        for key, argv in commands.items():
            runs[key] += command_seconds(argv, 1)
    return {key: round(statistics.median(values), 3) for key, values in runs.items()}


def load_average() -> float | None:
    """Return the 1-minute load average (None where the OS does not tell)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        metavar="MODEL[,KEY=VALUE...][@SIDE]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep-model", default="torchvision:deeplabv3_resnet101")
    parser.add_argument("--fvcore-samples", type=int, default=10,
                        help="resolutions of the sweep fvcore is timed at (1000: all)")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--name", default="analysis_speed",
                        help="the report's file stem in --out (default analysis_speed)")
    parser.add_argument("--title", default="Analysis speed: convtally vs fvcore")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the command-line runs
    load_before = load_average()
    started = time.perf_counter()

    models = []
    for entry in args.models:
        try:
            models.append(measure_model(entry, args.rounds))
        except Exception as error:  # one model's failure is reported, the others still run
            models.append({"model": entry, "error": f"{type(error).__name__}: {error}"[:300]})
        print(_model_line(models[-1]), flush=True)
    sweep = None if args.skip_sweep else measure_sweep(
        args.sweep_model, args.fvcore_samples, args.rounds
    )
    startup = None if args.skip_startup else measure_startup(args.rounds)

    result = {
        "benchmark": "analysis_speed",
        "title": args.title,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": load_average()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python benchmarks/analysis_speed.py " + " ".join(sys.argv[1:]),
        "seconds_total": round(time.perf_counter() - started, 1),
        "models": models,
        "sweep": sweep,
        "startup_seconds_median": startup,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", result)
    text = markdown(result)
    atomic_write_text(args.out / f"{args.name}.md", text)
    print(text)
    return 0


def summary_lines(models: list[dict]) -> list[str]:
    """Return one line per capture: how many models are at most half of fvcore's time (the
    fx and concrete rungs' target) or within 3x (the export rung's), the median and worst."""
    lines = []
    measured = [m for m in models if "error" not in m]
    for capture in ("fx", "concrete", "export"):
        rows = [m for m in measured if m.get("capture", "fx") == capture]
        if not rows:
            continue
        ratios = sorted(m["ratio_built_to_fvcore"] for m in rows)
        by_name = sorted(m["ratio_by_name_to_fvcore"] for m in rows)
        limit = 3.0 if capture == "export" else 0.5
        within = sum(r <= limit for r in ratios)
        worst = max(rows, key=lambda m: m["ratio_built_to_fvcore"])
        lines.append(
            f"- {capture}: {len(rows)} models, built at most {limit:g}x fvcore's time: "
            f"{within} of {len(rows)}; built / fvcore median {ratios[len(ratios) // 2]:.2f}, "
            f"worst {worst['ratio_built_to_fvcore']:.2f} ({worst['model']}); by name / fvcore "
            f"median {by_name[len(by_name) // 2]:.2f}, worst {by_name[-1]:.2f}"
        )
        floors = sorted(m["ratio_torch_export_to_fvcore"] for m in rows
                        if "ratio_torch_export_to_fvcore" in m)
        if floors:
            lines.append(
                f"  - torch.export alone (`torch.export.export` with dynamic H, W, as the rung "
                f"calls it, timed after the rounds) / fvcore: median "
                f"{floors[len(floors) // 2]:.2f}, least {floors[0]:.2f}, most {floors[-1]:.2f}"
            )
    failed = [m["model"] for m in models if "error" in m]
    if failed:
        lines.append(f"- failed: {', '.join(failed)}")
    return lines


def _model_line(row: dict) -> str:
    if "error" in row:
        return f"{row['model']}: {row['error']}"
    median = row["seconds_median"]
    return (f"{row['model']} @{row['resolution']} ({row['capture']}): built "
            f"{median['built']:.3f} s, by name "
            f"{median['by_name']:.3f} s, fvcore {median['fvcore']:.3f} s")


def markdown(result: dict) -> str:
    """Return the report as Markdown."""
    load = result["load_average_1min"]
    lines = [
        f"# {result.get('title', 'Analysis speed: convtally vs fvcore')}",
        "",
        f"Measured {result['date']} on {result['machine']}, {result['torch_threads']} torch "
        f"thread(s), 1-minute load average {load['before']} before and {load['after']} after "
        f"(torch {result['torch']}, Python {result['python']}); command "
        f"`{result['command']}`, {result['seconds_total']} s in all.",
        "",
        "One resolution, in one process, medians of interleaved rounds. *built*: "
        "`analyse(network)` and the totals, the network built once and reused, as fvcore is "
        "given it; *by name*: `analyse(\"NAME\")` and the totals, the network built from its "
        "name; *fvcore*: `FlopCountAnalysis(network, x).total()`; `gc.collect()` (untimed) "
        "before each. Ratios below 1 are faster "
        "than fvcore; *first* is the first round (nothing remembered yet from that model).",
        "",
        *summary_lines(result["models"]),
        "",
        "| model | resolution | capture | built (s) | by name (s) | fvcore (s) | built / fvcore | "
        "by name / fvcore | first: built, by name (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["models"]:
        if "error" in row:
            lines.append(f"| {row['model']} | | | | | | | | failed: {row['error'][:80]} |")
            continue
        median, first = row["seconds_median"], row["seconds_first"]
        lines.append(
            f"| {row['model']} | {row['resolution']} | {row.get('capture', '')} | "
            f"{median['built']:.3f} | "
            f"{median['by_name']:.3f} | {median['fvcore']:.3f} | "
            f"{row['ratio_built_to_fvcore']:.2f} | {row['ratio_by_name_to_fvcore']:.2f} | "
            f"{first['built']:.3f}, {first['by_name']:.3f} |"
        )
    floors = [row for row in result["models"] if "torch_export" in row.get("seconds_median", {})]
    if floors:
        lines += ["", "The export rung's floor: torch.export alone, medians of the same number "
                  "of calls, after the rounds.", "",
                  "| model | torch.export (s) | fvcore (s) | torch.export / fvcore | "
                  "built / fvcore |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {row['model']} | {row['seconds_median']['torch_export']:.3f} | "
                  f"{row['seconds_median']['fvcore']:.3f} | "
                  f"{row['ratio_torch_export_to_fvcore']:.2f} | "
                  f"{row['ratio_built_to_fvcore']:.2f} |" for row in floors]
    sweep = result["sweep"]
    if sweep:
        lines += [
            "",
            f"## {sweep['resolutions']:,} resolutions: {sweep['model']} ({sweep['layers']} "
            f"layers, {sweep['resolution_range']})",
            "",
            "| step | seconds |",
            "|---|---:|",
            f"| symbolic analysis (from the name) | {sweep['analysis_seconds']:.3f} |",
            f"| evaluate every formula at {sweep['resolutions']:,} resolutions (first call, "
            f"compiling) | {sweep['evaluate_seconds_first_call']:.3f} |",
            f"| evaluate every formula at {sweep['resolutions']:,} resolutions | "
            f"{sweep['evaluate_seconds']:.4f} |",
            f"| evaluate and render as CSV ({sweep['render_bytes']['csv']:,} bytes) | "
            f"{sweep['render_csv_seconds']:.3f} |",
            f"| evaluate and render as JSON ({sweep['render_bytes']['json']:,} bytes) | "
            f"{sweep['render_json_seconds']:.3f} |",
            f"| fvcore at {sweep['resolutions']:,} resolutions ({sweep['fvcore_1000']}) | "
            f"{sweep['fvcore_1000_seconds']:.1f} |",
        ]
    startup = result["startup_seconds_median"]
    if startup:
        lines += ["", "## Command start-up (median wall seconds, subprocesses)", "",
                  "| command | seconds |", "|---|---:|"]
        lines += [f"| `{command}` | {seconds:.3f} |" for command, seconds in startup.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
