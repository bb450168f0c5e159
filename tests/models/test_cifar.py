"""CIFAR-10 loading, preprocessing and k-means colour classes (models/cifar.py)."""

from __future__ import annotations

import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from convtally.models import cifar

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / cifar.CIFAR_DIRNAME
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present")


def random_images(count: int, seed: int) -> np.ndarray:
    """Return `count` random uint8 images, N x 3 x 32 x 32."""
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def write_fake_cifar(root: Path, per_file: int = 12, bytes_keys_file: str | None = None) -> Path:
    """Write an official-layout cifar-10-batches-py folder of random images; return it.

    Labels cycle through 0..9, so each file holds per_file // 10 (or one more) of each class.
    """
    directory = root / cifar.CIFAR_DIRNAME
    directory.mkdir(parents=True)
    for index, name in enumerate((*cifar.TRAIN_FILES, cifar.TEST_FILE)):
        labels = np.arange(per_file) % 10
        cifar.write_batch_file(directory / name, random_images(per_file, index), labels,
                               batch_label=name, bytes_keys=(name == bytes_keys_file))
    meta = {"label_names": list(cifar.CLASS_NAMES), "num_cases_per_batch": per_file,
            "num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return directory


class _Python2StylePickler(pickle._Pickler):
    """Pickles bytes as Python 2 `str` (BINSTRING) and numpy under its numpy 1 module name,
    as the official files, written by Python 2, do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", "") == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{obj.__name__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_python2_style(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a batch file with Python 2 byte-string keys and data, like the downloaded ones."""
    content = {b"batch_label": b"training batch 1 of 5", b"labels": [int(x) for x in labels],
               b"data": images.reshape(len(images), -1), b"filenames": [b"a.png"] * len(images)}
    with open(path, "wb") as handle:
        _Python2StylePickler(handle, protocol=2).dump(content)


def test_loader_shapes_category_filter_and_order(tmp_path):
    directory = write_fake_cifar(tmp_path, per_file=12)
    horses = cifar.load_cifar(directory, category=7, cache_dir=tmp_path / "cache")
    assert horses.train.images.shape == (5, 3, 32, 32)  # one horse in each of 5 train files
    assert horses.train.images.dtype == np.uint8
    assert horses.test.images.shape == (1, 3, 32, 32)
    assert set(horses.train.labels.tolist()) == {7}
    first_file = cifar.read_batch_file(directory / "data_batch_1")
    np.testing.assert_array_equal(horses.train.images[0], first_file.images[7])

    everything = cifar.load_cifar(directory, category=None)
    assert len(everything.train) == 60 and len(everything.test) == 12
    assert everything.source == str(directory)
    assert "subset" in everything.description
    # the parent folder is accepted too
    assert len(cifar.load_cifar(tmp_path, category=None).train) == 60


def test_python2_and_bytes_keys_files_read_like_str_keys(tmp_path):
    images, labels = random_images(4, 1), np.array([7, 1, 7, 3])
    cifar.write_batch_file(tmp_path / "str_keys", images, labels)
    cifar.write_batch_file(tmp_path / "bytes_keys", images, labels, bytes_keys=True)
    write_python2_style(tmp_path / "python2", images, labels)
    assert b"numpy.core.multiarray" in (tmp_path / "python2").read_bytes()
    for name in ("str_keys", "bytes_keys", "python2"):
        batch = cifar.read_batch_file(tmp_path / name)
        np.testing.assert_array_equal(batch.images, images, err_msg=name)
        np.testing.assert_array_equal(batch.labels, labels, err_msg=name)


def test_loader_accepts_a_bytes_keys_batch_in_the_layout(tmp_path):
    directory = write_fake_cifar(tmp_path, bytes_keys_file="data_batch_3")
    assert len(cifar.load_cifar(directory, category=7).train) == 5


def test_unit_range_and_grayscale_is_channel_mean():
    images = random_images(3, 2)
    images[0, :, 0, 0] = 255
    rgb = cifar.to_unit_range(images)
    assert rgb.dtype == torch.float32 and rgb.min() >= 0 and rgb.max() < 1
    assert rgb[0, 0, 0, 0] == pytest.approx(255 / 256)
    gray = cifar.to_grayscale(rgb)
    assert gray.shape == (3, 1, 32, 32)
    expected = images.astype(np.float64).mean(axis=1, keepdims=True) / 256
    np.testing.assert_allclose(gray.numpy(), expected, rtol=0, atol=1e-6)


def test_colour_labels_are_the_brute_force_nearest_centroid():
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 8, 8, generator=generator)
    centroids = torch.rand(24, 3, generator=generator)
    labels = cifar.colour_labels(rgb, centroids)
    assert labels.shape == (2, 8, 8)
    pixels = rgb.permute(0, 2, 3, 1).numpy().astype(np.float64)
    for n, y, x in np.ndindex(2, 8, 8):
        distances = [((pixels[n, y, x] - c) ** 2).sum() for c in centroids.double().numpy()]
        assert labels[n, y, x] == int(np.argmin(distances))


def test_kmeans_is_seeded_and_finds_separated_clusters():
    centres = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.8, 0.3]])
    noise = torch.randn(3, 200, 3, generator=torch.Generator().manual_seed(1)) * 0.01
    pixels = (centres[:, None, :] + noise).reshape(-1, 3)
    first = cifar.kmeans(pixels, 3, seed=5)
    assert torch.equal(first, cifar.kmeans(pixels, 3, seed=5))
    found = first[torch.cdist(centres, first).argmin(dim=1)]
    torch.testing.assert_close(found, centres, atol=0.01, rtol=0)
    # every centroid is the mean of the pixels nearest to it (a Lloyd fixed point)
    labels = cifar.nearest_centroid(pixels, first)
    for k in range(3):
        torch.testing.assert_close(first[k], pixels[labels == k].mean(dim=0))


def test_colour_centroids_are_cached_with_settings_in_the_name(tmp_path, monkeypatch):
    rgb = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = cifar.centroid_cache_path(tmp_path / "cache", 6, 2, 7, "abc")
    assert path == tmp_path / "cache" / "colours" / "colours_kmeans6_cat7_seed2_abc.npy"
    fitted = cifar.colour_centroids(rgb, 6, 2, path)
    assert path.is_file()

    def no_refit(*args, **kwargs):
        raise AssertionError("k-means ran although the colours were cached")

    monkeypatch.setattr(cifar, "kmeans", no_refit)
    torch.testing.assert_close(cifar.colour_centroids(rgb, 6, 2, path), fitted)


def test_default_cache_dir_follows_convtally_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("CONVTALLY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cifar.default_cache_dir() == tmp_path / "xdg" / "convtally"
    assert cifar.centroid_cache_path(None, 24, 0, 7, "f").parent == (
        tmp_path / "xdg" / "convtally" / "colours")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid per the XDG spec: ignored
    assert cifar.default_cache_dir() == Path.home() / ".cache" / "convtally"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cifar.default_cache_dir() == Path.home() / ".cache" / "convtally"
    monkeypatch.setenv("CONVTALLY_CACHE", str(tmp_path / "mine"))
    assert cifar.default_cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("writable", [True, False], ids=["writable-data", "read-only-data"])
def test_colours_never_go_into_the_data_folder(tmp_path, monkeypatch, writable):
    """A writable data folder and a read-only one give the same cache path, and stay untouched."""
    directory = write_fake_cifar(tmp_path / "data", per_file=12)
    before = sorted(p.name for p in directory.iterdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CONVTALLY_CACHE", raising=False)
    if not writable:
        directory.chmod(0o555)
    try:
        data = cifar.load_cifar(directory, category=None)
        path = cifar.centroid_cache_path(None, 4, 0, None,
                                         cifar.data_fingerprint(data.train.images))
        cifar.colour_centroids(cifar.to_unit_range(data.train.images), 4, 0, path)
    finally:
        directory.chmod(0o755)
    assert path.parent == tmp_path / "xdg" / "convtally" / "colours" and path.is_file()
    assert sorted(p.name for p in directory.iterdir()) == before


def test_missing_file_is_named(tmp_path):
    directory = write_fake_cifar(tmp_path)
    (directory / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4 is missing"):
        cifar.load_cifar(directory)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        cifar.load_cifar(tmp_path / "nowhere")


def test_truncated_file_is_named(tmp_path):
    directory = write_fake_cifar(tmp_path)
    raw = (directory / "test_batch").read_bytes()
    (directory / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"test_batch is truncated or not a CIFAR pickle"):
        cifar.load_cifar(directory)


def test_empty_file_is_named(tmp_path):
    directory = write_fake_cifar(tmp_path)
    (directory / "data_batch_2").write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_2 is empty"):
        cifar.load_cifar(directory)


def test_wrong_keys_are_named(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"pixels": np.zeros((1, 3072), np.uint8), "labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_1 lacks key\(s\) data; found labels, pixels"):
        cifar.read_batch_file(path)


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((2, 100), np.uint8), [0, 1], r"'data' is uint8 \(2, 100\)"),
    (np.zeros((2, 3072), np.float32), [0, 1], "'data' is float32"),
    (np.zeros((2, 3072), np.uint8), [0], "'labels' has shape"),
    (np.zeros((2, 3072), np.uint8), [0, 12], "labels range 0..12"),
])
def test_malformed_contents_are_named(tmp_path, data, labels, message):
    path = tmp_path / "data_batch_5"
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=2))
    with pytest.raises(ValueError, match=message):
        cifar.read_batch_file(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run > pwned",))


def test_pickles_with_other_globals_are_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1 .*system is not allowed"):
        cifar.read_batch_file(path)
    assert not (tmp_path / "pwned").exists()


def test_without_data_or_network_the_error_says_to_pass_data(tmp_path, monkeypatch):
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "_download_and_extract", offline)
    with pytest.raises(FileNotFoundError, match=r"downloading https://www\.cs\.toronto\.edu.*"
                                                r"failed .*no network.*pass --data DIR"):
        cifar.load_cifar(None, cache_dir=tmp_path / "cache")
    assert calls == [tmp_path / "cache"]


def test_download_goes_to_the_cache_and_reports_its_source(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_download_and_extract", lambda root: write_fake_cifar(root))
    data = cifar.load_cifar(None, category=7, cache_dir=tmp_path / "cache")
    assert data.source == "download"
    assert data.directory == tmp_path / "cache" / cifar.CIFAR_DIRNAME
    # a second call finds the extracted files and does not download again
    monkeypatch.setattr(cifar, "_download_and_extract", pytest.fail)
    assert cifar.load_cifar(None, category=7, cache_dir=tmp_path / "cache").source == "download"


@pytest.mark.parametrize("text, expected", [("7", 7), ("horse", 7), (3, 3), ("all", None),
                                            ("ALL", None), (None, None)])
def test_parse_category(text, expected):
    assert cifar.parse_category(text) == expected


@pytest.mark.parametrize("text", ["10", "-1", "zebra"])
def test_parse_category_rejects_unknown(text):
    with pytest.raises(ValueError, match=f"unknown --category '{text}'"):
        cifar.parse_category(text)


@needs_real_data
def test_real_subset_counts_and_preprocessing(tmp_path):
    horses = cifar.load_cifar(REAL_DATA, category=7)
    assert (len(horses.train), len(horses.test)) == (524, 102)  # data/README.md's table
    everything = cifar.load_cifar(REAL_DATA, category=None)
    assert (len(everything.train), len(everything.test)) == (5170, 1017)
    assert "subset" in horses.description
    rgb = cifar.to_unit_range(horses.train.images[:20])
    torch.testing.assert_close(cifar.to_grayscale(rgb)[:, 0], rgb.mean(dim=1))
    centroids = cifar.kmeans(cifar.flatten_pixels(cifar.to_unit_range(horses.train.images)), 24)
    assert centroids.shape == (24, 3)
    assert len(torch.unique(cifar.colour_labels(rgb, centroids))) > 12
    # the colours are cached in the cache folder, never beside the data
    path = cifar.centroid_cache_path(tmp_path, 24, 0, 7, "x")
    assert path.parent == tmp_path / "colours"
