"""Comparing architectures: total cost and memory per model and resolution, next to accuracy."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from convtally.analysis.accounting import QUANTITIES, Analysis, analyse, answer_every_resolution
from convtally.analysis.conventions import DEFAULT, Convention
from convtally.analysis.formatting import resolution_label

# The seed write-up's own numbers (Parts A.2, B.2, C.2): CSC2516 PA2, full CIFAR-10 horses,
# 25 epochs, batch 100, kernel 3, 32 filters, on the course's machine.
WRITE_UP_RESULTS = {
    "poolupsample": {
        "train_loss": 1.5852,
        "val_loss": 1.5785,
        "val_accuracy": 0.416,
        "seconds": 34.18,
    },
    "convtranspose": {
        "train_loss": 1.2070,
        "val_loss": 1.1603,
        "val_accuracy": 0.547,
        "seconds": 105.78,
    },
    "unet": {"train_loss": 1.3075, "val_loss": 1.3323, "val_accuracy": 0.482, "seconds": 34.52},
}
DEFAULT_RUN_DIRS = (Path("reports/training"), Path("runs"))
# Memory columns (analysis/memory.py): float32, plain SGD, at one batch size.
MEMORY_COLUMNS = ("saved for backward", "training peak", "inference peak")


def memory_column(name: str, batch: int) -> str:
    """Return the compare column of one memory figure at a batch size, e.g. 'training peak B=1'."""
    return f"{name} B={batch}"


def find_runs(model: str, run_dirs: Sequence[Path] = DEFAULT_RUN_DIRS) -> list[dict]:
    """Return the metrics.json contents of finished colourization runs of `model`."""
    runs = []
    for directory in run_dirs:
        if not Path(directory).is_dir():
            continue
        # One level only: a sweep's per-batch-size runs (two levels down) are not the run
        # that stands for the model.
        for path in sorted(Path(directory).glob("*/metrics.json")):
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if metrics.get("model") == model and metrics.get("final"):
                metrics["_path"] = str(path.parent)
                runs.append(metrics)
    return runs


def compare(
    models: Sequence[str | Analysis],
    resolutions: Sequence[tuple[int, int]],
    settings: Mapping[str, int] | None = None,
    convention: Convention = DEFAULT,
    run_dirs: Sequence[Path] = DEFAULT_RUN_DIRS,
    include_reference: bool = True,
    memory_batch: int | None = 1,
) -> pd.DataFrame:
    """Return one row per model and resolution (totals, ratios to the first model, memory in
    bytes at batch `memory_batch` (None: no memory columns), accuracy)."""
    def images_only(analysis: Analysis) -> Analysis:
        analysis.require_images("convtally compare")
        return analysis

    analyses = [
        m if isinstance(m, Analysis) else answer_every_resolution(
            images_only(analyse(m, _settings_for(m, settings), convention,
                                resolutions=list(resolutions))), resolutions,
            lambda m=m: analyse(m, _settings_for(m, settings), convention, exact=True,
                                resolutions=list(resolutions)),
        )
        for m in models
    ]
    rows = []
    first_totals = analyses[0].totals_at(resolutions)
    for analysis in analyses:
        totals = analysis.totals_at(resolutions)
        memory = _memory_at(analysis, resolutions, memory_batch)
        runs = find_runs(analysis.model, run_dirs)
        for j, resolution in enumerate(resolutions):
            row = {
                "model": analysis.model,
                "resolution": resolution_label(*resolution),
                "source": "formula",
            }
            for quantity in QUANTITIES:
                row[quantity] = totals[quantity][j]
            for quantity in QUANTITIES:
                base = first_totals[quantity][j]
                row[f"{quantity} ratio"] = round(totals[quantity][j] / base, 3) if base else None
            for name, values in memory.items():
                row[memory_column(name, memory_batch)] = values[j]  # type: ignore[arg-type]
            run = _run_at(runs, resolution, analysis.hyperparameters)
            if run is not None:
                final = run["final"]
                row.update(
                    {
                        "val loss": round(final["val_loss"], 4),
                        "val accuracy %": round(100 * final["val_accuracy"], 1),
                        "train seconds": round(final.get("total_seconds", float("nan")), 1),
                        "device": run.get("device", ""),
                        "data": _data_text(run),
                        "trained as": _trained_as(run),
                        "trained-net connections": _trained_connections(
                            analysis.model, run, analysis.convention
                        ),
                        "source": f"formula + run {run['_path']}",
                    }
                )
            rows.append(row)
        reference = WRITE_UP_RESULTS.get(analysis.model)
        write_up_setting = all(
            analysis.hyperparameters.get(k) == v for k, v in (("K", 3), ("NF", 32), ("NC", 24))
        )
        if include_reference and reference and write_up_setting:
            rows.append(
                {
                    "model": analysis.model,
                    "resolution": "32",
                    "source": "write-up (reference, not run here)",
                    "val loss": reference["val_loss"],
                    "val accuracy %": round(100 * reference["val_accuracy"], 1),
                    "train seconds": reference["seconds"],
                    "device": "course machine",
                    "data": "full CIFAR-10 horses (5000 train)",
                    "trained as": "K=3 NIC=1 NF=32 NC=24 epochs=25 batch=100",
                    "trained-net connections": _trained_connections(
                        analysis.model,
                        {
                            "settings": {
                                "kernel": 3,
                                "num_in_channels": 1,
                                "filters": 32,
                                "num_colours": 24,
                            }
                        },
                        analysis.convention,
                    ),
                }
            )
    frame = pd.DataFrame(rows)
    memory_columns = [memory_column(n, memory_batch) for n in MEMORY_COLUMNS] if (
        memory_batch is not None) else []
    for column in (*QUANTITIES, *memory_columns, "trained-net connections"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")  # exact counts, blank where no value
    return frame


def _memory_at(analysis: Analysis, resolutions: Sequence[tuple[int, int]],
               batch: int | None) -> dict[str, list[int | None]]:
    """Return saved-for-backward bytes and the training and inference peaks (float32, SGD) at
    `batch` and each resolution; None where memory has no formulas (not an fx capture)."""
    if batch is None:
        return {}
    from convtally.analysis.memory import memory_model

    try:
        model = memory_model(analysis, "float32", "sgd")
    except ValueError:
        return {name: [None] * len(resolutions) for name in MEMORY_COLUMNS}
    result = model.evaluate([(batch, h, w) for h, w in resolutions])
    return {
        "saved for backward": result["totals"]["saved"],
        "training peak": result["training_peak"],
        "inference peak": result["inference_peak"],
    }


def _settings_for(model: str, settings: Mapping[str, int] | None) -> Mapping[str, int] | None:
    from convtally.models.registry import resolve

    spec = resolve(model)
    return settings if spec.hyperparameters else None


RUN_SETTINGS = {"kernel": "K", "filters": "NF", "num_colours": "NC"}


def _run_at(
    runs: list[dict], resolution: tuple[int, int], hyperparameters: Mapping[str, int]
) -> dict | None:
    """Return the newest run of the analysed network's K, NF and NC, at 32x32 only.

    Colourization runs train on 32x32 CIFAR images with grayscale input (NIC=1), while the
    write-up's cost table uses NIC=3; NIC is therefore not matched ('trained as' says it).
    """
    matching = [
        r
        for r in runs
        if all(
            r.get("settings", {}).get(key) == hyperparameters.get(symbol)
            for key, symbol in RUN_SETTINGS.items()
        )
    ]
    if resolution != (32, 32) or not matching:
        return None
    return sorted(matching, key=lambda r: r.get("finished_at", ""))[-1]


def _data_text(run: dict) -> str:
    data = run.get("data", {})
    return (
        f"{data.get('train_images', '?')} train / {data.get('val_images', '?')} val images "
        f"from {data.get('source', '?')}"
    )


def _trained_connections(model: str, run: dict, convention: Convention = DEFAULT) -> int | None:
    """Total connections at 32x32 of the network as it was trained (grayscale input: NIC=1)."""
    settings = run.get("settings", {})
    keys = {"kernel": "K", "num_in_channels": "NIC", "filters": "NF", "num_colours": "NC"}
    values = {symbol: settings[key] for key, symbol in keys.items() if key in settings}
    try:
        return analyse(model, values, convention).totals_at([(32, 32)])["connections"][0]
    except ValueError:
        return None


def _trained_as(run: dict) -> str:
    settings = run.get("settings", {})
    keys = (
        ("kernel", "K"),
        ("num_in_channels", "NIC"),
        ("filters", "NF"),
        ("num_colours", "NC"),
        ("epochs", "epochs"),
        ("batch_size", "batch"),
    )
    return " ".join(f"{symbol}={settings[key]}" for key, symbol in keys if key in settings)


RATIO_DIGITS = 3  # every ratio printed at one precision: 1.000, 1.150, 1.203
TEXT_COLUMNS = ("model", "source", "device", "data", "trained as")


def render_comparison(frame: pd.DataFrame, fmt: str) -> str:
    """Return the comparison as text, csv, markdown, latex or json.

    Ratios are written at one precision everywhere but JSON (numbers there); counts have
    thousands separators and bytes are KiB/MiB/GiB for people (text, Markdown, LaTeX), exact
    integers for programs (CSV, JSON).
    """
    ratios = [c for c in frame.columns if c.endswith(" ratio")]
    if fmt == "json":
        return frame.to_json(orient="records", indent=2) + "\n"
    shown = frame.copy()
    for column in ratios:
        shown[column] = shown[column].map(
            lambda v: "" if pd.isna(v) else f"{v:.{RATIO_DIGITS}f}")
    if fmt == "csv":
        return shown.to_csv(index=False)
    from convtally.analysis.limits import format_bytes

    for column in (*QUANTITIES, "trained-net connections"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{int(v):,}")
    for column in shown.columns:
        if any(column.startswith(f"{name} B=") for name in MEMORY_COLUMNS):
            shown[column] = shown[column].map(
                lambda v: "" if pd.isna(v) else format_bytes(int(v)))
    shown = shown.astype(object).where(shown.notna(), "")
    # strings right-aligned like the numbers they hold (tabulate and pandas would go left)
    numeric = [c for c in shown.columns if c not in TEXT_COLUMNS]
    if fmt == "markdown":
        return shown.to_markdown(
            index=False, colalign=["right" if c in numeric else "left" for c in shown.columns],
            disable_numparse=True,  # keep 1.000 as written
        ) + "\n"
    if fmt == "latex":
        return _latex(shown, numeric)
    from tabulate import tabulate

    return tabulate(shown, headers="keys", tablefmt="simple", showindex=False,
                    colalign=["right" if c in numeric else "left" for c in shown.columns],
                    disable_numparse=True) + "\n"


def _latex(shown: pd.DataFrame, numeric: list[str]) -> str:
    """Return a booktabs table (a longtable past LONGTABLE_ROWS rows), numbers right-aligned."""
    from convtally.analysis.formatting import _escape_latex, booktabs_latex

    escaped = shown.map(lambda v: _escape_latex(str(v)))
    escaped.columns = [_escape_latex(c) for c in shown.columns]
    return booktabs_latex(escaped.style.hide(axis="index"), len(shown),
                          [c in numeric for c in shown.columns],
                          "Architecture comparison: totals per resolution", "tab:comparison")
