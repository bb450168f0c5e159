"""Benchmark: training memory from the formulas next to torchinfo's estimate and a measurement.

    .venv/bin/python benchmarks/memory.py [--out reports/benchmarks]

For each model (the seed networks, resnet18, resnet50, vgg16, mobilenet_v2, densenet121, the
DeepLabV3 fine-tune; SGD, float32, CPU)
it writes our training peak, torchinfo's "Estimated Total Size", and the training step's peak
measured with PyTorch's profiler memory events; our saved-for-backward bytes next to what
autograd saves (saved_tensors_hooks); our inference peak next to the profiler's. Then it times
--budget at 100 resolutions from the formulas against one real training step per resolution,
and checks one --budget answer by running a step at that batch and at the next size up.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convtally.analysis.accounting import analyse  # noqa: E402
from convtally.analysis.io import atomic_write_json, atomic_write_text  # noqa: E402
from convtally.analysis.limits import format_bytes  # noqa: E402
from convtally.analysis.memory import (  # noqa: E402
    largest_batch,
    measure_forward_peak,
    measure_saved,
    measure_training_peak,
    memory_model,
)

MODELS = (
    ("poolupsample", 8, 32),
    ("convtranspose", 8, 32),
    ("unet", 8, 32),
    ("torchvision:resnet18", 4, 64),
    ("torchvision:resnet50", 4, 64),
    ("torchvision:vgg16", 2, 64),
    ("torchvision:mobilenet_v2", 4, 96),
    ("torchvision:densenet121", 2, 64),
    ("deeplabv3_flowers", 2, 224),  # the write-up's fine-tune: only classifier.4 trains
    ("deeplabv3_flowers", 8, 224),
)
MIB = 2**20


def torchinfo_estimate(network: torch.nn.Module, shape: tuple[int, ...]) -> int | None:
    """Return torchinfo's "Estimated Total Size" in bytes (input + 2 x outputs + parameters)."""
    try:
        from torchinfo import summary
    except ImportError:
        return None
    stats = summary(network, input_size=shape, verbose=0, device="cpu")
    return int(stats.total_input + stats.total_output_bytes + stats.total_param_bytes)


def compare_model(name: str, batch: int, side: int) -> dict:
    """Return ours, torchinfo's and the measured figures for one model at one size."""
    analysis = analyse(name)
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    shape = (batch, channels, side, side)
    model = memory_model(analysis, "float32", "sgd")
    result = model.evaluate([(batch, side, side)])
    saved_autograd, _ = measure_saved(analysis.network, torch.randn(*shape))
    row = {
        "model": name, "batch": batch, "resolution": side,
        "ours_training": result["training_peak"][0],
        "training_at": result["training_at"][0],
        "ours_bound": model.values(model.training_bound(), [(batch, side, side)])[0],
        "torchinfo_total": torchinfo_estimate(analysis.network, shape),
        "measured_training": measure_training_peak(analysis.network, shape, "sgd"),
        "ours_saved": result["totals"]["saved"][0],
        "autograd_saved": saved_autograd,
        "ours_inference": result["inference_peak"][0],
        "inference_layer": result["inference_layer"][0],
        "measured_inference": measure_forward_peak(analysis.network, shape),
        "dominant": max(model.breakdown(batch, side, side), key=lambda p: p[1])[0],
    }
    return row


def budget_timing(name: str, budget: int) -> dict:
    """Return the time --budget takes at 100 resolutions, and one B=2 step per resolution
    (formulas with floor() kept, so every size 32, 40, ... 824 is answered)."""
    analysis = analyse(name, exact=True)
    start = time.perf_counter()
    model = memory_model(analysis, "float32", "sgd")
    sides = [32 + 8 * i for i in range(100)]
    answers = [largest_batch(model, budget, s, s) for s in sides]
    formula_seconds = time.perf_counter() - start
    network = analysis.network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    start = time.perf_counter()
    for side in sides:
        network(torch.randn(2, 3, side, side)).mean().backward()  # BatchNorm needs B > 1
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trial_seconds = time.perf_counter() - start
    network.eval()
    return {"model": name, "budget": budget, "resolutions": f"{sides[0]}..{sides[-1]} step 8",
            "formula_seconds": formula_seconds, "trial_seconds": trial_seconds,
            "answers": dict(zip(map(str, sides), answers))}


def budget_check(name: str, side: int, budget: int) -> dict:
    """Run a training step at the --budget answer and at the next batch size up."""
    analysis = analyse(name)
    model = memory_model(analysis, "float32", "sgd")
    batch = largest_batch(model, budget, side, side)
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    measured = [measure_training_peak(analysis.network, (b, channels, side, side), "sgd")
                for b in (batch, batch + 1)]
    ours = model.evaluate([(batch, side, side), (batch + 1, side, side)])["training_peak"]
    return {"model": name, "resolution": side, "budget": budget, "answer": batch,
            "ours": ours, "measured": measured,
            "answer_fits": measured[0] <= budget, "next_exceeds": measured[1] > budget}


def render(rows: list[dict], timing: dict, checks: list[dict], command: str) -> str:
    """Return the Markdown report."""
    device = (f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), "
              f"torch {torch.__version__}")
    lines = [
        "# Memory: the formulas against torchinfo and a measurement",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device}",
        f"- command: `{command}`",
        "- ours: parameters + buffers + SGD state (none) + the most alive at one moment of the "
        "step, by liveness over the captured graph: a layer's forward (what earlier layers keep "
        "for backward stays alive), a layer's backward (what the layers not yet run keep, the "
        "gradients made so far, its output and input gradients with oneDNN's blocked copies, "
        "the output) or the optimizer step; 'sum' is the simple bound that counts every "
        "gradient and saved activation at once; measured: what a step holds before it starts "
        "plus the profiler's peak of its allocations "
        "(`torch.profiler.profile(profile_memory=True)`, CPU)",
        "- torchinfo: `summary(...)` Estimated Total Size = input + forward/backward pass size "
        "(twice the layers' outputs) + parameters; no gradients, no optimizer, no account of "
        "what autograd really keeps",
        "",
        "| model | B | res | ours training | training peak at | sum | torchinfo | measured | "
        "ours/measured | sum/measured | torchinfo/measured | saved: ours = autograd | "
        "inference ours | inference measured | measured/ours | inference peak at | dominant |",
        "|:--|--:|--:|--:|:--|--:|--:|--:|--:|--:|--:|:--|--:|--:|--:|:--|:--|",
    ]
    lines += [_row(row) for row in rows]
    lines += [
        "",
        "Gaps, explained: the sum counts every gradient and every saved activation at once, "
        "but autograd frees what a layer keeps once that layer has run backward, and the "
        "gradients of the early layers appear last; the liveness figure follows that order. "
        "The convolution rules follow oneDNN's blocked layouts, channels padded to its 16-"
        "channel block (this machine has AVX-512; with AVX2 the block is 8): backward reorders "
        "the output and input gradients; forward copies the input (not with 1 to 3 input "
        "channels), the weight and the output, then writes the plain output. A module's "
        "caller holds the tensor it passed in until the module returns (eager Python), so the "
        "inference liveness keeps it too. What remains: UNet.forward keeps block0's output in "
        "the local variable x_1 until it returns, where the graph frees it after the "
        "concatenation (the whole UNet gap; tests/analysis/test_memory.py checks it to the "
        "byte, give or take a conv bias's 256-byte blocked copy; the test allows 1 KiB). "
        "DeepLabV3 at B=2: the peak falls in the "
        "ASPP's dilated 3x3 convolutions (dilation 12-36 on a 28x28 map), which oneDNN runs "
        "without reordering the input (the profiler shows no input copy there), so ours is "
        "above the measurement; at B=8 the peak is in the backbone, where the rules hold.",
        "",
        f"## --budget at 100 resolutions: {timing['model']}, "
        f"{format_bytes(timing['budget'])}, {timing['resolutions']}",
        "",
        f"- from the formulas (model built once, exact integer search per resolution): "
        f"{timing['formula_seconds']:.2f} s",
        f"- one real training step at B=2 per resolution (a lower bound for a trial search, "
        f"which needs several per resolution): {timing['trial_seconds']:.1f} s",
        "- answers at 32, 256, 512, 824: " + ", ".join(
            f"{s}: B={timing['answers'][s]}" for s in ("32", "256", "512", "824")
            if s in timing["answers"]),
        "",
        "## One --budget answer, run",
        "",
        "| model | res | budget | largest batch | ours at B, B+1 | measured at B, B+1 "
        "| B fits | B+1 exceeds |",
        "|:--|--:|--:|--:|--:|--:|:--|:--|",
    ]
    for check in checks:
        lines.append(
            f"| {check['model']} | {check['resolution']} | {format_bytes(check['budget'])} "
            f"| {check['answer']} | {', '.join(format_bytes(v) for v in check['ours'])} "
            f"| {', '.join(format_bytes(v) for v in check['measured'])} "
            f"| {check['answer_fits']} | {check['next_exceeds']} |"
        )
    lines += [
        "",
        "A --budget answer is as good as the training peak it solves; tests/analysis/"
        "test_memory.py runs the same check (a step at the answer fits, one at the next batch "
        "does not) on every test run.",
    ]
    return "\n".join(lines) + "\n"


def _row(row: dict) -> str:
    torchinfo = row["torchinfo_total"]
    measured = row["measured_training"]
    return (
        f"| {row['model']} | {row['batch']} | {row['resolution']} "
        f"| {format_bytes(row['ours_training'])} | {row['training_at']} "
        f"| {format_bytes(row['ours_bound'])} "
        f"| {format_bytes(torchinfo) if torchinfo else 'n/a'} | {format_bytes(measured)} "
        f"| {row['ours_training'] / measured:.3f} | {row['ours_bound'] / measured:.3f} "
        f"| {f'{torchinfo / measured:.3f}' if torchinfo else 'n/a'} "
        f"| {row['ours_saved'] == row['autograd_saved']} ({format_bytes(row['ours_saved'])}) "
        f"| {format_bytes(row['ours_inference'])} | {format_bytes(row['measured_inference'])} "
        f"| {row['measured_inference'] / row['ours_inference']:.3f} "
        f"| {row['inference_layer']} | {row['dominant']} |"
    )


def main() -> int:
    """Run the benchmark and write reports/benchmarks/memory.md and memory.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, batch, side in MODELS:
        print(f"{name} B={batch} @{side} ...", file=sys.stderr)
        rows.append(compare_model(name, batch, side))
    print("budget timing ...", file=sys.stderr)
    timing = budget_timing("torchvision:resnet18", 24 * 2**30)
    print("budget checks ...", file=sys.stderr)
    checks = [budget_check("torchvision:resnet18", 224, 256 * MIB),
              budget_check("unet", 256, 256 * MIB)]
    command = "python " + " ".join(sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "memory.md", render(rows, timing, checks, command))
    atomic_write_json(args.out / "memory.json",
                      {"rows": rows, "budget_timing": timing, "budget_checks": checks})
    print(f"wrote {args.out / 'memory.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
