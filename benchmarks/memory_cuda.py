"""Memory on CUDA: our formulas next to what PyTorch allocates on the GPU (issue 14).

For each model and size: the bytes saved for backward (ours against autograd's
saved_tensors_hooks on CUDA), the inference peak (ours against torch.cuda.max_memory_allocated
over a no_grad forward pass, input included, parameters left out) and the peak of one SGD
training step (ours against max_memory_allocated over the step, parameters, buffers and
optimizer state included). Our formulas model PyTorch's CPU kernels (oneDNN workspaces,
dropout's noise tensor); CUDA keeps other workspaces (cuDNN), so the ratios say how far the
CPU model carries to a GPU. Needs CUDA; refuses in one line (exit 2) without it.

    python benchmarks/memory_cuda.py --out reports/gpu    # writes memory_cuda.{md,json}
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from convtally.analysis.accounting import analyse  # noqa: E402
from convtally.analysis.limits import format_bytes  # noqa: E402
from convtally.analysis.memory import measure_saved, memory_model  # noqa: E402

CASES = (
    ("poolupsample", 8, 32), ("convtranspose", 8, 32), ("unet", 8, 32),
    ("poolupsample", 64, 64), ("unet", 64, 64),
    ("torchvision:resnet18", 8, 224), ("torchvision:resnet50", 8, 224),
    ("torchvision:vgg16", 4, 224), ("torchvision:mobilenet_v2", 8, 224),
)


def measure(network: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    """Return the measured saved, inference-peak and training-peak bytes on CUDA."""
    runner = copy.deepcopy(network).cuda().eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        runner(torch.zeros(*shape, device="cuda"))
    torch.cuda.synchronize()
    inference = torch.cuda.max_memory_allocated() - base

    runner.train()
    optimizer = torch.optim.SGD(runner.parameters(), lr=1e-3)

    def step() -> None:
        output = runner(torch.randn(*shape, device="cuda"))
        output = output["out"] if isinstance(output, dict) else output
        output.float().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step allocates what later steps reuse
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    training = torch.cuda.max_memory_allocated()
    saved, _ = measure_saved(runner, torch.randn(*shape, device="cuda"))
    return {"saved": saved, "inference": inference, "training": training}


def run_case(name: str, batch: int, side: int) -> dict:
    """Return one row: ours and measured for one model at one batch and square size."""
    analysis = analyse(name)
    channels = int(analysis.input_channels.subs(analysis.substitutions()))
    result = memory_model(analysis, "float32", "sgd").evaluate([(batch, side, side)])
    ours = {"saved": int(result["totals"]["saved"][0]),
            "inference": int(result["inference_peak"][0]),
            "training": int(result["training_peak"][0])}
    measured = measure(analysis.network, (batch, channels, side, side))
    return {"model": name, "batch": batch, "resolution": side,
            **{f"ours_{k}": v for k, v in ours.items()},
            **{f"measured_{k}": v for k, v in measured.items()}}


def render(rows: list[dict], facts: dict) -> str:
    """Return the Markdown report."""
    lines = [
        "# Memory on CUDA: the formulas against torch.cuda.max_memory_allocated",
        "",
        f"Measured {facts['date']} on {facts['device']} (torch {facts['torch']}, CUDA "
        f"{facts['cuda']}); command `{facts['command']}`. float32, SGD. Saved: bytes autograd "
        "keeps for backward (saved_tensors_hooks, each storage once, parameters left out). "
        "Inference: peak over a no_grad forward pass, input included, parameters left out. "
        "Training: peak over one training step, parameters, buffers and optimizer state "
        "included. Ratios are measured / ours.",
        "",
        "| model | B | size | saved ours | saved measured | ratio | inference ours | "
        "inference measured | ratio | training ours | training measured | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["model"], str(row["batch"]), f"{row['resolution']}x{row['resolution']}"]
        for part in ("saved", "inference", "training"):
            ours, measured = row[f"ours_{part}"], row[f"measured_{part}"]
            cells += [format_bytes(ours), format_bytes(measured),
                      f"{measured / ours:.3f}" if ours else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Our formulas model PyTorch's CPU kernels (oneDNN's blocked copies, the CPU "
              "dropout's noise tensor); on CUDA, cuDNN's workspaces and the caching "
              "allocator's rounding of each block to 512 bytes are not modelled."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every case on CUDA and write OUT/memory_cuda.{md,json}; exit 2 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu", metavar="DIR")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("memory_cuda: error: no CUDA device; run it on a GPU machine "
              "(the CPU figures are benchmarks/memory.py's)", file=sys.stderr)
        return 2
    facts = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "cuda": torch.version.cuda, "host": platform.platform(),
        "command": "python benchmarks/memory_cuda.py " + " ".join(sys.argv[1:]),
    }
    rows = []
    for name, batch, side in CASES:
        row = run_case(name, batch, side)
        rows.append(row)
        print(f"{name} B={batch} {side}x{side}: training measured/ours "
              f"{row['measured_training'] / row['ours_training']:.3f}, saved "
              f"{row['measured_saved']} vs {row['ours_saved']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_cuda.json").write_text(json.dumps({**facts, "rows": rows}, indent=2))
    (args.out / "memory_cuda.md").write_text(render(rows, facts))
    print(f"wrote {args.out / 'memory_cuda.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
