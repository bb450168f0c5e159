"""GPU evidence in one command: train, verify and benchmark the networks on CUDA (issue 15).

Steps, in this order; each one's result (ok, failed with its error, or skipped) is written to
OUT/README.md and OUT/evidence.json as soon as it ends, and a failed step never stops the next:

  train       the three colourization networks with the write-up's settings (25 epochs,
              batch 100, Adam 1e-3, K=3, NF=32, NC=24, seed 0) on the CIFAR-10 horse subset,
              each into OUT/training/NAME/ (metrics.json with val loss and accuracy per epoch,
              seconds per epoch, device, torch/CUDA/cuDNN; checkpoint.pt; curves and samples)
  verify      `convtally verify` on each trained checkpoint on the same device (forward hooks,
              fvcore, FlopCounterMode; every layer; 32 and 64; --set NIC=1), OUT/verification/
  throughput  benchmarks/train_throughput.py on the device (and on the CPU for comparison):
              images/s per network and the write-up's full schedule, 25 epochs x 5000 images
  segment     benchmarks/segment_fast_path.py on generated Oxford-Flowers-layout data
  compile     (CUDA only, last) the throughput benchmark again with torch.compile
              (--compile-mode, default reduce-overhead: CUDA graphs); --compile-mode none skips

OUT/README.md says what ran, where, when, from which source and with the exact command. Exit
0 when every step passed, 1 when one failed, 2 for a refusal (no CUDA, bad flags, an OUT that
is not an evidence folder). Without CUDA it refuses in one line; the CPU rehearsal runs every
step at small sizes in a minute or two (CI runs it, tests/benchmarks/test_gpu_evidence.py):

    make gpu-evidence                                    # CUDA machine, into reports/gpu
    .venv/bin/python benchmarks/gpu_evidence.py --device cpu --quick --out /tmp/gpu

With the device tool (its machine starts bare: its `python3` has torch, torchvision, sympy and
matplotlib but not fvcore, and neither ../shared nor .venv travels; at most 8 files come back):

    1. here, just before:  .venv/bin/python benchmarks/gpu_evidence.py --prepare-carry
       (copies the CIFAR-10 subset, fvcore and its pure-Python needs and the git commit into
       .cache/gpu-carry/, about 30 MB, ignored by git; the script finds them there)
    2. device run:  command "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_evidence.py --out
       /tmp/gpu --archive $OUT/gpu_evidence.tar.gz", carry [".cache/gpu-carry"], timeout_s 480
       (the whole evidence folder comes back as one archive, rewritten after every step, with
       its README beside it as $OUT/gpu_evidence.md)
    3. here:        rm -rf reports/gpu && mkdir -p reports/gpu &&
                    tar -xzf FILES_AT/gpu_evidence.tar.gz -C reports/gpu
       then `convtally report` indexes reports/gpu in reports/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".cache" / "gpu-carry"
for _path in (REPO,):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
if (CARRY / "site").is_dir() and str(CARRY / "site") not in sys.path:
    sys.path.append(str(CARRY / "site"))  # after the installed packages: only fills gaps

import torch  # noqa: E402
from convtally.analysis.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from convtally.models import cifar, runs  # noqa: E402
from convtally.models.device import device_description  # noqa: E402
from convtally.models.train_colour import MODEL_NAMES, ColourConfig, train_colourization  # noqa: E402

STEPS = ("train", "verify", "throughput", "segment", "compile")
SHARED_DATA = REPO.parent / "shared" / "data" / cifar.CIFAR_DIRNAME
CARRIED_DATA = CARRY / cifar.CIFAR_DIRNAME
MARKER = "evidence.json"
# fvcore and what it imports that the device image lacks (all pure Python)
CARRIED_PACKAGES = ("fvcore", "iopath", "yacs", "termcolor")
GOAL_SUBSET_SECONDS = 1.0  # 25 epochs of the 524-horse subset, per network, on an H100
GOAL_SCHEDULE_SECONDS = 10.0  # the write-up's schedule, 25 epochs x 5000 images, on an H100


@dataclass
class Sizes:
    """How much each step does: the write-up's settings, or the quick CPU rehearsal's."""

    epochs: int = 25
    throughput_images: int = 5000
    throughput_epochs: int = 25
    max_full_seconds: float = 60.0
    segment_backbones: list[str] = field(
        default_factory=lambda: ["mobilenet_v3_large", "resnet50"])
    segment_images: int = 16
    segment_size: int = 224
    segment_epochs: int = 3
    segment_repeats: int = 2


QUICK = Sizes(epochs=2, throughput_images=500, throughput_epochs=2, max_full_seconds=240.0,
              segment_backbones=["mobilenet_v3_large"], segment_images=8, segment_size=64,
              segment_epochs=1, segment_repeats=1)


@dataclass
class Step:
    """One step's outcome, as recorded in evidence.json."""

    name: str
    status: str = "not run"  # ok | failed | skipped | not run
    seconds: float | None = None
    summary: str = ""
    error: str | None = None
    files: list[str] = field(default_factory=list)
    results: Any = None


# --- the steps --------------------------------------------------------------------------


def step_train(args: argparse.Namespace, sizes: Sizes, out: Path, step: Step) -> None:
    """Train each network into out/training/NAME; its log beside it as NAME.log."""
    results, failures = [], []
    for model in args.models:
        config = ColourConfig(model=model, epochs=sizes.epochs, data_dir=str(args.data),
                              cache_dir=args.cache_dir, device=args.device, progress=False,
                              out=str(out / "training" / model))
        lines: list[str] = []

        def log(text: str, lines: list[str] = lines) -> None:
            lines.append(text)
            print(text, flush=True)

        start = time.perf_counter()
        try:
            metrics = train_colourization(config, log=log)
        except Exception as error:  # one network's failure must not stop the others
            failures.append(f"{model}: {one_line(error)}")
            log(f"{model}: FAILED: {one_line(error)}")
            atomic_write_text(out / "training" / f"{model}.log", "\n".join(lines) + "\n")
            continue
        wall = time.perf_counter() - start
        (out / "training" / model / runs.TRAINING_STATE_FILE).unlink(missing_ok=True)
        seconds = [row["seconds"] for row in metrics["epochs"]]
        final = metrics["final"]
        log(f"{model}: val loss {final['val_loss']:.4f}, val acc "
            f"{100 * final['val_accuracy']:.1f}%, {final['total_seconds']:.2f} s of epochs "
            f"({wall:.1f} s wall with data, warm-up and saves) on {metrics['device']}")
        atomic_write_text(out / "training" / f"{model}.log", "\n".join(lines) + "\n")
        results.append({
            "model": model, "epochs": len(seconds), "val_loss": final["val_loss"],
            "val_accuracy": final["val_accuracy"], "train_loss": final["train_loss"],
            "epoch_seconds_total": final["total_seconds"],
            "epoch_seconds_median": round(statistics.median(seconds), 4),
            "epoch_seconds_first": seconds[0],
            "warmup_seconds": metrics.get("timing", {}).get("warmup_seconds"),
            "wall_seconds": round(wall, 2), "device": metrics["device"],
            "software": metrics["software"], "data": metrics["data"]["description"],
            "train_images": metrics["data"]["train_images"],
            "val_images": metrics["data"]["val_images"], "settings": metrics["settings"],
        })
        step.files += [f"training/{model}/", f"training/{model}.log"]
    step.results = results
    step.summary = f"{len(results)} of {len(args.models)} networks trained"
    if failures:
        raise StepError("; ".join(failures))


def verify_argv(model: str, checkpoint: Path, device: str, fmt: str, output: Path) -> list[str]:
    """Return the `convtally verify` arguments for one trained network."""
    defaults = ColourConfig()
    return ["verify", model, "--checkpoint", str(checkpoint), "--res", "32", "64",
            "--set", f"K={defaults.kernel}", f"NF={defaults.filters}",
            f"NC={defaults.num_colours}", "NIC=1", "--device", device,
            "--format", fmt, "-o", str(output)]


def step_verify(args: argparse.Namespace, sizes: Sizes, out: Path, step: Step) -> None:
    """Run `convtally verify` (text and JSON) on every checkpoint the train step wrote."""
    from convtally.analysis.cli import main as convtally

    results, failures = [], []
    for model in args.models:
        checkpoint = out / "training" / model / runs.CHECKPOINT_FILE
        if not checkpoint.is_file():
            failures.append(f"{model}: no checkpoint (training failed or did not run)")
            continue
        row: dict[str, Any] = {"model": model, "checkpoint": f"training/{model}/checkpoint.pt"}
        for fmt, suffix in (("json", "json"), ("text", "txt")):
            target = out / "verification" / f"{model}.{suffix}"
            argv = verify_argv(model, checkpoint, args.device, fmt, target)
            row[f"command_{fmt}"] = "convtally " + shlex.join(
                [a if a != str(checkpoint) else row["checkpoint"] for a in argv[:-1]]
                + [f"verification/{model}.{suffix}"])
            try:
                code = convtally(argv)
            except SystemExit as exit_:  # argparse errors
                code = exit_.code if isinstance(exit_.code, int) else 2
            row[f"exit_{fmt}"] = code
            if target.is_file():
                step.files.append(f"verification/{model}.{suffix}")
        report_path = out / "verification" / f"{model}.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
            row["summary"] = report.get("summary")
            mismatches = report.get("mismatches")
            row["mismatches"] = len(mismatches) if isinstance(mismatches, list) else mismatches
            row["device"] = report.get("device")
        if row.get("exit_json") != 0 or row.get("exit_text") != 0:
            failures.append(f"{model}: verify exit {row.get('exit_json')}/{row.get('exit_text')}"
                            f" ({row.get('summary') or 'no report'})")
        results.append(row)
    step.results = results
    step.summary = (f"{sum(r.get('mismatches') == 0 and r.get('exit_json') == 0 for r in results)}"
                    f" of {len(args.models)} checkpoints verified with 0 mismatches")
    if failures:
        raise StepError("; ".join(failures))


def throughput_devices(args: argparse.Namespace) -> list[str]:
    """Return the devices to time: the evidence device, then the CPU as a baseline."""
    return [args.device] if args.device == "cpu" else [args.device, "cpu"]


def step_throughput(args: argparse.Namespace, sizes: Sizes, out: Path, step: Step,
                    compile_mode: str | None = None) -> None:
    """Run benchmarks/train_throughput.py into out/benchmarks/."""
    name = "train_throughput" if compile_mode is None else "train_throughput_compiled"
    devices = throughput_devices(args) if compile_mode is None else [args.device]
    argv = ["--data", str(args.data), "--devices", *devices, "--models", *args.models,
            "--images", str(sizes.throughput_images), "--epochs", str(sizes.throughput_epochs),
            "--max-full-seconds", str(sizes.max_full_seconds),
            "--out-dir", str(out / "benchmarks"), "--name", name]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    if compile_mode:
        argv += ["--compile", compile_mode]
    code = load_benchmark("train_throughput").main(argv)
    step.results = json.loads((out / "benchmarks" / f"{name}.json").read_text(encoding="utf-8"))
    step.files += [f"benchmarks/{name}.md", f"benchmarks/{name}.json"]
    rows = step.results["results"]
    step.summary = ", ".join(f"{row['model']} {row['images_per_second']:.0f} images/s on "
                             f"{row['device'].split(' ')[0]}" for row in rows)
    if code:
        raise StepError(f"train_throughput.py exited {code}")


def step_segment(args: argparse.Namespace, sizes: Sizes, out: Path, step: Step) -> None:
    """Run benchmarks/segment_fast_path.py on generated data into out/benchmarks/."""
    argv = ["--backbones", *sizes.segment_backbones, "--images", str(sizes.segment_images),
            "--size", str(sizes.segment_size), "--epochs", str(sizes.segment_epochs),
            "--repeats", str(sizes.segment_repeats), "--device", args.device,
            "--out-dir", str(out / "benchmarks")]
    code = load_benchmark("segment_fast_path").main(argv)
    path = out / "benchmarks" / "segment_fast_path.json"
    step.results = json.loads(path.read_text(encoding="utf-8"))
    step.files += ["benchmarks/segment_fast_path.md", "benchmarks/segment_fast_path.json"]
    step.summary = ", ".join(
        f"{row['model']} fast {row['fast']['total_seconds']:.2f} s vs slow "
        f"{row['slow']['total_seconds']:.2f} s" for row in step.results["results"])
    if code:
        raise StepError(f"segment_fast_path.py exited {code}")


class StepError(RuntimeError):
    """A step finished but something in it failed; the message says what."""


def load_benchmark(name: str):
    """Import benchmarks/NAME.py (benchmarks/ is not a package) and return the module."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def one_line(error: BaseException) -> str:
    """Return an exception as one line: its type and the first line of its message."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- where and what ----------------------------------------------------------------------


def machine_facts(device: str) -> dict[str, Any]:
    """Return the host, GPU, driver and software this run used."""
    facts: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0], "python_executable": sys.executable,
        "torch": torch.__version__, "cuda_build": torch.version.cuda or "none",
        "cudnn": (str(torch.backends.cudnn.version())
                  if torch.backends.cudnn.is_available() else "none"),
        "device": device_description(torch.device(device)),
    }
    try:
        import torchvision

        facts["torchvision"] = torchvision.__version__
    except ImportError:
        facts["torchvision"] = "missing"
    try:
        import fvcore

        facts["fvcore"] = f"{getattr(fvcore, '__version__', '?')} ({Path(fvcore.__file__).parent})"
    except ImportError:
        facts["fvcore"] = "missing"
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        facts["gpu"] = {"name": properties.name,
                        "memory_gib": round(properties.total_memory / 2**30, 1),
                        "multiprocessors": properties.multi_processor_count,
                        "capability": f"{properties.major}.{properties.minor}"}
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as error:
            facts["nvidia_smi"] = f"not available ({one_line(error)})"
    return facts


def source_facts() -> dict[str, Any]:
    """Return the source's git commit (live, or as --prepare-carry recorded it)."""
    live = git_state()
    if live:
        return {**live, "from": "git in the checkout"}
    recorded = CARRY / "source.json"
    if recorded.is_file():
        return {**json.loads(recorded.read_text(encoding="utf-8")),
                "from": "recorded by --prepare-carry (the device copy has no .git)"}
    return {"commit": "unknown", "from": "no .git and no .cache/gpu-carry/source.json"}


def git_state() -> dict[str, Any] | None:
    """Return {commit, changed files} of the checkout, or None without git."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=20)
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": commit.stdout.strip(), "uncommitted_changes": changed}


# --- the report --------------------------------------------------------------------------


def render_readme(evidence: dict[str, Any]) -> str:
    """Return OUT/README.md: what ran, where, when, from which source, with which command."""
    facts, steps, sizes = evidence["machine"], evidence["steps"], evidence["sizes"]
    quick = evidence["quick"]
    kind = "CPU rehearsal (--quick: small sizes)" if quick else "write-up settings"
    title_device = facts["device"]
    lines = [
        f"# GPU evidence: {title_device}, {evidence['started_at'][:10]}"
        + (" (quick CPU rehearsal)" if quick else ""),
        "",
        f"Written by `benchmarks/gpu_evidence.py` ({kind}). Status: **{evidence['status']}**.",
        "",
        f"- command: `{evidence['command']}` (in `{evidence['cwd']}`)",
        f"- started {evidence['started_at']}, finished {evidence.get('finished_at') or 'not yet'}"
        " (UTC)",
        f"- device: {facts['device']}"
        + (f"; {facts['gpu']['memory_gib']} GiB, {facts['gpu']['multiprocessors']} SMs, "
           f"compute capability {facts['gpu']['capability']}" if "gpu" in facts else ""),
    ]
    if "nvidia_smi" in facts:
        lines.append(f"- nvidia-smi (name, driver, memory): {facts['nvidia_smi']}")
    lines += [
        f"- host: {facts['host']}, {facts['platform']}, {facts['cpu_count']} CPUs",
        f"- software: python {facts['python']} ({facts['python_executable']}), torch "
        f"{facts['torch']} (CUDA {facts['cuda_build']}, cuDNN {facts['cudnn']}), torchvision "
        f"{facts['torchvision']}, fvcore {facts['fvcore']}",
        f"- source: commit {evidence['source'].get('commit')}"
        + (f", with uncommitted changes in {', '.join(evidence['source']['uncommitted_changes'])}"
           if evidence["source"].get("uncommitted_changes") else "")
        + f" ({evidence['source'].get('from')})",
        f"- data: {evidence['data']}",
        f"- sizes: {sizes['epochs']} training epochs; throughput {sizes['throughput_epochs']} "
        f"epochs x {sizes['throughput_images']} images; segmentation "
        f"{', '.join(sizes['segment_backbones'])} at {sizes['segment_size']}x"
        f"{sizes['segment_size']}, {sizes['segment_images']} generated images, "
        f"{sizes['segment_epochs']} epochs, fastest of {sizes['segment_repeats']}",
        "",
        "## Steps",
        "",
        "| step | status | seconds | summary |",
        "|---|---|---:|---|",
    ]
    for step in steps:
        detail = step["summary"] + (f" — **error**: {step['error']}" if step["error"] else "")
        seconds = f"{step['seconds']:.1f}" if step["seconds"] is not None else ""
        lines.append(f"| {step['name']} | {step['status']} | {seconds} | {detail} |")
    by_name = {step["name"]: step for step in steps}
    lines += training_section(by_name.get("train"), quick)
    lines += verification_section(by_name.get("verify"))
    lines += throughput_section(by_name.get("throughput"), "Training throughput", quick)
    lines += throughput_section(by_name.get("compile"), "Training throughput, torch.compile'd",
                                quick)
    lines += segment_section(by_name.get("segment"))
    lines += [
        "",
        "## Files",
        "",
        "- `evidence.json`: everything above, machine-readable; `gpu_evidence.log`: the output",
        "- `training/NAME/`: `metrics.json` (per epoch: losses, val accuracy, seconds; device, "
        "torch, CUDA, cuDNN), `checkpoint.pt` (state_dict, `weights_only=True`), `curves.png`, "
        "`samples.png`; `training/NAME.log` the printed lines. The resume state is not kept.",
        "- `verification/NAME.{txt,json}`: `convtally verify` of each trained checkpoint",
        "- `benchmarks/*.{md,json}`: the benchmark reports",
        "",
    ]
    return "\n".join(lines)


def training_section(step: dict | None, quick: bool) -> list[str]:
    if not step or not step.get("results"):
        return []
    rows = step["results"]
    lines = [
        "",
        "## Training (write-up settings: batch 100, Adam 1e-3, K=3, NF=32, NC=24, seed 0)",
        "",
        f"Data: {rows[0]['data']}; {rows[0]['train_images']} training and "
        f"{rows[0]['val_images']} validation horses. Epoch seconds are train steps plus "
        "validation, GPU synchronised, after an untimed warm-up on a copy of the network; wall "
        "adds loading the data, the warm-up and writing the run folder after every epoch.",
        "",
        "| network | epochs | val loss | val acc | train loss | epochs total s | median epoch s "
        "| first epoch s | warm-up s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['epochs']} | {row['val_loss']:.4f} | "
            f"{100 * row['val_accuracy']:.1f} % | {row['train_loss']:.4f} | "
            f"{row['epoch_seconds_total']:.3f} | {row['epoch_seconds_median']:.4f} | "
            f"{row['epoch_seconds_first']:.4f} | {row['warmup_seconds']} | "
            f"{row['wall_seconds']:.1f} |")
    if not quick and rows[0]["epochs"] == 25:
        met = [row["model"] for row in rows if row["epoch_seconds_total"] < GOAL_SUBSET_SECONDS]
        lines += ["", f"Goal (issue 15): under {GOAL_SUBSET_SECONDS:g} s per network for 25 "
                  f"epochs of the subset: met by {len(met)} of {len(rows)} "
                  f"({', '.join(met) or 'none'})."]
    return lines


def verification_section(step: dict | None) -> list[str]:
    if not step or not step.get("results"):
        return []
    lines = ["", "## Verification of the trained checkpoints", "",
             "| network | mismatches | exit (json/text) | summary |", "|---|---:|---|---|"]
    for row in step["results"]:
        lines.append(f"| {row['model']} | {row.get('mismatches', '?')} | "
                     f"{row.get('exit_json')}/{row.get('exit_text')} | {row.get('summary')} |")
    lines += ["", "Command (per network): `" + step["results"][0]["command_text"] + "`"]
    return lines


def throughput_section(step: dict | None, title: str, quick: bool) -> list[str]:
    if not step or not step.get("results"):
        return []
    report = step["results"]
    data = report["data"]
    lines = [
        "", f"## {title}", "",
        f"`{report['command']}`; torch.compile: {report.get('compile', 'none (eager)')}. "
        f"{data['images_per_epoch']} images per epoch ({data['category_train_images']} horses "
        f"repeated), batch {report['settings']['batch_size']}; train steps only.",
        "",
        f"| network | device | images/s (median epoch) | {report['settings']['epochs']}-epoch "
        "schedule s | schedule | warm-up s |",
        "|---|---|---:|---:|---|---:|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['device']} | {row['images_per_second']:.0f} | "
                     f"{row['schedule_seconds']:.1f} | {row['schedule']} | "
                     f"{row.get('warmup_seconds', '')} |")
    gpu_rows = [row for row in report["results"] if row["device"].startswith("cuda")]
    if (not quick and gpu_rows and data["images_per_epoch"] == 5000
            and report["settings"]["epochs"] == 25):
        met = [row["model"] for row in gpu_rows if row["schedule_seconds"] < GOAL_SCHEDULE_SECONDS]
        lines += ["", f"Goal (issue 15): the write-up's schedule (25 x 5000 images) under "
                  f"{GOAL_SCHEDULE_SECONDS:g} s: met by {', '.join(met) or 'none'}."]
    return lines


def segment_section(step: dict | None) -> list[str]:
    if not step or not step.get("results"):
        return []
    report = step["results"]
    lines = ["", "## Segmentation fast path (generated data: speed only)", "",
             "| model | slow total s | fast total s | speed-up total | speed-up per epoch |",
             "|---|---:|---:|---:|---:|"]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['slow']['total_seconds']:.2f} | "
                     f"{row['fast']['total_seconds']:.2f} | {row['speedup_total']:.1f}x | "
                     f"{row['speedup_per_epoch']:.0f}x |")
    return lines


# --- output folder, archive, carry --------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Empty `out` of an earlier evidence run; refuse a non-empty folder that is not one."""
    if out.is_dir() and any(entry.name != runs.LOCK_FILE for entry in out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"--out {out} is not empty and holds no {MARKER}: not an earlier "
                             "evidence folder; give an empty or new folder")
        for entry in out.iterdir():
            if entry.name == runs.LOCK_FILE:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_archive(out: Path, archive: Path) -> None:
    """Pack `out` (without lock and temporary files) into the tar.gz `archive`, atomically."""

    def pack(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(out.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    tar.add(path, arcname=str(path.relative_to(out)), recursive=False)

    atomic_write(archive, pack)
    readme = out / "README.md"
    if readme.is_file():
        name = archive.name.split(".")[0] + ".md"
        atomic_write_text(archive.parent / name, readme.read_text(encoding="utf-8"))


def prepare_carry(data: Path | None) -> int:
    """Copy what the bare device machine lacks into .cache/gpu-carry; return the exit code."""
    source = data or SHARED_DATA
    if not source.is_dir():
        print(f"gpu_evidence: error: no CIFAR-10 folder at {source}; pass --data DIR",
              file=sys.stderr)
        return 2
    if CARRY.exists():
        shutil.rmtree(CARRY)
    (CARRY / "site").mkdir(parents=True)
    shutil.copytree(source, CARRIED_DATA)
    for name in CARRIED_PACKAGES:
        module = importlib.util.find_spec(name)
        if module is None or not module.submodule_search_locations and not module.origin:
            print(f"gpu_evidence: error: package {name} is not installed here", file=sys.stderr)
            return 2
        location = (Path(next(iter(module.submodule_search_locations)))
                    if module.submodule_search_locations else Path(module.origin))
        target = CARRY / "site" / location.name
        (shutil.copytree if location.is_dir() else shutil.copy2)(location, target)
        for info in location.parent.glob(f"{name}-*.dist-info"):
            shutil.copytree(info, CARRY / "site" / info.name)
    for cache in (CARRY / "site").rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    state = git_state() or {"commit": "unknown"}
    atomic_write_json(CARRY / "source.json", {**state, "prepared_at": runs.utc_timestamp()})
    size = sum(path.stat().st_size for path in CARRY.rglob("*") if path.is_file())
    print(f"wrote {CARRY} ({size / 2**20:.1f} MiB): {source.name}, "
          f"{', '.join(CARRIED_PACKAGES)}, source.json (commit {state['commit'][:12]}); "
          "carry it: carry [\".cache/gpu-carry\"]")
    return 0


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_evidence.py", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--out", default=str(REPO / "reports" / "gpu"), metavar="DIR",
                        help="evidence folder (default reports/gpu); emptied first if it holds "
                             "an earlier run, refused if it holds anything else")
    parser.add_argument("--archive", default=None, metavar="FILE.tar.gz",
                        help="also pack --out into this archive after every step, with its "
                             "README beside it (for the device tool, which returns few files)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default; refused without a GPU) or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: the CPU rehearsal of every step (minutes)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help=f"cifar-10-batches-py folder (default {SHARED_DATA}, else "
                             f"{CARRIED_DATA})")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="cache for the k-means colours (default: the trainer's)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS,
                        help="steps to run (default: all)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the compile step (CUDA only; none skips)")
    parser.add_argument("--epochs", type=int, default=None, help="override training epochs")
    parser.add_argument("--throughput-images", type=int, default=None)
    parser.add_argument("--throughput-epochs", type=int, default=None)
    parser.add_argument("--segment-backbones", nargs="+", default=None)
    parser.add_argument("--segment-size", type=int, default=None)
    parser.add_argument("--segment-images", type=int, default=None)
    parser.add_argument("--prepare-carry", action="store_true",
                        help="copy the data, fvcore and the git commit into .cache/gpu-carry "
                             "for the device tool, then stop")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    sizes = Sizes(**vars(QUICK)) if args.quick else Sizes()
    overrides = {"epochs": args.epochs, "throughput_images": args.throughput_images,
                 "throughput_epochs": args.throughput_epochs,
                 "segment_backbones": args.segment_backbones,
                 "segment_size": args.segment_size, "segment_images": args.segment_images}
    for name, value in overrides.items():
        if value is not None:
            setattr(sizes, name, value)
    return sizes


def find_data(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for candidate in (SHARED_DATA, CARRIED_DATA):
        if candidate.is_dir():
            return candidate
    return None


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_carry:
        return prepare_carry(Path(args.data) if args.data else None)
    if not args.device.startswith("cuda") and args.device != "cpu":
        print(f"gpu_evidence: error: --device {args.device}: use cuda or cpu", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_evidence: error: no CUDA GPU here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or rehearse with --device cpu --quick", file=sys.stderr)
        return 2
    found = find_data(args.data)
    args.data = found if found is not None else Path(args.data or SHARED_DATA)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder")
        with runs.run_folder_lock(out):
            prepare_out(out)
            return run_steps(args, out, argv)
    except ValueError as error:  # an unusable --out, or one another run holds
        print(f"gpu_evidence: error: {error}", file=sys.stderr)
        return 2


def run_steps(args: argparse.Namespace, out: Path, argv: list[str] | None) -> int:
    sizes = sizes_of(args)
    archive = Path(args.archive) if args.archive else None
    arguments = sys.argv[1:] if argv is None else argv
    evidence: dict[str, Any] = {
        "status": "running",
        "command": shlex.join(["python", "benchmarks/gpu_evidence.py", *arguments]),
        "cwd": os.getcwd(), "started_at": runs.utc_timestamp(), "finished_at": None,
        "quick": args.quick, "device_argument": args.device, "sizes": vars(sizes),
        "data": (f"{args.data} (CIFAR-10 python layout; category 7, horse)"
                 if args.data.is_dir() else f"{args.data}: MISSING"),
        "machine": machine_facts(args.device), "source": source_facts(), "steps": [],
    }
    wanted = [name for name in STEPS if name in args.steps]
    if "compile" in wanted and (args.device == "cpu" or args.compile_mode == "none"):
        wanted.remove("compile")  # inductor on the CPU compiles C++ for minutes: not rehearsed
    steps = [Step(name) for name in wanted]
    evidence["steps"] = [vars(step) for step in steps]
    actions: dict[str, Callable[[Step], None]] = {
        "train": lambda step: step_train(args, sizes, out, step),
        "verify": lambda step: step_verify(args, sizes, out, step),
        "throughput": lambda step: step_throughput(args, sizes, out, step),
        "segment": lambda step: step_segment(args, sizes, out, step),
        "compile": lambda step: step_throughput(args, sizes, out, step, args.compile_mode),
    }

    def publish() -> None:
        evidence["steps"] = [vars(step) for step in steps]
        atomic_write_json(out / MARKER, evidence)
        atomic_write_text(out / "README.md", render_readme(evidence))
        if archive is not None:
            write_archive(out, archive)

    with open(out / "gpu_evidence.log", "a", encoding="utf-8") as log_file, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log_file)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, log_file)):
        print(f"gpu evidence on {evidence['machine']['device']} into {out}: "
              f"{', '.join(wanted)}", flush=True)
        publish()
        for step in steps:
            print(f"=== {step.name} ===", flush=True)
            start = time.perf_counter()
            try:
                actions[step.name](step)
                step.status = "ok"
            except Exception as error:  # recorded; the next step runs all the same
                step.status = "failed"
                step.error = one_line(error)
                traceback.print_exc()
            step.seconds = round(time.perf_counter() - start, 2)
            print(f"{step.name}: {step.status} in {step.seconds:.1f} s"
                  + (f": {step.error}" if step.error else ""), flush=True)
            publish()
        failed = [step.name for step in steps if step.status != "ok"]
        evidence["status"] = f"failed: {', '.join(failed)}" if failed else "complete"
        evidence["finished_at"] = runs.utc_timestamp()
        publish()
    print(f"wrote {out / 'README.md'}" + (f" and {archive}" if archive else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
