"""`convtally report`: regenerate every generated part of reports/ from scratch.

Everything is built in a staging folder first; only when every step succeeded are the
generated folders swapped in, so a failed run leaves the previous reports as they were.
Training results (reports/training) and benchmarks (reports/benchmarks) are written by their
own commands; the report indexes them and puts their accuracy next to the costs.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from convtally.analysis.accounting import analyse
from convtally.analysis.compare import compare, find_runs, render_comparison
from convtally.analysis.figures import (
    accuracy_vs_connections,
    connections_vs_resolution,
    memory_vs_batch,
    per_layer_connections,
)
from convtally.analysis.formatting import render
from convtally.analysis.handcheck import check_table, read_hand_table, render_check
from convtally.analysis.io import atomic_write_text
from convtally.analysis.limits import format_bytes
from convtally.analysis.memory import memory_model, memory_table, render_memory
from convtally.analysis.verification import render_verification, verify
from tqdm import tqdm

SEED_MODELS = ("poolupsample", "convtranspose", "unet")
GENERATED = ("costs", "memory", "comparison", "check", "figures", "verification")
MEMORY_BATCHES = (1, 8, 100)  # 100: the write-up's training batch
SEGMENTATION_BATCHES = (2, 8)  # ASPP pooling BatchNorm (1x1) cannot train at B=1
HAND_TABLES = (  # package data: they ship in the wheel
    Path(__file__).resolve().parent / "tables" / "writeup_table_32.csv",
    Path(__file__).resolve().parent / "tables" / "writeup_table_64.csv",
)


def build_report(out: Path = Path("reports"), segmentation: bool = True) -> list[str]:
    """Regenerate the generated folders of `out` and its README; return the index lines."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _recover(out)
        return _build_report(out, segmentation)


@contextmanager
def _exclusive(out: Path):
    """Hold an exclusive lock on `out` (the kernel drops it when the process dies)."""
    descriptor = os.open(out, os.O_RDONLY)  # the folder itself: no lock file is left behind
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another convtally report is writing {out}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _recover(out: Path) -> None:
    """Remove what a killed run left: staging folders, and put back folders a killed swap moved."""
    for leftover in sorted(out.glob(".old-*")):
        for name in GENERATED:
            if (leftover / name).exists() and not (out / name).exists():
                os.replace(leftover / name, out / name)
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in out.glob(".staging-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _build_report(out: Path, segmentation: bool) -> list[str]:
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    index: list[str] = []
    steps = [
        ("cost tables", lambda: _costs(staging, index)),
        (
            "DeepLabV3 fine-tune costs",
            lambda: _segmentation_costs(staging, index)
            if segmentation
            else _keep_segmentation_costs(out, staging, index),
        ),
        ("memory", lambda: _memory(staging, index, out, segmentation)),
        ("comparison", lambda: _comparison(staging, index, out)),
        ("hand-table check", lambda: _hand_check(staging, index)),
        ("verification", lambda: _verification(staging, index)),
    ]
    try:
        for name, step in tqdm(steps, desc="convtally report", unit="step", disable=None):
            tqdm.write(f"  {name}")
            step()
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    lines = _readme(out, index, today, machine)
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    return lines


def _costs(staging: Path, index: list[str]) -> None:
    resolutions = [(32, 32), (64, 64)]
    analyses = []
    for model in SEED_MODELS:
        analysis = analyse(model)
        analyses.append(analysis)
        for fmt, suffix in (
            ("csv", "csv"),
            ("markdown", "md"),
            ("latex", "tex"),
            ("json", "json"),
            ("text", "txt"),
        ):
            atomic_write_text(
                staging / "costs" / f"{model}.{suffix}", render(analysis, resolutions, fmt)
            )
        per_layer_connections(
            analysis, (32, 32), staging / "figures" / f"per_layer_connections_{model}"
        )
        index.append(
            f"- `costs/{model}.{{csv,md,tex,json,txt}}`: per-layer weights, outputs and "
            f"connections with formulas at 32x32 and 64x64 "
            f"(`convtally table {model} --res 32 64 --format FMT`); "
            f"`figures/per_layer_connections_{model}.{{png,pdf}}`"
        )
    connections_vs_resolution(
        analyses, [32, 64, 128, 256], staging / "figures" / "connections_vs_resolution"
    )
    index.append(
        "- `figures/connections_vs_resolution.{png,pdf}`: total connections of the "
        "three networks, 32 to 256 pixels, log-log"
    )


def _segmentation_costs(staging: Path, index: list[str]) -> None:
    analysis = analyse("deeplabv3_flowers")
    learned = sum(p.numel() for p in analysis.network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in analysis.network.parameters())
    resolutions = [(224, 224), (520, 520)]
    note = (
        f"learned weights (classifier.4, the 2-class head): {learned:,} of {total:,} "
        f"({100 * learned / total:.4f} %); everything else is frozen\n\n"
    )
    atomic_write_text(
        staging / "costs" / "deeplabv3_flowers.md", note + render(analysis, resolutions, "markdown")
    )
    for fmt, suffix in (("csv", "csv"), ("json", "json"), ("latex", "tex")):
        atomic_write_text(
            staging / "costs" / f"deeplabv3_flowers.{suffix}",
            render(analysis, resolutions, fmt, "values" if fmt == "latex" else "both"),
        )
    index.append(
        f"- `costs/deeplabv3_flowers.{{csv,md,tex,json}}`: the write-up's DeepLabV3-"
        f"ResNet101 fine-tune at 224x224 and 520x520 ({len(analysis.layers)} layers; "
        f"{total:,} weights of which {learned:,} learned) "
        "(`convtally table deeplabv3_flowers --res 224 520`)"
    )


def _keep_segmentation_costs(out: Path, staging: Path, index: list[str]) -> None:
    """Carry the previous DeepLabV3 tables over unchanged (--skip-segmentation)."""
    kept = sorted((out / "costs").glob("deeplabv3_flowers.*"))
    for path in kept:
        (staging / "costs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / "costs" / path.name)
    if kept:
        index.append("- `costs/deeplabv3_flowers.{csv,md,tex,json}`: kept from an earlier "
                     "`convtally report` (this run had --skip-segmentation)")


def _memory(staging: Path, index: list[str], out: Path, segmentation: bool) -> None:
    """Memory tables of the seed networks and the DeepLabV3 fine-tune, and the batch figure."""
    for model in SEED_MODELS:
        data = memory_table(model, [(32, 32), (64, 64)], MEMORY_BATCHES)
        for fmt, suffix in (("markdown", "md"), ("csv", "csv"), ("json", "json")):
            atomic_write_text(staging / "memory" / f"{model}.{suffix}", render_memory(data, fmt))
    batches = " ".join(map(str, MEMORY_BATCHES))
    index.append(
        "- `memory/{poolupsample,convtranspose,unet}.{md,csv,json}`: bytes per layer (parameters, "
        "gradients, optimizer state, activations saved for backward) as formulas in B, H, W, and "
        f"the training and inference peaks at B = {batches.replace(' ', ', ')} and 32x32, 64x64 "
        f"(`convtally memory MODEL --res 32 64 --batch {batches}`); float32, SGD"
    )
    if segmentation:
        data = memory_table("deeplabv3_flowers", [(224, 224), (520, 520)], SEGMENTATION_BATCHES)
        for fmt, suffix in (("markdown", "md"), ("json", "json")):
            atomic_write_text(staging / "memory" / f"deeplabv3_flowers.{suffix}",
                              render_memory(data, fmt))
        peaks = data["totals"]["training_peak"]["values"]
        gradients = data["totals"]["gradients"]["values"]
        first = data["points"][0]
        index.append(
            "- `memory/deeplabv3_flowers.{md,json}`: the DeepLabV3 fine-tune's memory at 224x224 "
            f"and 520x520, B = {', '.join(map(str, SEGMENTATION_BATCHES))}: only classifier.4 "
            f"trains, so gradients are {gradients[first]:,} bytes; training peak "
            + ", ".join(f"{format_bytes(v)} at {k}" for k, v in peaks.items())
            + " (`convtally memory deeplabv3_flowers --res 224 520 --batch "
            f"{' '.join(map(str, SEGMENTATION_BATCHES))}`)"
        )
    else:
        kept = sorted((out / "memory").glob("deeplabv3_flowers.*"))
        for path in kept:
            shutil.copy2(path, staging / "memory" / path.name)
        if kept:
            index.append("- `memory/deeplabv3_flowers.{md,json}`: kept from an earlier "
                         "`convtally report` (this run had --skip-segmentation)")
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    models = [memory_model(analyse(m, capture="fx")) for m in SEED_MODELS]
    memory_vs_batch(models, sizes, (32, 32), staging / "figures" / "memory_vs_batch")
    index.append(
        "- `figures/memory_vs_batch.{png,pdf}`: training peak (SGD) and inference peak of the "
        "three networks against the batch size, 1 to 256, at 32x32, float32, log-log"
    )


def _comparison(staging: Path, index: list[str], out: Path) -> None:
    run_dirs = (out / "training", Path("runs"))
    frame = compare(SEED_MODELS, [(s, s) for s in (32, 64, 128, 256)], run_dirs=run_dirs)
    for fmt, suffix in (("csv", "csv"), ("markdown", "md"), ("latex", "tex")):
        atomic_write_text(
            staging / "comparison" / f"seed_networks.{suffix}", render_comparison(frame, fmt)
        )
    runs = {m: find_runs(m, run_dirs) for m in SEED_MODELS}
    figure = accuracy_vs_connections(frame, staging / "figures" / "accuracy_vs_connections")
    line = (
        "- `comparison/seed_networks.{csv,md,tex}`: totals at 32-256 with ratios to "
        "PoolUpsampleNet (`convtally compare poolupsample convtranspose unet --res 32 64 128 "
        "256`), the write-up's accuracy as reference rows"
    )
    if any(runs.values()):
        line += ", and the accuracy measured in `training/`"
        if figure:
            index.append(line)
            index.append(
                "- `figures/accuracy_vs_connections.{png,pdf}`: validation accuracy "
                "against total connections at 32x32"
            )
            return
    else:
        line += "; no training runs yet: accuracy needs `convtally train colour --model NAME`"
    index.append(line)


def _hand_check(staging: Path, index: list[str]) -> None:
    analysis = analyse("poolupsample")
    tables = {
        "32": read_hand_table(HAND_TABLES[0])[None],
        "64": read_hand_table(HAND_TABLES[1])[None],
    }
    result = check_table(analysis, tables, [(32, 32), (64, 64)])
    for fmt, suffix in (("markdown", "md"), ("text", "txt"), ("json", "json")):
        atomic_write_text(staging / "check" / f"writeup_table.{suffix}", render_check(result, fmt))
    index.append(
        f"- `check/writeup_table.{{md,txt,json}}`: the write-up's hand-derived "
        f"PoolUpsampleNet tables checked cell by cell: {result.summary()} "
        "(`convtally check-table analysis/tables/writeup_table_32.csv "
        "analysis/tables/writeup_table_64.csv --model poolupsample --res 32 64`)"
    )


def _verification(staging: Path, index: list[str]) -> None:
    summaries = []
    for model in SEED_MODELS:
        result = verify(model, [(32, 32), (64, 64)], device="cpu")
        atomic_write_text(
            staging / "verification" / f"{model}.txt", render_verification(result, "text")
        )
        summaries.append(result.summary())
        if result.mismatches:
            raise RuntimeError(f"verification failed: {result.summary()}")
    index.append(
        "- `verification/{poolupsample,convtranspose,unet}.txt`: every formula against "
        "forward hooks, fvcore and FlopCounterMode on the CPU at 32 and 64 "
        "(`convtally verify MODEL --res 32 64 --device cpu`): "
        + "; ".join(
            s.split(" on ")[0].replace("verified ", "") + ": " + s.rsplit(": ", 1)[1]
            for s in summaries
        )
    )


def _swap_in(staging: Path, out: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=out))
    try:
        for name in GENERATED:
            if (out / name).exists():
                os.replace(out / name, trash / name)
            if (staging / name).exists():
                os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _readme(out: Path, index: list[str], today: str, machine: str) -> list[str]:
    lines = [
        "# convtally reports",
        "",
        f"Generated by `convtally report` on {today} on a {machine}, with the default "
        "convention (biases not in connections; BatchNorm parameters in weights; element-wise "
        "layers 1 connection per output). Cost tables need no data; the seed networks use the "
        "write-up's setting K=3, NIC=3, NF=32, NC=24.",
        "",
        "## Generated by `convtally report`",
        "",
        *index,
        "",
        "## Written by other commands (indexed here, not regenerated)",
        "",
    ]
    extra = []
    training = out / "training"
    for metrics in sorted(training.glob("*/metrics.json")) if training.is_dir() else []:
        import json

        data = json.loads(metrics.read_text(encoding="utf-8"))
        final = data.get("final", {})
        extra.append(
            f"- `training/{metrics.parent.name}/`: `convtally train colour --model "
            f"{data.get('model')}` ({data.get('settings', {}).get('epochs')} epochs) on "
            f"{data.get('data', {}).get('train_images')} training images "
            f"({data.get('data', {}).get('description', '')}), {data.get('device')}, finished "
            f"{data.get('finished_at', '?')}: val loss {final.get('val_loss', float('nan')):.4f},"
            f" val accuracy {100 * final.get('val_accuracy', float('nan')):.1f} %"
        )
    for summary in sorted(training.glob("*/summary.csv")) if training.is_dir() else []:
        extra.append(
            f"- `training/{summary.parent.name}/summary.{{csv,png}}`: `convtally train "
            "colour-sweep` (write-up Part B.5), final train/val loss against batch size, one "
            "run per batch size in its subfolders")
    for folder in ("benchmarks", "zoo"):  # benchmarks/*.py write both
        written = out / folder
        for path in sorted(written.glob("*.md")) if written.is_dir() else []:
            first = next(
                (ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()),
                path.stem,
            ).lstrip("# ")
            extra.append(f"- `{folder}/{path.name}`: {first}")
    gpu = out / "gpu" / "README.md"  # written by benchmarks/gpu_evidence.py
    if gpu.is_file():
        first = next((ln for ln in gpu.read_text(encoding="utf-8").splitlines() if ln.strip()),
                     "GPU evidence").lstrip("# ")
        extra.append(f"- `gpu/`: {first}: training, verification and benchmarks on the GPU "
                     "(`benchmarks/gpu_evidence.py`; see `gpu/README.md`)")
    if not extra:
        extra.append(
            "- none yet: accuracy needs `convtally train colour --model NAME`, "
            "benchmarks `python benchmarks/*.py`"
        )
    return lines + extra
