"""Segmentation fine-tuning: fast path vs slow path, short runs, run folder, CLI handler."""

from __future__ import annotations

import argparse
import json
from urllib.error import URLError

import pytest
import torch
from convtally.models import flowers
from convtally.models.flowers import load_flower_split, normalize_images, write_synthetic_flowers
from convtally.models.segmentation import LOSSES, build_finetune_model, frozen_features, head_logits
from convtally.models.train_segment import (
    SegmentConfig,
    batches,
    build_optimizer,
    configure_segment_parser,
    full_forward,
    train_one_epoch,
    train_segmentation,
)

SMALL = dict(backbone="mobilenet_v3_large", weights="none", size=64, batch_size=4,
             device="cpu", progress=False)
METRIC_KEYS = {"thresholded_iou", "mean_foreground_iou", "class_mean_iou"}


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    write_synthetic_flowers(root, count=12, without_trimap=[4])
    return root


def parse(*argv: str) -> argparse.Namespace:
    return configure_segment_parser(argparse.ArgumentParser()).parse_args(list(argv))


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_finetune_model("mobilenet_v3_large", weights="none")


def test_optimizer_gets_exactly_the_classifier_4_parameters():
    model = small_model()
    optimizer = build_optimizer(model, lr=0.01)
    given = [p for group in optimizer.param_groups for p in group["params"]]
    head = model.classifier[4]
    assert [id(p) for p in given] == [id(head.weight), id(head.bias)]


@pytest.mark.parametrize("loss_name", ["ce", "iou"])
def test_fast_path_head_gradients_equal_slow_path_in_eval_mode(loss_name):
    model = small_model().eval()
    torch.manual_seed(1)
    images = normalize_images(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    masks = (torch.rand(3, 64, 64) > 0.6).long()
    loss_fn = LOSSES[loss_name]
    head = model.classifier[4]

    slow_logits = model(images)["out"]
    loss_fn(slow_logits, masks).backward()
    slow_grads = [head.weight.grad.clone(), head.bias.grad.clone()]
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        features = frozen_features(model, images)
    fast_logits = head_logits(head, features, (64, 64))
    loss_fn(fast_logits, masks).backward()

    torch.testing.assert_close(fast_logits, slow_logits)
    torch.testing.assert_close(head.weight.grad, slow_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.bias.grad, slow_grads[1], rtol=1e-5, atol=1e-7)
    assert head.weight.grad.abs().sum() > 0


def test_slow_path_step_changes_only_the_head(mini_data):
    model = small_model()
    train = load_flower_split(mini_data, "train", size=64)
    before = {k: v.clone() for k, v in model.named_parameters()}
    model.train()
    train_one_epoch(full_forward(model, train.images, torch.device("cpu")), train.masks,
                    LOSSES["ce"], build_optimizer(model, 0.01), batches(4, 4), False, "test")
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert changed == ["classifier.4.weight", "classifier.4.bias"]


def test_batches_never_leave_a_single_image_when_asked():
    assert [len(b) for b in batches(9, 4)] == [4, 4, 1]
    assert [len(b) for b in batches(9, 4, drop_single=True)] == [4, 4]
    assert [len(b) for b in batches(10, 4, drop_single=True)] == [4, 4, 2]


@pytest.mark.parametrize("loss_name", ["ce", "iou"])
def test_short_run_lowers_the_loss_and_writes_the_run_folder(mini_data, tmp_path, loss_name):
    out = tmp_path / "run"
    metrics = train_segmentation(SegmentConfig(
        loss=loss_name, epochs=4, lr=0.05, data=str(mini_data), out=str(out), **SMALL
    ))

    losses = [row["train_loss"] for row in metrics["epochs"]]
    assert losses[-1] < losses[0], losses
    assert sorted(p.name for p in out.iterdir()) == [
        "curves.png", "head.pt", "metrics.json", "predictions.png", "training_state.pt"
    ]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["task"] == "segment"
    assert metrics["model"] == "deeplabv3_mobilenet_v3_large"
    assert {"loss", "path", "weights"} <= set(metrics["settings"])
    assert metrics["settings"]["path"] == "fast" and metrics["settings"]["loss"] == loss_name
    assert metrics["data"]["train_images"] == 8 and metrics["data"]["val_images"] == 3
    assert set(metrics["data"]) >= {"source", "description", "train_images", "val_images"}
    assert metrics["device"].startswith("cpu")
    assert set(metrics["epochs"][0]) == {
        "epoch", "train_loss", "val_loss", "seconds", *METRIC_KEYS
    }
    assert set(metrics["final"]) >= {"train_loss", "val_loss", "total_seconds", *METRIC_KEYS}
    assert set(metrics["software"]) == {"python", "torch", "cuda", "cudnn", "torchvision",
                                        "convtally"}
    assert metrics["started_at"] <= metrics["finished_at"]
    for key in METRIC_KEYS:
        assert 0.0 <= metrics["final"][key] <= 1.0


def test_cli_handler_runs_the_slow_path_and_saves_only_the_head(mini_data, tmp_path, capsys):
    out = tmp_path / "slow"
    args = parse("--loss", "iou", "--backbone", "mobilenet_v3_large", "--weights", "none",
                 "--epochs", "1", "--size", "64", "--batch-size", "3", "--path", "slow",
                 "--device", "cpu", "--data", str(mini_data), "--out", str(out),
                 "--no-progress")

    assert args.handler(args) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["path"] == "slow"
    assert "feature_cache_seconds" not in metrics["final"]
    head = torch.load(out / "head.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "weight": (2, 256, 1, 1), "bias": (2,)
    }
    printed = capsys.readouterr()
    assert "slow path" in printed.out + printed.err


@pytest.mark.parametrize("argv, message", [
    (["--loss", "dice"], "--loss 'dice' is not one of ce, iou"),
    (["--path", "medium"], "--path 'medium' is not one of fast, slow"),
    (["--backbone", "vgg16"], "--backbone 'vgg16' is not one of"),
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--size", "8"], "--size 8 must be at least 32"),
    (["--lr", "-1"], "--lr -1.0 must be a positive number"),
    (["--path", "slow", "--batch-size", "1"], "--batch-size 1 with --path slow"),
])
def test_bad_arguments_are_one_line_value_errors(argv, message, tmp_path):
    args = parse(*argv, "--data", str(tmp_path / "never-read"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as caught:
        args.handler(args)
    assert "\n" not in str(caught.value)


def test_cli_without_data_or_network_says_what_to_do(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(flowers, "download_and_extract_archive", no_network)
    monkeypatch.setattr(flowers, "download_url", no_network)
    args = parse("--weights", "none", "--device", "cpu", "--data", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="download 17flowers.tgz, trimaps.tgz"):
        args.handler(args)
    args = parse("--no-download", "--data", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="jpg not found"):
        args.handler(args)
