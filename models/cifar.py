"""CIFAR-10 for the colourization task: safe loading, preprocessing and k-means colour classes.

The official "python version" (`cifar-10-batches-py`) holds pickled dicts. They are read with a
restricted unpickler that can only rebuild numpy arrays, so a malicious file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from convtally.analysis.io import atomic_write

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SHAPE = (3, 32, 32)
MAX_PIXEL = 256.0  # the write-up divides by 256, so pixels lie in [0, 1)
KMEANS_MAX_PIXELS = 200_000  # k-means is fitted on at most this many (seeded) sampled pixels
REQUIRED_KEYS = ("data", "labels")

# Everything a CIFAR pickle needs: numpy array reconstruction and the latin1 codec shim that
# Python 3 pickles of bytes use. Module names are given as pickled (Python 2 and 3, numpy 1 and 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
}


def default_cache_dir() -> Path:
    """Return the cache directory for downloads and derived files (never a data folder).

    $CONVTALLY_CACHE when set, else $XDG_CACHE_HOME/convtally, else ~/.cache/convtally.
    """
    explicit = os.environ.get("CONVTALLY_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec: a relative $XDG_CACHE_HOME is invalid and must be ignored
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "convtally"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except numpy array reconstruction."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy 2 renamed it
        return super().find_class(module, name)


def safe_unpickle(raw: bytes):
    """Return the object in `raw`, unpickled with latin1 strings and only numpy globals allowed."""
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()


@dataclass(frozen=True)
class CifarBatch:
    """Images (uint8, N x 3 x 32 x 32) and labels (int64, N) of one or more CIFAR files."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def read_batch_file(path: str | os.PathLike) -> CifarBatch:
    """Return the images and labels of one CIFAR-10 batch file, checked for shape and range.

    Raises FileNotFoundError for a missing file and ValueError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} is missing; pass --data DIR with all of "
                                f"{', '.join(TRAIN_FILES + (TEST_FILE,))}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"CIFAR-10 file {path} is empty; replace it with the official file")
    try:
        content = safe_unpickle(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError, MemoryError, OverflowError) as error:
        raise ValueError(f"CIFAR-10 file {path} is truncated or not a CIFAR pickle "
                         f"({type(error).__name__}: {error}); replace it with the official file"
                         ) from None
    return _batch_from_dict(content, path)


def _batch_from_dict(content, path: Path) -> CifarBatch:
    if not isinstance(content, dict):
        raise ValueError(f"CIFAR-10 file {path} holds a {type(content).__name__}, not a dict")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}
    missing = [key for key in REQUIRED_KEYS if key not in entries]
    if missing:
        raise ValueError(f"CIFAR-10 file {path} lacks key(s) {', '.join(missing)}; "
                         f"found {', '.join(sorted(map(str, entries))) or 'none'}")
    data = np.asarray(entries["data"])
    pixels_per_image = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels_per_image:
        raise ValueError(f"CIFAR-10 file {path}: 'data' is {data.dtype} {data.shape}, "
                         f"expected uint8 (N, {pixels_per_image})")
    labels = np.asarray(entries["labels"])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CIFAR-10 file {path}: 'labels' has shape {labels.shape} "
                         f"({labels.dtype}), expected {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"CIFAR-10 file {path}: labels range {labels.min()}..{labels.max()}, "
                         f"expected 0..{len(CLASS_NAMES) - 1}")
    return CifarBatch(data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64))


def concatenate(batches: list[CifarBatch]) -> CifarBatch:
    """Return the batches joined in order."""
    return CifarBatch(np.concatenate([b.images for b in batches]),
                      np.concatenate([b.labels for b in batches]))


def select_category(batch: CifarBatch, category: int | None) -> CifarBatch:
    """Return the images of one class (in file order); `None` keeps every class."""
    if category is None:
        return batch
    keep = batch.labels == category
    return CifarBatch(batch.images[keep], batch.labels[keep])


def parse_category(value: str | int | None) -> int | None:
    """Return the class index for '7', 'horse' or 7; None for 'all' (every class)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    text = str(value).strip().lower()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    try:
        index = int(text)
    except ValueError:
        index = -1
    if not 0 <= index < len(CLASS_NAMES):
        raise ValueError(f"unknown --category {value!r}; use 0-9, a class name "
                         f"({', '.join(CLASS_NAMES)}) or 'all'")
    return index


def _download_and_extract(root: Path) -> None:
    # Imported lazily; a module-level name so tests can replace it.
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(CIFAR_URL, download_root=str(root), filename=CIFAR_ARCHIVE,
                                 md5=CIFAR_ARCHIVE_MD5)


def resolve_data_dir(data_dir: str | os.PathLike | None,
                     cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return (the cifar-10-batches-py directory, its source: the path or 'download').

    With `data_dir` it is used as given (or its cifar-10-batches-py subfolder); without it,
    the cache is used, downloading and md5-checking the official archive when it is absent.
    """
    if data_dir is not None:
        directory = Path(data_dir)
        if (directory / CIFAR_DIRNAME).is_dir() and not (directory / TEST_FILE).exists():
            directory = directory / CIFAR_DIRNAME
        if not directory.is_dir():
            raise FileNotFoundError(f"--data {data_dir}: no such directory; point it at a "
                                    f"{CIFAR_DIRNAME} folder")
        return directory, str(directory)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / CIFAR_DIRNAME
    if not all((directory / name).is_file() for name in TRAIN_FILES + (TEST_FILE,)):
        try:
            _download_and_extract(root)
        except Exception as error:  # network, md5 or archive failure: all mean "no data"
            raise FileNotFoundError(
                f"no --data given and downloading {CIFAR_URL} into {root} failed "
                f"({type(error).__name__}: {error}); pass --data DIR with a {CIFAR_DIRNAME} copy"
            ) from None
    return directory, "download"


@dataclass(frozen=True)
class CifarData:
    """The train (data_batch_1..5) and test (test_batch) images, with where they came from."""

    train: CifarBatch
    test: CifarBatch
    directory: Path
    source: str

    @property
    def description(self) -> str:
        """Return e.g. 'CIFAR-10 (full)' or 'CIFAR-10 subset (first images of each batch)'."""
        full = len(self.train) == 50_000 and len(self.test) == 10_000
        if full:
            return "CIFAR-10 (full, official batches)"
        return ("CIFAR-10 subset (first images of each official batch: "
                f"{len(self.train)} train, {len(self.test)} test of 50000/10000)")


def load_cifar(data_dir: str | os.PathLike | None = None, category: int | None = 7,
               cache_dir: str | os.PathLike | None = None) -> CifarData:
    """Return the CIFAR-10 train and test images of `category` (None: all classes).

    Reads `data_dir` (a cifar-10-batches-py folder) or downloads into the cache when it is None.
    """
    if category is not None and not 0 <= category < len(CLASS_NAMES):
        raise ValueError(f"category {category} out of range; use 0-9 or None for all")
    directory, source = resolve_data_dir(data_dir, cache_dir)
    train = concatenate([read_batch_file(directory / name) for name in TRAIN_FILES])
    test = read_batch_file(directory / TEST_FILE)
    train, test = select_category(train, category), select_category(test, category)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{directory} has {len(train)} train and {len(test)} test images of "
                         f"category {category}; pick another --category")
    return CifarData(train, test, directory, source)


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """Return uint8 images as float32 in [0, 1) (divided by 256, as the write-up does)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float() / MAX_PIXEL


def to_grayscale(rgb: torch.Tensor) -> torch.Tensor:
    """Return the N x 1 x H x W mean of the R, G, B channels of N x 3 x H x W images."""
    return rgb.mean(dim=1, keepdim=True)


def flatten_pixels(rgb: torch.Tensor) -> torch.Tensor:
    """Return N x 3 x H x W images as an (N*H*W) x 3 matrix of RGB pixels."""
    return rgb.permute(0, 2, 3, 1).reshape(-1, rgb.shape[1])


def nearest_centroid(pixels: torch.Tensor, centroids: torch.Tensor,
                     chunk: int = 262_144) -> torch.Tensor:
    """Return, for each row of `pixels` (M x 3), the index of its nearest centroid (int64)."""
    labels = torch.empty(len(pixels), dtype=torch.int64, device=pixels.device)
    for start in range(0, len(pixels), chunk):
        part = pixels[start:start + chunk]
        labels[start:start + chunk] = torch.cdist(part, centroids).argmin(dim=1)
    return labels


def colour_labels(rgb: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Return the N x H x W nearest-centroid colour class of each pixel of N x 3 x H x W images."""
    n, _, h, w = rgb.shape
    return nearest_centroid(flatten_pixels(rgb), centroids.to(rgb)).reshape(n, h, w)


def kmeans(pixels: torch.Tensor, k: int, seed: int = 0, iterations: int = 50,
           max_pixels: int = KMEANS_MAX_PIXELS) -> torch.Tensor:
    """Return k x 3 centroids of `pixels` (M x 3) by seeded k-means++ and Lloyd iterations.

    At most `max_pixels` rows, drawn with the seed, are used for fitting.
    """
    if k < 1:
        raise ValueError(f"number of colours {k} must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    pixels = pixels.detach().float().cpu()
    if len(pixels) > max_pixels:
        pixels = pixels[torch.randperm(len(pixels), generator=generator)[:max_pixels]]
    if len(pixels) < k:
        raise ValueError(f"only {len(pixels)} pixels to fit {k} colours; use fewer colours")
    centroids = _kmeans_plus_plus(pixels, k, generator)
    for _ in range(iterations):
        labels = nearest_centroid(pixels, centroids)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, pixels)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.allclose(updated, centroids, atol=1e-7):
            break
        centroids = updated
    return centroids


def _kmeans_plus_plus(pixels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(len(pixels), (1,), generator=generator)
    chosen = [pixels[first[0]]]
    closest = ((pixels - chosen[0]) ** 2).sum(dim=1)
    for _ in range(1, k):
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        index = torch.multinomial(weights, 1, generator=generator)[0]
        chosen.append(pixels[index])
        closest = torch.minimum(closest, ((pixels - pixels[index]) ** 2).sum(dim=1))
    return torch.stack(chosen)


def data_fingerprint(images: np.ndarray) -> str:
    """Return a short sha1 of the images' bytes, so cached colours follow the exact data."""
    return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:10]


def centroid_cache_path(cache_dir: str | os.PathLike | None, k: int, seed: int,
                        category: int | None, fingerprint: str) -> Path:
    """Return where the k-means colours for these settings are cached: CACHE/colours/NAME.

    Always in the cache directory (`cache_dir`, else `default_cache_dir()`), never next to the
    data, so a read-only data folder and a writable one behave the same and a user's data folder
    is never written to. The name holds every setting and the data's fingerprint.
    """
    label = "all" if category is None else str(category)
    name = f"colours_kmeans{k}_cat{label}_seed{seed}_{fingerprint}.npy"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "colours" / name


def colour_centroids(train_rgb: torch.Tensor, k: int, seed: int, cache_path: Path | None
                     ) -> torch.Tensor:
    """Return k x 3 RGB centroids of the training pixels, read from or written to `cache_path`."""
    if cache_path is not None and cache_path.is_file():
        try:
            cached = np.load(cache_path, allow_pickle=False)
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.shape == (k, 3) and np.isfinite(cached).all():
            return torch.from_numpy(cached.astype(np.float32))
    centroids = kmeans(flatten_pixels(train_rgb), k, seed=seed)
    if cache_path is not None:
        try:
            atomic_write(cache_path, lambda tmp: _save_npy(tmp, centroids.numpy()))
        except OSError:
            pass  # a cache we cannot write only costs a refit next time
    return centroids


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_batch_file(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                     batch_label: str = "batch", bytes_keys: bool = False) -> Path:
    """Write images (uint8 N x 3 x 32 x 32) and labels as an official-format batch file.

    A protocol-2 pickle of a dict with keys batch_label, labels, data, filenames (as bytes
    when `bytes_keys`, like the Python 2 originals); returns `path`. Used for small fixtures.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    content = {
        "batch_label": batch_label,
        "labels": [int(label) for label in labels],
        "data": images.reshape(len(images), -1),
        "filenames": [f"image_{i:05d}.png" for i in range(len(images))],
    }
    if bytes_keys:
        content = {key.encode("ascii"): value for key, value in content.items()}
    return atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(content, protocol=2)))
