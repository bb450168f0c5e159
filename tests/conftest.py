"""In CI, every optional witness must be present: a suite skipped there would prove nothing.

Locally a missing peer tool (fvcore, ptflops, thop, torchinfo), timm, pdflatex or the shared
CIFAR-10 subset skips the tests that need it, with the reason; under CI=true (as `.ci/run`
runs) the session refuses to start instead, naming what is missing and how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from convtally.models import cifar

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py"
WITNESSES = {
    "fvcore": "pip install -e '.[peers]'",
    "ptflops": "pip install -e '.[peers]'",
    "thop": "pip install -e '.[peers]'",
    "torchinfo": "pip install -e '.[peers]'",
    "timm": "pip install -e '.[zoo]'",
    "hypothesis": "pip install -e '.[dev]'",
}


def missing_witnesses() -> list[str]:
    """Return what a full test run needs and this machine lacks, each with how to get it."""
    missing = [f"{name} ({how})" for name, how in WITNESSES.items()
               if importlib.util.find_spec(name) is None]
    if shutil.which("pdflatex") is None:
        missing.append("pdflatex (apt-get install texlive-latex-base texlive-latex-recommended)")
    if not REAL_DATA.is_dir():
        missing.append(f"the CIFAR-10 subset at {REAL_DATA}")
    return missing


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one torch thread each instead of two each fighting
        import torch

        torch.set_num_threads(1)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        missing = missing_witnesses()
        if missing:
            raise pytest.UsageError(
                "CI=true but these witnesses are missing, so their tests would be skipped: "
                + "; ".join(missing)
            )


def blocky_images(count: int, seed: int) -> np.ndarray:
    """Return `count` uint8 images made of 4x4 blocks of random colours (learnable colours)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (6, 3))
    blocks = palette[rng.integers(0, len(palette), (count, 8, 8))]  # N x 8 x 8 x 3
    images = blocks.repeat(4, axis=1).repeat(4, axis=2).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images, dtype=np.uint8)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """An official-layout CIFAR folder: 8 horses in each train file, 6 in the test file."""
    directory = tmp_path / cifar.CIFAR_DIRNAME
    directory.mkdir()
    for index, name in enumerate((*cifar.TRAIN_FILES, cifar.TEST_FILE)):
        count = 6 if name == cifar.TEST_FILE else 8
        labels = np.array([7] * count + [1, 2])
        cifar.write_batch_file(directory / name, blocky_images(count + 2, index), labels,
                               bytes_keys=(name == "data_batch_2"))
    return directory
