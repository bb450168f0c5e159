"""Oxford 17 Flowers with trimaps, read from the official on-disk layout, as binary masks.

Layout of a data directory (as the three official downloads extract):
    jpg/image_0001.jpg ... jpg/image_1360.jpg    (17flowers.tgz)
    trimaps/image_NNNN.png                       (trimaps.tgz; only 848 images have one)
    datasplits.mat                               (trn1..3, val1..3, tst1..3: 1-based indices)
Train is trn1 ∪ trn2 ∪ trn3 and validation val1, as in the write-up; images without a trimap
are skipped. Foreground is every trimap pixel equal to (128, 0, 0), everything else background.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import scipy.io
import torch
from convtally.analysis.io import atomic_write
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.datasets.utils import download_and_extract_archive, download_url

FLOWERS_PAGE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/17/"
IMAGE_COUNT = 1360
FOREGROUND_RGB = (128, 0, 0)
SPLIT_FILE = "datasplits.mat"
SPLIT_VARIABLES = {"train": ("trn1", "trn2", "trn3"), "val": ("val1",)}
ALL_SPLIT_VARIABLES = tuple(f"{kind}{n}" for kind in ("trn", "val", "tst") for n in (1, 2, 3))
# what each part of the layout is, and the official download that provides it
DOWNLOADS = {"jpg": "17flowers.tgz", "trimaps": "trimaps.tgz", SPLIT_FILE: SPLIT_FILE}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_path(root: str | Path, index: int) -> Path:
    """Return the path of image `index` (1-based): ROOT/jpg/image_NNNN.jpg."""
    return Path(root) / "jpg" / f"image_{index:04d}.jpg"


def trimap_path(root: str | Path, index: int) -> Path:
    """Return the path of the trimap of image `index` (1-based): ROOT/trimaps/image_NNNN.png."""
    return Path(root) / "trimaps" / f"image_{index:04d}.png"


def missing_parts(root: str | Path) -> list[str]:
    """Return the parts of the layout ('jpg', 'trimaps', 'datasplits.mat') absent from `root`."""
    root = Path(root)
    return [part for part in DOWNLOADS if not (root / part).exists()]


def download_flowers(root: str | Path, parts: Iterable[str]) -> None:
    """Download and extract the official files providing `parts` into `root` from FLOWERS_PAGE.

    The official page publishes no checksums, so none are checked.
    """
    root = Path(root)
    for part in parts:
        filename = DOWNLOADS[part]
        url = FLOWERS_PAGE + filename
        try:
            if filename.endswith(".tgz"):
                download_and_extract_archive(url, download_root=str(root), remove_finished=True)
            else:
                download_url(url, str(root), filename=filename)
        except (OSError, RuntimeError) as error:
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise FileNotFoundError(
                f"Oxford 17 Flowers: {part} is not in {root} and downloading {url} failed "
                f"({type(error).__name__}: {message}); download 17flowers.tgz, trimaps.tgz and "
                f"datasplits.mat from {FLOWERS_PAGE}, extract them into {root} and pass --data"
            ) from None


def ensure_flowers(root: str | Path, download: bool = True) -> list[str]:
    """Make sure `root` holds the official layout, downloading what is missing if `download`.

    Returns the parts that were downloaded (empty when everything was already there).
    """
    missing = missing_parts(root)
    if missing and not download:
        path = Path(root) / missing[0]
        raise FileNotFoundError(
            f"{path} not found; get {DOWNLOADS[missing[0]]} from {FLOWERS_PAGE} "
            f"and extract it into {root} (or allow the download)"
        )
    if missing:
        download_flowers(root, missing)
    return missing


def read_splits(root: str | Path) -> dict[str, np.ndarray]:
    """Return every split variable of ROOT/datasplits.mat as a 1-D int array of 1-based indices."""
    path = Path(root) / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {path} not found; download {SPLIT_FILE} from {FLOWERS_PAGE} into {root}"
        )
    try:
        contents = scipy.io.loadmat(path)
    except Exception as error:  # scipy raises several types for a file that is not a .mat
        raise ValueError(
            f"cannot read split file {path} as a MATLAB file ({type(error).__name__}); "
            f"download {SPLIT_FILE} again from {FLOWERS_PAGE}"
        ) from None
    splits = {}
    for name in ALL_SPLIT_VARIABLES:
        if name not in contents:
            found = ", ".join(k for k in contents if not k.startswith("__")) or "none"
            raise ValueError(f"split file {path} has no variable {name!r} (it has: {found})")
        splits[name] = _split_indices(path, name, contents[name])
    return splits


def _split_indices(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values).ravel()
    as_int = flat.astype(np.int64) if np.issubdtype(flat.dtype, np.number) else None
    if as_int is None or not np.array_equal(as_int, flat):
        raise ValueError(f"split file {path}: {name!r} does not hold integer image indices")
    outside = as_int[(as_int < 1) | (as_int > IMAGE_COUNT)]
    if outside.size:
        raise ValueError(
            f"split file {path}: {name!r} holds index {outside[0]}, outside 1..{IMAGE_COUNT}"
        )
    return as_int


def split_indices(splits: dict[str, np.ndarray], split: str) -> list[int]:
    """Return the sorted 1-based indices of `split` ('train': trn1 ∪ trn2 ∪ trn3, 'val': val1)."""
    if split not in SPLIT_VARIABLES:
        raise ValueError(f"unknown split {split!r}; use train or val")
    return sorted({int(i) for name in SPLIT_VARIABLES[split] for i in splits[name]})


def foreground_mask(trimap: Image.Image) -> np.ndarray:
    """Return the (H, W) boolean foreground of a trimap: pixels equal to (128, 0, 0)."""
    rgb = np.asarray(trimap.convert("RGB"))
    return np.all(rgb == np.array(FOREGROUND_RGB, dtype=rgb.dtype), axis=-1)


def load_image(path: Path, size: int) -> np.ndarray:
    """Return the (size, size, 3) uint8 RGB image at `path`, resized bilinearly."""
    if not path.is_file():
        raise FileNotFoundError(
            f"image {path} is missing but its trimap exists; extract 17flowers.tgz into "
            f"{path.parent.parent}"
        )
    resized = _resized_rgb(path, size, Image.Resampling.BILINEAR, "image", "17flowers.tgz")
    return np.asarray(resized, dtype=np.uint8)


def load_mask(path: Path, size: int) -> np.ndarray:
    """Return the (size, size) boolean foreground of the trimap at `path` (nearest resize)."""
    return foreground_mask(
        _resized_rgb(path, size, Image.Resampling.NEAREST, "trimap", "trimaps.tgz")
    )


def _resized_rgb(path: Path, size: int, resample: Image.Resampling, what: str,
                 archive: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((size, size), resample)
    except OSError as error:
        raise ValueError(f"cannot read {what} {path} as an image ({type(error).__name__}); "
                         f"extract {archive} again") from None


@dataclass
class FlowerSplit:
    """One split in memory: uint8 images (N, 3, S, S), 0/1 int64 masks (N, S, S), indices."""

    name: str
    images: Tensor
    masks: Tensor
    indices: list[int]
    skipped: list[int] = field(default_factory=list)  # split members without a trimap

    def __len__(self) -> int:
        return len(self.indices)


def load_flower_split(root: str | Path, split: str, size: int = 224) -> FlowerSplit:
    """Return `split` of the data at `root`, images and masks resized to `size` x `size`."""
    root = Path(root)
    wanted = split_indices(read_splits(root), split)
    kept = [i for i in wanted if trimap_path(root, i).is_file()]
    skipped = sorted(set(wanted) - set(kept))
    if not kept:
        raise ValueError(
            f"no image of split {split!r} has a trimap in {root / 'trimaps'}; "
            "extract trimaps.tgz there"
        )
    images = np.stack([load_image(image_path(root, i), size) for i in kept])
    masks = np.stack([load_mask(trimap_path(root, i), size) for i in kept])
    return FlowerSplit(
        name=split,
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(masks).long(),
        indices=kept,
        skipped=skipped,
    )


def normalize_images(images: Tensor) -> Tensor:
    """Return uint8 (N, 3, H, W) images as float32 scaled to [0, 1] and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def write_synthetic_flowers(
    root: str | Path,
    count: int = 16,
    image_size: tuple[int, int] = (48, 40),
    without_trimap: Iterable[int] = (),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Write a generated miniature dataset in the official layout (for tests and benchmarks).

    Images 1..count show a bright ellipse ("flower", trimap (128, 0, 0)) on a noisy green
    background (trimap black, with a white band round the flower). The last quarter of the
    images is val1 (and val2, val3, tst*); trn1..trn3 are overlapping parts of the rest.
    Returns the split variables written to datasplits.mat.
    """
    root = Path(root)
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    (root / "trimaps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = image_size
    skip = set(without_trimap)
    for index in range(1, count + 1):
        box = _random_box(rng, width, height)
        background = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
        background[..., 1] += 80
        image = Image.fromarray(background)
        colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
        ImageDraw.Draw(image).ellipse(box, fill=colour)
        atomic_write(image_path(root, index), partial(image.save, format="JPEG", quality=95))
        if index not in skip:
            trimap = Image.new("RGB", (width, height), (0, 0, 0))
            draw = ImageDraw.Draw(trimap)
            draw.ellipse(box, fill=FOREGROUND_RGB, outline=(255, 255, 255))
            atomic_write(trimap_path(root, index), partial(trimap.save, format="PNG"))
    indices = list(range(1, count + 1))
    n_val = max(1, count // 4)
    train, val = indices[:-n_val], indices[-n_val:]
    third = max(1, len(train) // 3)
    splits = {
        "trn1": train[: 2 * third], "trn2": train[third:], "trn3": train[::2],
        "val1": val, "val2": val, "val3": val, "tst1": val, "tst2": val, "tst3": val,
    }
    # MATLAB stores them as 1 x N doubles; so does the official file
    variables = {k: np.asarray(v, dtype=np.float64)[None, :] for k, v in splits.items()}
    atomic_write(root / SPLIT_FILE, partial(scipy.io.savemat, mdict=variables, appendmat=False))
    return splits


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    box_w = int(rng.integers(width // 3, 2 * width // 3 + 1))
    box_h = int(rng.integers(height // 3, 2 * height // 3 + 1))
    left = int(rng.integers(0, width - box_w))
    top = int(rng.integers(0, height - box_h))
    return left, top, left + box_w, top + box_h
