"""compare: totals, ratios, runs and reference rows; report: every file, atomic on failure."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from convtally.analysis import report
from convtally.analysis.accounting import analyse
from convtally.analysis.cli import main
from convtally.analysis.compare import WRITE_UP_RESULTS, compare, render_comparison
from convtally.analysis.memory import measure_saved, memory_model

from tests.analysis.test_formatting import _compile as compile_latex


def write_run(directory, model, val_accuracy=0.5):
    run = directory / model
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "task": "colour",
                "model": model,
                "device": "cpu (test)",
                "settings": {"kernel": 3, "num_in_channels": 1, "filters": 32, "num_colours": 24},
                "data": {"source": "generated", "train_images": 10, "val_images": 5},
                "final": {"val_loss": 1.25, "val_accuracy": val_accuracy, "total_seconds": 3.0},
                "finished_at": "2026-01-01T00:00:00Z",
            }
        )
    )


def test_compare_totals_and_ratios(tmp_path):
    frame = compare(["poolupsample", "unet"], [(32, 32), (64, 64)], run_dirs=[tmp_path])
    formula_rows = frame[frame["source"] == "formula"].set_index(["model", "resolution"])
    unet = analyse("unet").totals_at([(64, 64)])
    assert formula_rows.loc[("unet", "64"), "connections"] == unet["connections"][0]
    assert formula_rows.loc[("unet", "32"), "weights ratio"] == round(57864 / 50304, 3)
    assert formula_rows.loc[("poolupsample", "64"), "connections ratio"] == 1
    reference = frame[frame["source"].str.startswith("write-up")]
    assert list(reference["model"]) == ["poolupsample", "unet"]
    assert reference["val loss"].tolist() == [
        WRITE_UP_RESULTS["poolupsample"]["val_loss"],
        WRITE_UP_RESULTS["unet"]["val_loss"],
    ]


def test_compare_renders_ratios_at_one_precision_and_counts_with_separators(tmp_path):
    write_run(tmp_path, "unet", 0.375)
    frame = compare(["poolupsample", "unet"], [(32, 32)], run_dirs=[tmp_path])
    csv_rows = render_comparison(frame, "csv").splitlines()
    header = csv_rows[0].split(",")
    first = next(r for r in csv_rows if r.startswith("poolupsample,32,formula,")).split(",")
    assert first[header.index("weights ratio")] == "1.000"  # not 1.0 next to 1.15
    unet = next(r for r in csv_rows if r.startswith("unet,32,formula + run")).split(",")
    assert unet[header.index("weights ratio")] == "1.150"  # 57864 / 50304
    assert unet[header.index("weights")] == "57864"  # exact for programs
    trained = analyse("unet", {"NIC": 1}).totals_at([(32, 32)])["connections"][0]
    for fmt in ("markdown", "text", "latex"):
        rendered = render_comparison(frame, fmt)
        assert "1.000" in rendered and "1.150" in rendered and "1.0 " not in rendered, fmt
        assert "57,864" in rendered and f"{trained:,}" in rendered, fmt
    markdown = render_comparison(frame, "markdown").splitlines()
    separator = markdown[1].split("|")[1:-1]
    columns = [c.strip() for c in markdown[0].split("|")[1:-1]]
    assert separator[columns.index("weights ratio")].endswith(":")  # numbers right-aligned
    assert separator[columns.index("model")].startswith(":-")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_compare_latex_is_booktabs_with_a_label_and_compiles(tmp_path):
    frame = compare(["poolupsample", "unet", "convtranspose"], [(32, 32), (64, 64)],
                    run_dirs=[tmp_path])
    latex = render_comparison(frame, "latex")
    assert latex.startswith("% needs \\usepackage{booktabs}\n")
    assert "\\label{tab:comparison}" in latex and "\\toprule" in latex
    column_format = latex.split("\\begin{tabular}{")[1].split("}")[0]
    assert column_format.startswith("lrl") and column_format.count("r") >= 12
    compile_latex(tmp_path, latex, "booktabs")


def test_compare_picks_up_runs(tmp_path):
    write_run(tmp_path, "unet", 0.375)
    frame = compare(["unet"], [(32, 32), (64, 64)], run_dirs=[tmp_path])
    measured = frame[frame["source"].str.startswith("formula + run")]
    assert len(measured) == 1 and measured.iloc[0]["resolution"] == "32"
    assert measured.iloc[0]["val accuracy %"] == 37.5
    assert (
        measured.iloc[0]["trained-net connections"]
        == analyse("unet", {"NIC": 1}).totals_at([(32, 32)])["connections"][0]
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_compare_memory_columns(tmp_path, batch):
    """Saved-for-backward bytes equal what autograd keeps; the peaks are the memory model's."""
    resolutions = [(32, 32), (64, 64)]
    frame = compare(["poolupsample", "unet"], resolutions, run_dirs=[tmp_path],
                    include_reference=False, memory_batch=batch)
    for name in ("poolupsample", "unet"):
        analysis = analyse(name)
        result = memory_model(analysis).evaluate([(batch, h, w) for h, w in resolutions])
        rows = frame[frame["model"] == name]
        for j, (height, width) in enumerate(resolutions):
            row = rows.iloc[j]
            autograd, _ = measure_saved(analysis.network, torch.randn(batch, 3, height, width))
            assert row[f"saved for backward B={batch}"] == autograd
            assert row[f"training peak B={batch}"] == result["training_peak"][j]
            assert row[f"inference peak B={batch}"] == result["inference_peak"][j]
    assert f"training peak B={batch}" in render_comparison(frame, "markdown")
    assert "MiB" in render_comparison(frame, "text")  # bytes for people; exact in csv and json
    assert not compare(["unet"], resolutions[:1], run_dirs=[tmp_path],
                       memory_batch=None).columns.str.contains("peak").any()


def test_compare_cli_mixes_registry_and_torchvision(capsys):
    assert (
        main(["compare", "poolupsample", "torchvision:resnet18", "--res", "64", "--format", "csv"])
        == 0
    )
    out = capsys.readouterr().out
    assert "torchvision:resnet18,64,formula" in out


def test_compare_counts_a_model_of_fixed_size_at_the_sizes_asked_for(capsys):
    """compare passes its resolutions to the capture: a ViT, which asserts its size, is counted
    concretely there (before, the concrete rung had no size to count at)."""
    from torchvision.models import vit_b_32

    assert main(["compare", "torchvision:vit_b_32", "torchvision:resnet18", "--res", "224",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # one object per model and resolution
    vit = next(row for row in rows if row["model"] == "torchvision:vit_b_32")
    assert vit["weights"] == sum(p.numel() for p in vit_b_32().parameters())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    write_run(out / "training", "poolupsample")
    lines = report.build_report(out, segmentation=False)
    return out, lines


def test_report_writes_every_part(built):
    out, lines = built
    for model in report.SEED_MODELS:
        for suffix in ("csv", "md", "tex", "json", "txt"):
            assert (out / "costs" / f"{model}.{suffix}").stat().st_size > 100
        assert (out / "verification" / f"{model}.txt").read_text().count("0 mismatch(es)") == 1
        for suffix in ("png", "pdf"):
            assert (out / "figures" / f"per_layer_connections_{model}.{suffix}").exists()
        for suffix in ("md", "csv", "json"):
            assert (out / "memory" / f"{model}.{suffix}").stat().st_size > 100
        data = json.loads((out / "memory" / f"{model}.json").read_text())
        assert data["points"] == [f"B={b} @{s}" for s in (32, 64) for b in report.MEMORY_BATCHES]
    assert (out / "figures" / "connections_vs_resolution.png").exists()
    for suffix in ("png", "pdf"):
        assert (out / "figures" / f"memory_vs_batch.{suffix}").stat().st_size > 1000
    assert (out / "figures" / "accuracy_vs_connections.pdf").exists()
    assert "24 wrong, 60 right, 24 not given" in (out / "check" / "writeup_table.md").read_text()
    readme = (out / "README.md").read_text()
    assert "convtally report" in readme and "training/poolupsample/" in readme
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_report_without_runs_says_accuracy_needs_training(tmp_path):
    lines = report.build_report(tmp_path, segmentation=False)
    assert any("accuracy needs `convtally train colour" in line for line in lines)


def test_failed_report_leaves_previous_reports(built, monkeypatch):
    out, _ = built
    before = (out / "costs" / "unet.md").read_text()
    (out / "costs" / "unet.md").write_text(before + "marker")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "_hand_check", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.build_report(out, segmentation=False)
    assert (out / "costs" / "unet.md").read_text().endswith("marker")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_sweep_runs_do_not_stand_for_the_model(tmp_path):
    write_run(tmp_path, "convtranspose", 0.25)
    write_run(tmp_path / "sweep", "convtranspose", 0.75)  # sweep/convtranspose: two levels down
    frame = compare(["convtranspose"], [(32, 32)], run_dirs=[tmp_path])
    measured = frame[frame["source"].str.startswith("formula + run")]
    assert measured["val accuracy %"].tolist() == [25.0]


def test_runs_of_other_hyperparameters_are_not_attached(tmp_path):
    write_run(tmp_path, "poolupsample", 0.5)  # trained with NF=32
    frame = compare(["poolupsample"], [(32, 32)], {"NF": 8}, run_dirs=[tmp_path])
    assert list(frame["source"]) == ["formula"]  # no run, and no write-up row for NF=8


def test_compare_cli_batch_sets_the_memory_columns(tmp_path, capsys):
    out = tmp_path / "comparison.json"
    assert main(["compare", "poolupsample", "--res", "32", "--batch", "8", "-o", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    expected = compare(["poolupsample"], [(32, 32)], memory_batch=8, run_dirs=[tmp_path])
    assert row["training peak B=8"] == int(expected.iloc[0]["training peak B=8"])
    assert "training peak B=1" not in row
    assert main(["compare", "poolupsample", "--batch", "0"]) == 2
    assert "--batch must be a positive integer, got 0" in capsys.readouterr().err


def test_the_index_lists_the_benchmark_and_zoo_reports_by_their_titles(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "analysis_speed.md").write_text("# Analysis speed\n\ntext\n")
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "zoo_200x168.md").write_text("\n# Zoo at 200x168 (generated)\n")
    lines = report._readme(tmp_path, [], "today", "machine")
    assert lines[-2:] == ["- `benchmarks/analysis_speed.md`: Analysis speed",
                          "- `zoo/zoo_200x168.md`: Zoo at 200x168 (generated)"]
