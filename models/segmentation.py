"""DeepLabV3 fine-tuned for binary (flower / background) segmentation, as in write-up Part D.

Every pretrained parameter is frozen; `classifier[4]` (the last 1x1 convolution) is replaced by a
fresh `Conv2d(256, num_classes)` and is the only thing learned. The torchvision auxiliary head is
not used (aux_loss stays None; a COCO checkpoint's `aux_classifier.*` entries are dropped).

Losses and metrics for the two-class output (channel 1 = foreground) live here as well.

Metric definitions (all on hard predictions, foreground where its logit beats background's,
i.e. softmax foreground probability > 0.5):

- foreground IoU of an image: |P ∩ G| / |P ∪ G| over its pixels; an image whose union is empty
  (no foreground in truth and none predicted) scores 1.0, since the prediction is exactly right.
- thresholded IoU (the write-up's mIOU): per image, the fraction of the ten thresholds
  0.5, 0.55, ..., 0.95 that the foreground IoU exceeds strictly, averaged over images (the
  write-up's `clamp(20 * (iou - 0.5), 0, 10).ceil() / 10`); an empty-union image scores 1.0.
- mean foreground IoU: the foreground IoU averaged over images.
- class-mean IoU: the standard semantic-segmentation mIoU: for background and for foreground,
  intersection and union summed over all pixels of all images, IoU = sum I / sum U, then the
  mean over the two classes; a class absent from truth and prediction everywhere is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.hub import load_state_dict_from_url
from torch.nn import functional as F
from torchvision.models import segmentation as tv_segmentation

HEAD_PREFIX = "classifier.4."
PRETRAINED_CLASSES = 21  # the COCO-with-VOC-labels checkpoints predict the 21 VOC classes
THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))

BACKBONES = {
    "resnet101": (
        tv_segmentation.deeplabv3_resnet101,
        tv_segmentation.DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "resnet50": (
        tv_segmentation.deeplabv3_resnet50,
        tv_segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "mobilenet_v3_large": (
        tv_segmentation.deeplabv3_mobilenet_v3_large,
        tv_segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
}


def check_backbone(backbone: str) -> str:
    """Return `backbone` if it is a known DeepLabV3 backbone, else raise ValueError."""
    if backbone not in BACKBONES:
        raise ValueError(
            f"unknown backbone {backbone!r}; use one of {', '.join(BACKBONES)}"
        )
    return backbone


def build_finetune_model(
    backbone: str = "resnet101", weights: str = "none", num_classes: int = 2
) -> nn.Module:
    """Return DeepLabV3 with frozen pretrained parts and a fresh learnable `classifier[4]`.

    `weights`: 'coco' (torchvision's COCO_WITH_VOC_LABELS_V1 checkpoint), 'none' (random
    initialisation, nothing downloaded) or the path of a local DeepLabV3 state_dict file.
    """
    builder, _ = BACKBONES[check_backbone(backbone)]
    # weights_backbone=None as well, so that 'none' downloads nothing (ImageNet is the default).
    model = builder(
        weights=None, weights_backbone=None, num_classes=PRETRAINED_CLASSES, aux_loss=None
    )
    if weights == "coco":
        load_pretrained(model, coco_state_dict(backbone), "the COCO checkpoint")
    elif weights != "none":
        load_pretrained(model, read_state_dict_file(weights), str(weights))
    return replace_head(model, num_classes)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Freeze every parameter of `model`, put a fresh Conv2d(256, num_classes) at classifier[4].

    Returns `model` (changed in place), whose only trainable parameters are `classifier.4.*`.
    """
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.classifier[4] = nn.Conv2d(256, num_classes, kernel_size=(1, 1), stride=(1, 1))
    return model


def learned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters the fine-tune learns: those named `classifier.4.*`, in order."""
    return [p for name, p in model.named_parameters() if name.startswith(HEAD_PREFIX)]


def coco_state_dict(backbone: str) -> dict[str, Tensor]:
    """Return torchvision's COCO_WITH_VOC_LABELS_V1 state_dict for `backbone` (download, cached)."""
    _, weights = BACKBONES[check_backbone(backbone)]
    try:
        return load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise FileNotFoundError(
            f"cannot get the COCO weights {weights} from {weights.url} "
            f"({type(error).__name__}: {_first_line(error)}); put that file at {target}, "
            "or pass --weights PATH (a local state_dict) or --weights none"
        ) from None


def read_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Return the state_dict (str -> Tensor) saved in `path`; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} not found; pass coco, none or the path of a state_dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a file it cannot read
        # torch's own message is many lines about the weights_only default; the type is enough
        raise ValueError(
            f"cannot read weights file {path} with torch.load(weights_only=True) "
            f"({type(error).__name__}): not a torch.save file, or it holds more than tensors; "
            "save one with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"weights file {path} holds a {type(state).__name__}, not a state_dict; "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(
                f"weights file {path} is not a state_dict: entry {key!r} holds a "
                f"{type(value).__name__}, not a tensor; save one with "
                "torch.save(model.state_dict(), PATH)"
            )
    return dict(state)


def load_pretrained(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load `state` into every part of `model` that the fine-tune keeps frozen.

    `aux_classifier.*` and `classifier.4.*` entries are ignored (the head is replaced anyway);
    every other key must be present with the model's shape, else ValueError naming the first.
    """
    state = {k: v for k, v in state.items() if not _replaced_or_unused(k)}
    expected = {k: v for k, v in model.state_dict().items() if not _replaced_or_unused(k)}
    problem = first_state_dict_mismatch(expected, state)
    if problem:
        raise ValueError(
            f"weights from {source} do not fit DeepLabV3 with this backbone: {problem}; "
            "pass a state_dict of the same torchvision DeepLabV3 model, coco or none"
        )
    model.load_state_dict(state, strict=False)


def first_state_dict_mismatch(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor]
) -> str | None:
    """Return a description of the first key that is unexpected, missing or misshapen, or None."""
    for key in given:
        if key not in expected:
            return f"unexpected key {key!r}"
    for key, value in expected.items():
        if key not in given:
            return f"missing key {key!r}"
        if tuple(given[key].shape) != tuple(value.shape):
            return (
                f"key {key!r} has shape {tuple(given[key].shape)}, "
                f"the model expects {tuple(value.shape)}"
            )
    return None


def _replaced_or_unused(key: str) -> bool:
    return key.startswith(HEAD_PREFIX) or key.startswith("aux_classifier.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no message"


def frozen_features(model: nn.Module, images: Tensor) -> Tensor:
    """Return the 256-channel features that enter classifier[4]: backbone, then classifier[0:4]."""
    features = model.backbone(images)["out"]
    for layer in list(model.classifier)[:4]:  # DeepLabHead cannot be sliced
        features = layer(features)
    return features


def head_logits(head: nn.Module, features: Tensor, size: tuple[int, int]) -> Tensor:
    """Return `head(features)` upsampled to `size` as DeepLabV3 does (bilinear, no corner align)."""
    return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)


def cross_entropy_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Return the mean per-pixel cross-entropy of (N, C, H, W) logits against (N, H, W) labels."""
    return F.cross_entropy(logits, masks.long())


def soft_iou_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Return the write-up's soft IoU loss, 1 - sum(p*g) / sum(p + g - p*g), over the batch.

    p is the softmax foreground (channel 1) probability and g the 0/1 foreground mask.
    """
    foreground = F.softmax(logits, dim=1)[:, 1]
    truth = masks.to(foreground.dtype)
    intersection = (foreground * truth).sum()
    union = (foreground + truth - foreground * truth).sum()
    return 1.0 - intersection / union


LOSSES = {"ce": cross_entropy_loss, "iou": soft_iou_loss}


def predicted_foreground(logits: Tensor) -> Tensor:
    """Return the (N, H, W) boolean foreground prediction: channel 1 beats channel 0."""
    return logits.argmax(dim=1) == 1


def iou_counts(predicted: Tensor, truth: Tensor) -> Tensor:
    """Return per-image (N, 2, 2) int64 counts: [class (background, foreground), (I, U)].

    `predicted` and `truth` are (N, H, W) foreground masks (bool or 0/1).
    """
    predicted = predicted.bool().flatten(1)
    truth = truth.bool().flatten(1)
    counts = []
    for pred_class, true_class in ((~predicted, ~truth), (predicted, truth)):
        intersection = (pred_class & true_class).sum(dim=1)
        union = (pred_class | true_class).sum(dim=1)
        counts.append(torch.stack([intersection, union], dim=1))
    return torch.stack(counts, dim=1).long().cpu()


def foreground_iou_per_image(counts: Tensor) -> Tensor:
    """Return each image's foreground IoU (float64) from `iou_counts`; empty union gives 1.0."""
    intersection, union = counts[:, 1, 0].double(), counts[:, 1, 1].double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def thresholded_iou_per_image(counts: Tensor) -> Tensor:
    """Return each image's fraction of thresholds 0.5..0.95 its foreground IoU exceeds.

    Compared exactly in integers (IoU > 0.5 + 0.05k  <=>  20 I > (10 + k) U); empty union: 1.0.
    """
    intersection, union = counts[:, 1, 0], counts[:, 1, 1]
    steps = torch.arange(len(THRESHOLDS))
    passed = (20 * intersection[:, None] > (10 + steps)[None, :] * union[:, None]).double()
    fraction = passed.mean(dim=1)
    return torch.where(union > 0, fraction, torch.ones_like(fraction))


def class_mean_iou(counts: Tensor) -> float:
    """Return the dataset-level mIoU over background and foreground (absent classes left out)."""
    totals = counts.sum(dim=0).double()  # (class, (I, U))
    present = totals[:, 1] > 0
    return float((totals[present, 0] / totals[present, 1]).mean())


def segmentation_scores(counts: Tensor) -> dict[str, float]:
    """Return thresholded_iou, mean_foreground_iou and class_mean_iou for stacked `iou_counts`."""
    return {
        "thresholded_iou": float(thresholded_iou_per_image(counts).mean()),
        "mean_foreground_iou": float(foreground_iou_per_image(counts).mean()),
        "class_mean_iou": class_mean_iou(counts),
    }
