"""Oxford 17 Flowers reader on generated files in the official layout."""

from __future__ import annotations

from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from convtally.models import flowers
from convtally.models.flowers import (
    ensure_flowers,
    foreground_mask,
    load_flower_split,
    normalize_images,
    read_splits,
    trimap_path,
    write_synthetic_flowers,
)
from PIL import Image


@pytest.fixture
def mini(tmp_path):
    root = tmp_path / "flowers"
    splits = write_synthetic_flowers(root, count=8, without_trimap=[2])
    return root, splits


def test_generated_layout_is_the_official_one(mini):
    root, splits = mini
    assert (root / "jpg" / "image_0001.jpg").is_file()
    assert (root / "trimaps" / "image_0001.png").is_file()
    assert not (root / "trimaps" / "image_0002.png").exists()
    contents = scipy.io.loadmat(root / "datasplits.mat")
    assert contents["trn1"].shape == (1, len(splits["trn1"]))
    assert contents["trn1"].dtype == np.float64


def test_splits_are_trn_union_and_val1_skipping_images_without_trimap(mini):
    root, splits = mini
    # count 8: val1 = [7, 8]; rest 1..6: trn1 = [1..4], trn2 = [3..6], trn3 = [1, 3, 5]
    assert splits["val1"] == [7, 8]
    train = load_flower_split(root, "train", size=32)
    val = load_flower_split(root, "val", size=32)

    assert train.indices == [1, 3, 4, 5, 6]  # 2 has no trimap
    assert train.skipped == [2]
    assert val.indices == [7, 8]
    assert train.images.shape == (5, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.masks.shape == (5, 32, 32) and train.masks.dtype == torch.long
    assert set(train.masks.unique().tolist()) == {0, 1}


def test_mask_is_the_resized_trimap_foreground(mini):
    root, _ = mini
    val = load_flower_split(root, "val", size=24)
    with Image.open(trimap_path(root, 7)) as trimap:
        expected = foreground_mask(trimap.resize((24, 24), Image.Resampling.NEAREST))
    assert np.array_equal(val.masks[0].numpy(), expected)


def test_foreground_is_exactly_128_0_0_in_rgb_and_palette_trimaps():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (128, 0, 0)
    rgb[0, 1] = (128, 0, 1)
    rgb[1, 2] = (128, 0, 0)
    expected = np.array([[True, False, False], [False, False, True]])
    assert np.array_equal(foreground_mask(Image.fromarray(rgb)), expected)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert np.array_equal(foreground_mask(palette), expected)


def test_normalize_images_uses_imagenet_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    normalized = normalize_images(images)
    pairs = zip(flowers.IMAGENET_MEAN, flowers.IMAGENET_STD, strict=True)
    expected = [(1 - mean) / std for mean, std in pairs]
    assert normalized[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)


def test_missing_split_file_is_named(mini):
    root, _ = mini
    (root / "datasplits.mat").unlink()
    with pytest.raises(FileNotFoundError, match=f"{root / 'datasplits.mat'} not found"):
        read_splits(root)
    with pytest.raises(FileNotFoundError, match="datasplits.mat"):
        ensure_flowers(root, download=False)


def test_unreadable_split_file_and_missing_variable(mini):
    root, _ = mini
    (root / "datasplits.mat").write_text("not matlab")
    with pytest.raises(ValueError, match="cannot read split file .*datasplits.mat"):
        read_splits(root)
    scipy.io.savemat(root / "datasplits.mat", {"trn1": np.array([[1.0, 2.0]])})
    with pytest.raises(ValueError, match="has no variable 'trn2'"):
        read_splits(root)


def test_split_index_out_of_range(mini):
    root, splits = mini
    bad = {k: np.asarray(v, dtype=float)[None, :] for k, v in splits.items()}
    bad["val1"] = np.array([[7.0, 1361.0]])
    scipy.io.savemat(root / "datasplits.mat", bad)
    with pytest.raises(ValueError, match="'val1' holds index 1361, outside 1..1360"):
        read_splits(root)


def test_missing_image_with_a_trimap_is_named(mini):
    root, _ = mini
    (root / "jpg" / "image_0008.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="image_0008.jpg is missing"):
        load_flower_split(root, "val", size=16)


def test_unreadable_trimap_is_named(mini):
    root, _ = mini
    trimap_path(root, 7).write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="cannot read trimap .*image_0007.png"):
        load_flower_split(root, "val", size=16)


def test_split_without_any_trimap(mini):
    root, _ = mini
    for index in (7, 8):
        trimap_path(root, index).unlink()
    with pytest.raises(ValueError, match="no image of split 'val' has a trimap"):
        load_flower_split(root, "val", size=16)


def test_no_data_and_no_network_gives_one_line_error(tmp_path, monkeypatch):
    def no_network(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(flowers, "download_and_extract_archive", no_network)
    monkeypatch.setattr(flowers, "download_url", no_network)
    with pytest.raises(FileNotFoundError) as caught:
        ensure_flowers(tmp_path / "empty")
    message = str(caught.value)
    assert "\n" not in message
    assert "https://www.robots.ox.ac.uk/~vgg/data/flowers/17/17flowers.tgz" in message
    assert "pass --data" in message


def test_download_fetches_only_the_missing_parts(mini, monkeypatch):
    root, _ = mini
    (root / "datasplits.mat").rename(root / "saved.mat")
    fetched = []

    def fake_download_url(url, root_dir, filename=None, **kwargs):
        fetched.append(url)
        (root / "saved.mat").rename(root / filename)

    monkeypatch.setattr(flowers, "download_url", fake_download_url)
    assert ensure_flowers(root) == ["datasplits.mat"]
    assert fetched == ["https://www.robots.ox.ac.uk/~vgg/data/flowers/17/datasplits.mat"]
    assert ensure_flowers(root) == []
