"""Zoo coverage: every torchvision classification/segmentation model and one timm model per
family, analysed with `--capture auto` under the fvcore preset, next to the real numbers.

    .venv/bin/python benchmarks/zoo.py [--only torchvision|timm] [--limit-seconds 300]
        [--out reports/zoo] [--models NAME ...] [--merge] [--size HxW]

--merge reruns only the named models and replaces their rows in the existing report (the
other rows, measured before, are kept as they were; the Markdown says which rows were rerun
and when).

For each model: the capture used (fx, export, concrete), our total weights vs the model's
parameter count, our connections under the fvcore preset vs fvcore's FlopCountAnalysis total
at the model's published crop (torchvision) or default input size (timm), whether the
formulas are symbolic in H, W, the refusal reason, and seconds. Rows are written as they are
measured (CSV and Markdown), so a long run that is stopped keeps what it measured.

--size HxW measures every model at that one size instead (as `convtally table --res HxW`
answers, the exact formulas where the simple ones do not hold) and runs its forward pass
there too: a model agrees when the analysis answers where the forward runs (and equals
fvcore), or refuses where it fails. It writes zoo_HxW.csv and .md.
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convtally.analysis import peers  # noqa: E402
from convtally.analysis.accounting import (  # noqa: E402
    ResolutionError,
    analyse,
    answer_every_resolution,
    parse_resolution,
)
from convtally.analysis.conventions import preset  # noqa: E402
from convtally.analysis.io import atomic_write_text  # noqa: E402

COLUMNS = (
    "source", "model", "input", "capture", "symbolic", "weights", "parameters", "weights_equal",
    "connections_fvcore_preset", "fvcore_total", "connections_equal", "complete",
    "refusal", "seconds",
)
# --size: whether the forward pass runs at that size, and whether the analysis agrees with it
COLUMNS_AT_SIZE = (*COLUMNS[:-1], "forward", "agrees", "seconds")


class TimeLimit(Exception):
    """A model ran past its time limit."""


def _alarm(signum, frame):
    raise TimeLimit()


def torchvision_models() -> list[tuple[str, str, tuple[int, int]]]:
    """Return (source, name, (H, W)) for every classification and segmentation model."""
    import torchvision.models as tvm

    rows = []
    for module, kind in ((tvm, "classification"), (tvm.segmentation, "segmentation")):
        for name in tvm.list_models(module=module):
            weights = tvm.get_model_weights(name).DEFAULT
            transforms = weights.transforms()
            crop = getattr(transforms, "crop_size", None) or transforms.resize_size
            side = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
            rows.append((f"torchvision {kind}", name, (side, side)))
    return rows


def timm_models() -> list[tuple[str, str, tuple[int, int]]]:
    """Return (source, first model of each timm family, default input size)."""
    import timm

    rows = []
    for family in timm.list_modules():
        names = timm.list_models(module=family)
        if names:
            rows.append((f"timm {family}", names[0], None))
    return rows


def build(source: str, name: str, size: tuple[int, int] | None = None):
    """Return a fresh network in eval mode, without pretrained weights (nor a backbone's)."""
    if source.startswith("timm"):
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import inspect

    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    kwargs = {"weights": None}
    # the builders are wrapped by decorators: the signature, not __code__, lists the arguments
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    if name.startswith("vit_") and size is not None and size[0] != 224:
        kwargs["image_size"] = size[0]  # the published weights' size (vit_h_14: 518)
    return builder(**kwargs).eval()


def measure(source: str, name: str, size, limit: int, at_size: tuple[int, int] | None = None
            ) -> dict:
    """Return one report row for one model (refusal reason instead of numbers on failure);
    `at_size`: measured there, with its forward pass run there too (COLUMNS_AT_SIZE)."""
    if at_size is not None:
        return _measure_at_size(source, name, limit, at_size)
    row = dict.fromkeys(COLUMNS, "")
    row.update(source=source, model=name)
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)  # again each second: one alarm can be
    try:  # swallowed ("Exception ignored in" a weakref callback the garbage collector runs)
        network = build(source, name, size)
        if size is None:
            size = tuple(network.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        row["input"] = f"3x{size[0]}x{size[1]}"
        analysis = analyse(
            network, convention=preset("fvcore"), capture="auto", resolutions=[size],
            allow_unknown=True,
        )
        try:
            totals = analysis.totals_at([size])
        except ResolutionError:  # a published crop off the divisibility (299, 240, ...)
            analysis = analyse(
                network, convention=preset("fvcore"), capture="auto", resolutions=[size],
                allow_unknown=True, exact=True,
            )
            totals = analysis.totals_at([size])
        row.update(
            capture=analysis.capture,
            symbolic=analysis.symbolic,
            complete=analysis.complete,
            weights=totals["weights"][0],
            parameters=sum(p.numel() for p in network.parameters()),
            connections_fvcore_preset=totals["connections"][0],
        )
        if analysis.capture_note:
            row["refusal"] = analysis.capture_note[:300]
        # fvcore's default call (grad mode on: MultiheadAttention's unfused path)
        row["fvcore_total"] = peers.run_tool(
            "fvcore", network, torch.zeros(1, 3, *size), threads=None
        ).total
        row["weights_equal"] = row["weights"] == row["parameters"]
        row["connections_equal"] = row["connections_fvcore_preset"] == row["fvcore_total"]
    except TimeLimit:
        row["refusal"] = f"time limit ({limit} s) reached"
    except Exception as error:  # a refusal or a crash: both are reported, with the type
        row["refusal"] = _said(error, 300)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _said(error: BaseException, limit: int) -> str:
    """Return 'Type: first line of the message' (the line cut at `limit` characters)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def _measure_at_size(source: str, name: str, limit: int, size: tuple[int, int]) -> dict:
    """Return the row of one model at `size`: the analysis as `table --res` answers it, the
    forward pass there, fvcore where it runs, and whether the analysis agrees."""
    row = dict.fromkeys(COLUMNS_AT_SIZE, "")
    row.update(source=source, model=name, input=f"3x{size[0]}x{size[1]}")
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)
    try:
        network = build(source, name)  # at its own size (a ViT's 224): --size asks it at another
        parameters = sum(p.numel() for p in network.parameters())
        try:
            analysis = answer_every_resolution(
                analyse(network, convention=preset("fvcore"), resolutions=[size],
                        allow_unknown=True),
                [size],
                lambda: analyse(network, convention=preset("fvcore"), resolutions=[size],
                                allow_unknown=True, exact=True),
            )
            totals = analysis.totals_at([size])
        except ValueError as error:  # a refusal: right where the forward fails too
            row["refusal"] = _said(error, 300)
            analysis = None
        try:
            with torch.no_grad():
                network(torch.zeros(1, 3, *size))
            row["forward"] = "runs"
        except Exception as error:  # noqa: BLE001 - any failure of the model's own forward
            row["forward"] = f"fails: {_said(error, 160)}"
        if analysis is not None:
            row.update(
                capture=analysis.capture, symbolic=analysis.symbolic,
                complete=analysis.complete, weights=totals["weights"][0],
                parameters=parameters, connections_fvcore_preset=totals["connections"][0],
            )
            row["weights_equal"] = row["weights"] == parameters
        if row["forward"] == "runs" and analysis is not None:
            row["fvcore_total"] = peers.run_tool(
                "fvcore", network, torch.zeros(1, 3, *size), threads=None).total
            row["connections_equal"] = row["connections_fvcore_preset"] == row["fvcore_total"]
            row["agrees"] = row["weights_equal"] is True and row["connections_equal"] is True
        else:  # refused and fails: agrees; one without the other: not
            row["agrees"] = (analysis is None) == (row["forward"] != "runs")
    except TimeLimit:
        row["refusal"] = f"time limit ({limit} s) reached"
    except Exception as error:  # a crash: reported with its type, never agreeing
        row["refusal"] = _said(error, 300)
        row["agrees"] = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def read_rows(path: Path) -> list[dict]:
    """Return the rows of an earlier CSV report, with True/False cells as booleans."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if value in ("True", "False"):
                row[key] = value == "True"
    return rows


def write_markdown(rows: list[dict], path: Path, started: str,
                   at_size: tuple[int, int] | None = None) -> None:
    """Write the Markdown report: coverage figures first, then one line per model."""
    def share(selected: list[dict], key: str) -> str:
        good = sum(1 for r in selected if r.get(key) is True)
        return f"{good}/{len(selected)}"

    title = "Zoo coverage" if at_size is None else f"Zoo at {at_size[0]}x{at_size[1]}"
    lines = [
        f"# {title} (generated by benchmarks/zoo.py; numbers measured, not asserted)",
        "",
        f"- started {started}; torch {torch.__version__}; {platform.platform()}; CPU only",
        "- weights: our total weights vs the model's parameter count; connections: our total "
        "under `--convention fvcore` vs fvcore `FlopCountAnalysis(model, x).total()`",
    ]
    if at_size is not None:
        lines.append(
            "- every model at this one size, built at its own; forward: its forward pass there; "
            "agrees: the analysis answers where the forward runs (weights and fvcore equal) or "
            "refuses where it fails")
    for source in ("torchvision", "timm"):
        selected = [r for r in rows if r["source"].startswith(source)]
        if not selected:
            continue
        if at_size is not None:
            runs = sum(1 for r in selected if r["forward"] == "runs")
            disagree = [r["model"] for r in selected if r["agrees"] is not True]
            lines.append(
                f"- {source}: {len(selected)} models; the forward runs for {runs}; the "
                f"analysis agrees for {share(selected, 'agrees')}"
                + (f" (not: {', '.join(disagree)})" if disagree else ""))
            continue
        exact = [r for r in selected if r["weights_equal"] is True
                 and r["connections_equal"] is True]
        analysed = [r for r in selected if r["capture"]]
        lines.append(
            f"- {source}: {len(selected)} models; analysed {len(analysed)}; exact (weights and "
            f"fvcore both equal) {len(exact)}; symbolic in H, W {share(selected, 'symbolic')}; "
            "captures: " + ", ".join(
                f"{c} {sum(1 for r in analysed if r['capture'] == c)}"
                for c in ("fx", "export", "concrete")
            )
        )
    columns = COLUMNS if at_size is None else COLUMNS_AT_SIZE
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(row[c]).replace("|", "/").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _merged_started(md_path: Path, now: str, names: list[str]) -> str:
    """Return the report's 'started' text with this rerun of `names` added."""
    text = md_path.read_text(encoding="utf-8") if md_path.is_file() else ""
    line = next((x for x in text.splitlines() if x.startswith("- started ")), "")
    before = line[len("- started "):].split("; torch ")[0] if line else now
    return f"{before}; rerun {now}: {', '.join(names)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("torchvision", "timm"), default=None)
    parser.add_argument("--models", nargs="*", default=None, help="only these model names")
    parser.add_argument("--limit-seconds", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("reports/zoo"))
    parser.add_argument("--merge", action="store_true",
                        help="replace only the measured models' rows in the existing report")
    parser.add_argument("--size", type=parse_resolution, default=None, metavar="HxW",
                        help="measure every model at this size, its forward pass run there too")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(1)
    models = []
    if args.only in (None, "torchvision"):
        models += torchvision_models()
    if args.only in (None, "timm"):
        models += timm_models()
    if args.models:
        models = [m for m in models if m[1] in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.only}" if args.only else ""
    if args.size is not None:
        suffix += f"_{args.size[0]}x{args.size[1]}"
    columns = COLUMNS if args.size is None else COLUMNS_AT_SIZE
    csv_path, md_path = args.out / f"zoo{suffix}.csv", args.out / f"zoo{suffix}.md"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows: list[dict] = []
    earlier = read_rows(csv_path) if args.merge else []
    if earlier:
        started = _merged_started(md_path, started, [m[1] for m in models])
        rows = earlier
    for source, name, size in models:
        row = measure(source, name, size, args.limit_seconds, args.size)
        position = next((i for i, r in enumerate(rows) if r["model"] == name
                         and r["source"] == source), None)
        if position is None:
            rows.append(row)
        else:
            rows[position] = row
        shown = ("model", "capture", "weights_equal", "connections_equal",
                 *(("forward", "agrees") if args.size else ()), "seconds")
        print(" ".join(f"{k}={row[k]}" for k in shown), flush=True)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, table.getvalue())  # a killed run leaves the last table
        write_markdown(rows, md_path, started, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
