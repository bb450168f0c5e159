"""DeepLabV3 fine-tune model, weight loading, losses and metrics."""

from __future__ import annotations

import math
from urllib.error import URLError

import pytest
import torch
from convtally.models import segmentation
from convtally.models.segmentation import (
    build_finetune_model,
    iou_counts,
    learned_parameters,
    read_state_dict_file,
    segmentation_scores,
    soft_iou_loss,
)
from torch import nn


def pretrained_mobilenet_state() -> dict[str, torch.Tensor]:
    """A stand-in for a COCO checkpoint: 21-class DeepLabV3-MobileNetV3 with its aux head."""
    torch.manual_seed(1)
    model = segmentation.BACKBONES["mobilenet_v3_large"][0](
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    return model.state_dict()


def test_default_model_is_resnet101_learning_only_a_two_class_head():
    model = build_finetune_model()  # resnet101, weights none: the only resnet101 in the tests

    head = model.classifier[4]
    assert isinstance(head, nn.Conv2d)
    assert (head.in_channels, head.out_channels, head.kernel_size) == (256, 2, (1, 1))
    assert model.aux_classifier is None
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.4.weight", "classifier.4.bias"]
    assert [id(p) for p in learned_parameters(model)] == [id(head.weight), id(head.bias)]
    # the backbone really is a ResNet-101: 3 + 4 + 23 + 3 bottleneck blocks
    assert sum(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5)) == 33


def test_unknown_backbone_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_finetune_model("vgg16")


def test_weights_file_loads_frozen_parts_and_ignores_aux_and_old_head(tmp_path):
    state = pretrained_mobilenet_state()
    path = tmp_path / "deeplab.pt"
    torch.save(state, path)

    model = build_finetune_model("mobilenet_v3_large", weights=str(path))

    loaded = model.state_dict()
    for key in ("backbone.0.0.weight", "classifier.0.convs.0.0.weight", "classifier.2.running_var"):
        assert torch.equal(loaded[key], state[key])
    assert loaded["classifier.4.weight"].shape == (2, 256, 1, 1)
    assert not any(key.startswith("aux_classifier.") for key in loaded)


def test_coco_weights_come_from_torchvisions_url(monkeypatch):
    state = pretrained_mobilenet_state()
    asked = []

    def fake_download(url, **kwargs):
        asked.append(url)
        return state

    monkeypatch.setattr(segmentation, "load_state_dict_from_url", fake_download)
    model = build_finetune_model("mobilenet_v3_large", weights="coco")

    assert asked == [segmentation.BACKBONES["mobilenet_v3_large"][1].url]
    assert torch.equal(model.state_dict()["backbone.0.0.weight"], state["backbone.0.0.weight"])


def test_coco_weights_without_network_give_one_line_error(monkeypatch):
    def no_network(url, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(segmentation, "load_state_dict_from_url", no_network)
    with pytest.raises(FileNotFoundError, match="--weights PATH") as caught:
        build_finetune_model("mobilenet_v3_large", weights="coco")
    message = str(caught.value)
    assert "\n" not in message
    assert "deeplabv3_mobilenet_v3_large-fc3c493d.pth" in message


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_finetune_model("mobilenet_v3_large", weights=str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"this is not a torch file", "cannot read weights file"),
        ([torch.zeros(2)], "holds a list, not a state_dict"),
        ({"weight": "not a tensor"}, "entry 'weight' holds a str"),
    ],
)
def test_weights_file_that_is_not_a_state_dict(tmp_path, content, expected):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=expected) as caught:
        read_state_dict_file(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_weights_with_mismatched_keys_or_shapes_name_the_first_offender(tmp_path):
    good = pretrained_mobilenet_state()
    cases = {
        "missing key 'backbone.0.0.weight'": {k: v for k, v in good.items()
                                              if k != "backbone.0.0.weight"},
        "unexpected key 'backbone.99.weight'": {**good, "backbone.99.weight": torch.zeros(1)},
        "key 'classifier.1.weight' has shape (3,)": {**good, "classifier.1.weight": torch.zeros(3)},
    }
    for expected, state in cases.items():
        path = tmp_path / "weights.pt"
        torch.save(state, path)
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            build_finetune_model("mobilenet_v3_large", weights=str(path))


def logits_for_foreground_probability(probability: torch.Tensor) -> torch.Tensor:
    """(N, H, W) foreground probabilities -> (N, 2, H, W) logits (background logit 0)."""
    return torch.stack([torch.zeros_like(probability), torch.logit(probability)], dim=1)


def test_soft_iou_loss_by_hand():
    # two pixels, both p = 3/4; truth 1 and 0:
    # I = 0.75*1 + 0.75*0 = 0.75; U = (0.75 + 1 - 0.75) + (0.75 + 0 - 0) = 1.75
    # loss = 1 - 0.75 / 1.75 = 1 - 3/7 = 4/7
    logits = logits_for_foreground_probability(torch.tensor([[[0.75, 0.75]]], dtype=torch.float64))
    masks = torch.tensor([[[1, 0]]])
    assert soft_iou_loss(logits, masks).item() == pytest.approx(4 / 7, rel=1e-12)


def test_soft_iou_loss_is_zero_for_a_perfect_prediction():
    masks = torch.tensor([[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 1, 0]]])
    sign = masks.double() * 2 - 1  # +1 foreground, -1 background
    logits = torch.stack([-60 * sign, 60 * sign], dim=1)
    assert soft_iou_loss(logits, masks).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_iou_loss_gradient_matches_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    masks = (torch.rand(2, 3, 4) > 0.5).double()
    assert torch.autograd.gradcheck(lambda x: soft_iou_loss(x, masks), (logits,))


def test_metrics_on_hand_made_masks():
    # four 2x2 images (1 = foreground)
    truth = torch.tensor([
        [[1, 1], [0, 0]],   # A
        [[1, 1], [1, 0]],   # B
        [[0, 0], [0, 0]],   # C: empty truth
        [[0, 0], [0, 0]],   # D: empty truth
    ])
    predicted = torch.tensor([
        [[1, 0], [0, 0]],   # A: fg I=1, U=2 -> IoU 0.5  | bg I=2, U=3
        [[1, 1], [1, 1]],   # B: fg I=3, U=4 -> IoU 0.75 | bg I=0, U=1
        [[0, 0], [0, 0]],   # C: fg I=0, U=0 -> IoU 1    | bg I=4, U=4
        [[0, 1], [0, 0]],   # D: fg I=0, U=1 -> IoU 0    | bg I=3, U=4
    ])
    counts = iou_counts(predicted, truth)
    assert counts.tolist() == [
        [[2, 3], [1, 2]], [[0, 1], [3, 4]], [[4, 4], [0, 0]], [[3, 4], [0, 1]],
    ]

    scores = segmentation_scores(counts)
    # thresholds passed strictly: A 0.5 passes none (0/10); B 0.75 passes 0.5..0.70 (5/10);
    # C empty union (1/1); D 0 (0/10)  ->  (0 + 0.5 + 1 + 0) / 4 = 0.375
    assert scores["thresholded_iou"] == pytest.approx(0.375)
    # (0.5 + 0.75 + 1 + 0) / 4 = 0.5625
    assert scores["mean_foreground_iou"] == pytest.approx(0.5625)
    # fg: I = 1+3+0+0 = 4, U = 2+4+0+1 = 7; bg: I = 2+0+4+3 = 9, U = 3+1+4+4 = 12
    # (4/7 + 9/12) / 2 = (16/28 + 21/28) / 2 = 37/56
    assert scores["class_mean_iou"] == pytest.approx(37 / 56)


def test_thresholds_are_compared_exactly_at_the_edges():
    # IoU exactly 0.55 (11/20) passes only 0.5; 0.95 (19/20) passes 0.5..0.9; 1 passes all
    truth = torch.zeros(3, 1, 20, dtype=torch.long)
    predicted = torch.zeros(3, 1, 20, dtype=torch.long)
    truth[0, 0, :20], predicted[0, 0, :11] = 1, 1
    truth[1, 0, :20], predicted[1, 0, :19] = 1, 1
    truth[2, 0, :5], predicted[2, 0, :5] = 1, 1
    per_image = segmentation.thresholded_iou_per_image(iou_counts(predicted, truth))
    assert per_image.tolist() == [0.1, 0.9, 1.0]


def test_class_mean_iou_leaves_out_a_class_absent_everywhere():
    everything_background = torch.zeros(2, 3, 3, dtype=torch.long)
    scores = segmentation_scores(iou_counts(everything_background, everything_background))
    assert scores == {"thresholded_iou": 1.0, "mean_foreground_iou": 1.0, "class_mean_iou": 1.0}
    assert not math.isnan(scores["class_mean_iou"])
