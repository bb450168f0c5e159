"""Colourization training, resume, divergence, sweep and the CLI (models/train_colour.py)."""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from convtally.models import cifar, runs, train_colour
from convtally.models.train_colour import ColourConfig, train_colourization

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / cifar.CIFAR_DIRNAME


@pytest.fixture
def config(tmp_path, data_dir) -> ColourConfig:
    """A tiny, fast run on the generated data."""
    return ColourConfig(model="convtranspose", epochs=2, batch_size=8, lr=0.01, filters=4,
                        num_colours=6, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                        device="cpu", out=str(tmp_path / "run"), progress=False, num_samples=3)


def quiet(*args, **kwargs) -> None:
    pass


SCHEMA = {
    "task", "model", "settings", "data", "device", "epochs", "final", "software",
    "started_at", "finished_at",
}


@pytest.mark.parametrize("model", train_colour.MODEL_NAMES)
def test_training_lowers_loss_and_writes_the_run_folder(config, model):
    config = replace(config, model=model, epochs=3)
    metrics = train_colourization(config, log=quiet)
    run = Path(config.out)

    losses = [row["train_loss"] for row in metrics["epochs"]]
    assert losses[-1] < losses[0]
    assert SCHEMA <= set(metrics)
    assert metrics["task"] == "colour" and metrics["model"] == model
    assert metrics["settings"] == {"epochs": 3, "batch_size": 8, "lr": 0.01, "kernel": 3,
                                   "filters": 4, "num_colours": 6, "num_in_channels": 1,
                                   "seed": 0, "category": 7}
    data = metrics["data"]
    assert data["source"] == config.data_dir and "subset" in data["description"]
    assert (data["train_images"], data["val_images"]) == (40, 6)
    assert metrics["device"].startswith("cpu")
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3]
    for row in metrics["epochs"]:
        assert set(row) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
        assert 0 <= row["val_accuracy"] <= 1
    assert set(metrics["final"]) == {"train_loss", "val_loss", "val_accuracy", "total_seconds"}
    assert metrics["final"]["val_loss"] == metrics["epochs"][-1]["val_loss"]
    assert set(metrics["software"]) == {"python", "torch", "cuda", "cudnn", "convtally"}
    assert metrics["finished_at"] >= metrics["started_at"]

    assert json.loads((run / "metrics.json").read_text()) == metrics
    for name in ("curves.png", "samples.png"):
        assert (run / name).read_bytes().startswith(b"\x89PNG")
    weights = torch.load(run / "checkpoint.pt", weights_only=True)
    model_net = train_colour.build_model(config)
    model_net.load_state_dict(weights)
    state = torch.load(run / "training_state.pt", weights_only=True)
    assert state["epoch"] == 3 and "optimizer" in state and "rng" in state


def test_validation_metrics_match_an_independent_computation(config):
    metrics = train_colourization(replace(config, epochs=1), log=quiet)
    data = train_colour.prepare_colour_data(config, torch.device("cpu"))
    model = train_colour.build_model(config)
    model.load_state_dict(torch.load(Path(config.out) / "checkpoint.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        logits = model(data.val_gray)
    target = data.val_labels.long()
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    accuracy = (logits.argmax(1) == target).float().mean().item()
    assert metrics["final"]["val_loss"] == pytest.approx(loss, abs=1e-5)
    assert metrics["final"]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_targets_are_nearest_centroids_and_inputs_grayscale(config):
    data = train_colour.prepare_colour_data(config, torch.device("cpu"))
    images = cifar.load_cifar(config.data_dir, 7).test.images
    rgb = cifar.to_unit_range(images)
    torch.testing.assert_close(data.val_gray, rgb.mean(dim=1, keepdim=True))
    distances = ((rgb.permute(0, 2, 3, 1)[..., None, :] - data.centroids) ** 2).sum(-1)
    assert torch.equal(data.val_labels.long(), distances.argmin(-1))


def test_resume_continues_from_the_saved_epoch(config, tmp_path):
    straight = train_colourization(replace(config, out=str(tmp_path / "straight")), log=quiet)
    train_colourization(replace(config, epochs=1), log=quiet)
    lines = []
    resumed = train_colourization(replace(config, resume=True), log=lines.append)

    assert lines[0].startswith("resuming") and "after epoch 1" in lines[0]
    assert [row["epoch"] for row in resumed["epochs"]] == [1, 2]
    assert len(lines) == 2  # only epoch 2 was trained
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert resumed["final"][key] == pytest.approx(straight["final"][key], abs=1e-5)


def test_resume_refuses_other_settings_and_missing_state(config, tmp_path):
    train_colourization(replace(config, epochs=1), log=quiet)
    with pytest.raises(ValueError, match=r"setting lr is 0\.5 but the saved run used 0\.01"):
        train_colourization(replace(config, lr=0.5, resume=True), log=quiet)
    with pytest.raises(FileNotFoundError, match="training_state.pt is missing"):
        train_colourization(replace(config, out=str(tmp_path / "empty"), resume=True), log=quiet)


def test_nan_loss_stops_with_a_clear_message(config, monkeypatch, capsys):
    real_cross_entropy = torch.nn.functional.cross_entropy

    def nan_loss(*args, **kwargs):
        return real_cross_entropy(*args, **kwargs) * float("nan")

    monkeypatch.setattr(train_colour.F, "cross_entropy", nan_loss)
    with pytest.raises(runs.NonFiniteLossError, match=r"loss became nan at epoch 1, batch 1"):
        train_colourization(config, log=quiet)

    args = parse_colour(["--model", "unet", "--epochs", "1", "--filters", "4", "--colours", "6",
                         "--data", config.data_dir, "--cache-dir", config.cache_dir,
                         "--out", config.out, "--device", "cpu", "--no-progress"])
    assert args.handler(args) == 1
    assert "error: loss became nan" in capsys.readouterr().err


def test_huge_learning_rate_stops_with_a_clear_message(config):
    with pytest.raises(runs.NonFiniteLossError, match=r"loss became nan .*try a smaller --lr"):
        train_colourization(replace(config, lr=1e30), log=quiet)


@pytest.mark.parametrize("change, message", [
    ({"model": "resnet"}, "unknown colourization model 'resnet'"),
    ({"epochs": 0}, "--epochs 0 must be a positive integer"),
    ({"batch_size": -4}, "--batch-size -4 must be a positive integer"),
    ({"filters": 0}, "--filters 0 must be a positive integer"),
    ({"lr": 0.0}, "--lr 0.0 must be a positive finite number"),
    ({"lr": float("nan")}, "--lr nan must be a positive finite number"),
    ({"num_colours": 1}, "--colours 1 must lie in 2..256"),
    ({"seed": -1}, "--seed -1 must be non-negative"),
    ({"category": 12}, "--category 12 must be 0-9"),
    ({"model": "poolupsample", "kernel": 4}, "--kernel 4 makes poolupsample output"),
])
def test_bad_settings_are_refused(config, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train_colourization(replace(config, **change), log=quiet)


def test_bad_data_gives_a_clear_error(config, data_dir):
    (data_dir / "test_batch").write_bytes(b"\x80\x02}q\x00")
    with pytest.raises(ValueError, match="test_batch is truncated"):
        train_colourization(config, log=quiet)
    (data_dir / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch is missing"):
        train_colourization(config, log=quiet)


def parse_colour(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_colour.configure_colour_parser(parser)
    return parser.parse_args(argv)


def test_colour_handler_trains_and_reports(config, capsys):
    args = parse_colour(["--model", "poolupsample", "--epochs", "1", "--batch-size", "16",
                         "--filters", "4", "--colours", "6", "--category", "horse",
                         "--data", config.data_dir, "--cache-dir", config.cache_dir,
                         "--out", config.out, "--device", "cpu", "--no-progress"])
    assert args.handler is train_colour.run_colour
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "Epoch [1/1], train loss" in out and "val acc" in out
    metrics = json.loads((Path(config.out) / "metrics.json").read_text())
    assert metrics["settings"]["batch_size"] == 16 and metrics["settings"]["category"] == 7


def test_colour_handler_rejects_bad_arguments(config):
    for argv, message in ((["--model", "vgg"], "unknown colourization model 'vgg'"),
                          (["--model", "unet", "--epochs", "0"], "--epochs 0"),
                          (["--model", "unet", "--category", "zebra"], "unknown --category")):
        args = parse_colour([*argv, "--data", config.data_dir, "--out", config.out])
        with pytest.raises(ValueError, match=message):
            args.handler(args)


def test_sweep_writes_one_run_per_batch_size_and_a_summary(config, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_colour.configure_sweep_parser(parser)
    out = tmp_path / "sweep"
    args = parser.parse_args(["--batch-sizes", "4", "16", "--epochs", "1", "--filters", "4",
                              "--colours", "6", "--data", config.data_dir,
                              "--cache-dir", config.cache_dir, "--out", str(out),
                              "--device", "cpu", "--no-progress"])
    assert args.model == "convtranspose"
    assert args.handler(args) == 0
    for size in (4, 16):
        metrics = json.loads((out / f"batch_{size}" / "metrics.json").read_text())
        assert metrics["settings"]["batch_size"] == size
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["batch_size"]) for row in rows] == [4, 16]
    assert {"train_loss", "val_loss", "val_accuracy", "total_seconds"} <= set(rows[0])
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "batch  train loss" in printed

    with pytest.raises(ValueError, match=r"--batch-sizes \[0\] must be positive"):
        args.batch_sizes = [0]
        args.handler(args)


def test_cli_runs_train_colour(config):
    pytest.importorskip("convtally.models.train_segment",
                        reason="the CLI also needs models/train_segment")
    from convtally.analysis.cli import main

    common = ["--data", config.data_dir, "--cache-dir", config.cache_dir, "--out", config.out,
              "--device", "cpu", "--no-progress", "--filters", "4", "--colours", "6"]
    assert main(["train", "colour", "--model", "unet", "--epochs", "1", *common]) == 0
    assert main(["train", "colour", "--model", "unet", "--epochs", "0", *common]) == 2
    assert main(["train", "colour", "--model", "nope", *common]) == 2


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present")
def test_one_epoch_on_the_real_subset(tmp_path):
    config = ColourConfig(model="convtranspose", epochs=1, filters=4, data_dir=str(REAL_DATA),
                          cache_dir=str(tmp_path / "cache"), device="cpu",
                          out=str(tmp_path / "run"), progress=False, num_samples=2)
    metrics = train_colourization(config, log=quiet)
    assert (metrics["data"]["train_images"], metrics["data"]["val_images"]) == (524, 102)
    assert metrics["data"]["source"] == str(REAL_DATA)
    assert metrics["settings"]["num_colours"] == 24
    assert np.isfinite(metrics["final"]["val_loss"])
    # the shared folder (read-only or not) was left alone: the colours went to the cache
    assert Path(metrics["data"]["colours"]["cache"]).parent == tmp_path / "cache" / "colours"


def test_a_writable_data_folder_is_left_alone(config, data_dir, tmp_path):
    """Derived files go to the cache folder, not beside the data, even where it is writable."""
    before = sorted(path.name for path in data_dir.iterdir())
    metrics = train_colourization(replace(config, epochs=1), log=quiet)
    assert sorted(path.name for path in data_dir.iterdir()) == before
    cache = Path(metrics["data"]["colours"]["cache"])
    assert cache.parent == tmp_path / "cache" / "colours" and cache.is_file()
