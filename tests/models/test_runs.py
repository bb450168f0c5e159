"""Runs that survive any kill and refuse a second writer (models/runs.py and both trainers).

The kill tests stop a trainer at every write point in turn: a hook on the atomic write helper
raises SimulatedKill once the N-th file of the run folder is in place (and leaves a
half-written temporary behind, as a kill in the middle of the next write would). Each
--resume must then finish with the same losses, metrics and weights, bit for bit, as a run
that was never interrupted. The lock tests use real second processes, synchronised through
pipes: one holds a run folder (paused mid-run, or killed with SIGKILL), the other tries it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from convtally.analysis import io
from convtally.models import cifar, runs, train_colour
from convtally.models.flowers import write_synthetic_flowers
from convtally.models.train_colour import ColourConfig, train_colourization
from convtally.models.train_segment import SegmentConfig, train_segmentation

from tests.conftest import blocky_images

REPO = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT = 300  # seconds; only a hung child process ever gets near it


class SimulatedKill(BaseException):
    """Stands for a kill: a BaseException, so no `except Exception` in the trainer stops it."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks on a shared 2-core machine: one thread is faster and the same each run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """An official-layout CIFAR folder: 8 horses in each train file, 6 in the test file."""
    directory = tmp_path_factory.mktemp("cifar") / cifar.CIFAR_DIRNAME
    directory.mkdir()
    for index, name in enumerate((*cifar.TRAIN_FILES, cifar.TEST_FILE)):
        count = 6 if name == cifar.TEST_FILE else 8
        labels = np.array([7] * count + [1, 2])
        cifar.write_batch_file(directory / name, blocky_images(count + 2, index), labels)
    return directory


@pytest.fixture
def colour(tmp_path, cifar_dir) -> ColourConfig:
    """A tiny two-epoch colourization run into tmp_path/run."""
    return ColourConfig(model="convtranspose", epochs=2, batch_size=16, lr=0.01, filters=4,
                        num_colours=6, data_dir=str(cifar_dir),
                        cache_dir=str(tmp_path / "cache"), device="cpu",
                        out=str(tmp_path / "run"), progress=False, num_samples=2)


@pytest.fixture(scope="module")
def flowers_dir(tmp_path_factory) -> Path:
    """A generated Oxford 17 Flowers miniature in the official layout."""
    root = tmp_path_factory.mktemp("flowers")
    write_synthetic_flowers(root, count=12, without_trimap=[4])
    return root


@pytest.fixture
def segment(tmp_path, flowers_dir) -> SegmentConfig:
    """A tiny two-epoch segmentation fine-tune into tmp_path/run."""
    return SegmentConfig(backbone="mobilenet_v3_large", weights="none", size=64, batch_size=3,
                         epochs=2, lr=0.05, data=str(flowers_dir), device="cpu",
                         out=str(tmp_path / "run"), progress=False, grid_images=1)


def quiet(*args, **kwargs) -> None:
    pass


def train_colour_quietly(config: ColourConfig) -> dict[str, Any]:
    """Train a colourization run without printing."""
    return train_colourization(config, log=quiet)


def install_kill_hook(monkeypatch: pytest.MonkeyPatch, run_dir: Path,
                      kill_after: int | None = None) -> list[str]:
    """Count the files atomically written into `run_dir`; die after the `kill_after`-th.

    Returns the list that receives each written file's name, in order.
    """
    real_atomic_write = io.atomic_write
    written: list[str] = []

    def write_then_maybe_die(path, write):
        result = real_atomic_write(path, write)
        if Path(path).parent == run_dir:
            written.append(Path(path).name)
            if len(written) == kill_after:
                (run_dir / f".{Path(path).name}.cut-short.tmp").write_bytes(b"\x80\x02half")
                raise SimulatedKill(f"killed after write {kill_after} ({Path(path).name})")
        return result

    monkeypatch.setattr(io, "atomic_write", write_then_maybe_die)
    return written


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the rows without their timings (the only values a resume may change)."""
    return [{key: value for key, value in row.items() if not key.endswith("seconds")}
            for row in rows]


def run_outcome(run_dir: Path, weights_file: str) -> dict[str, Any]:
    """Return what a finished run folder holds, timings left out."""
    metrics = json.loads((run_dir / runs.METRICS_FILE).read_text())
    state = torch.load(run_dir / runs.TRAINING_STATE_FILE, weights_only=True)
    return {
        "epochs": without_seconds(metrics["epochs"]),
        "final": without_seconds([metrics["final"]])[0],
        "status": metrics.get("status"),
        "weights": torch.load(run_dir / weights_file, weights_only=True),
        "state": {key: state[key] for key in ("epoch", "model", "optimizer")},
        "history": without_seconds(state["history"]),
        "leftovers": sorted(path.name for path in run_dir.iterdir()
                            if path.name.startswith(".")),
    }


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Assert that two nested dicts/lists of tensors and plain values are equal, bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_identical(left, right, f"{where}[{index}]")
    else:
        assert actual == expected, where


# --- kills at every write point ------------------------------------------------------------


def test_colour_resume_after_a_kill_at_every_write_point_matches_the_uninterrupted_run(
        colour, tmp_path, monkeypatch):
    straight = replace(colour, out=str(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        written = install_kill_hook(patch, Path(straight.out))
        train_colour_quietly(straight)
    expected = run_outcome(Path(straight.out), runs.CHECKPOINT_FILE)
    assert written.count(runs.TRAINING_STATE_FILE) == colour.epochs
    assert expected["leftovers"] == []  # no lock file, no temporaries

    for kill_after in range(1, len(written) + 1):
        config = replace(colour, out=str(tmp_path / f"killed_after_{kill_after}"))
        with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
            install_kill_hook(patch, Path(config.out), kill_after)
            train_colour_quietly(config)
        lines: list[str] = []
        train_colourization(replace(config, resume=True), log=lines.append)
        assert lines[0].startswith(f"resuming {config.out} after epoch ")
        assert_identical(run_outcome(Path(config.out), runs.CHECKPOINT_FILE), expected,
                         f"killed after write {kill_after} ({written[kill_after - 1]})")


def test_a_resume_killed_again_still_matches(colour, tmp_path, monkeypatch):
    train_colour_quietly(replace(colour, out=str(tmp_path / "straight")))
    expected = run_outcome(tmp_path / "straight", runs.CHECKPOINT_FILE)
    run_dir = Path(colour.out)
    for kill_after, config in ((4, colour), (1, replace(colour, resume=True)),
                               (2, replace(colour, resume=True))):
        with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
            install_kill_hook(patch, run_dir, kill_after)
            train_colour_quietly(config)
    train_colour_quietly(replace(colour, resume=True))
    assert_identical(run_outcome(run_dir, runs.CHECKPOINT_FILE), expected)


def test_a_resume_may_add_epochs_to_a_finished_run(colour, tmp_path):
    train_colour_quietly(replace(colour, out=str(tmp_path / "straight"), epochs=3))
    train_colour_quietly(colour)
    train_colour_quietly(replace(colour, epochs=3, resume=True))
    assert_identical(run_outcome(Path(colour.out), runs.CHECKPOINT_FILE),
                     run_outcome(tmp_path / "straight", runs.CHECKPOINT_FILE))


def test_a_kill_before_the_first_epoch_leaves_nothing_to_resume(colour, monkeypatch):
    train_colour_quietly(replace(colour, epochs=3))  # an older, longer run in the same folder

    def killed(*args, **kwargs):
        raise SimulatedKill("killed in epoch 1")

    with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
        patch.setattr(train_colour, "train_epoch", killed)
        train_colour_quietly(colour)
    # the fresh run removed the old state first, so no one resumes the old run by mistake
    with pytest.raises(FileNotFoundError, match="training_state.pt is missing; nothing to"):
        train_colour_quietly(replace(colour, resume=True))


def test_segment_resume_after_a_kill_at_every_write_point_matches(segment, tmp_path,
                                                                  monkeypatch):
    straight = replace(segment, out=str(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        written = install_kill_hook(patch, Path(straight.out))
        train_segmentation(straight)
    expected = run_outcome(Path(straight.out), "head.pt")
    assert written[:segment.epochs] == [runs.TRAINING_STATE_FILE] * segment.epochs

    for kill_after in range(1, len(written) + 1):
        config = replace(segment, out=str(tmp_path / f"killed_after_{kill_after}"))
        with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
            install_kill_hook(patch, Path(config.out), kill_after)
            train_segmentation(config)
        train_segmentation(replace(config, resume=True))
        assert_identical(run_outcome(Path(config.out), "head.pt"), expected,
                         f"killed after write {kill_after} ({written[kill_after - 1]})")


def test_segment_slow_path_resume_restores_batchnorm_and_dropout_state(segment, tmp_path,
                                                                       monkeypatch):
    slow = replace(segment, path="slow", epochs=3)
    train_segmentation(replace(slow, out=str(tmp_path / "straight")))
    expected = run_outcome(tmp_path / "straight", "head.pt")
    with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
        install_kill_hook(patch, Path(slow.out), kill_after=1)
        train_segmentation(slow)
    assert torch.load(Path(slow.out) / runs.TRAINING_STATE_FILE, weights_only=True)["epoch"] == 1
    train_segmentation(replace(slow, resume=True))
    assert_identical(run_outcome(Path(slow.out), "head.pt"), expected)


# --- what a resume refuses ------------------------------------------------------------------


def test_resume_state_and_checkpoint_load_with_weights_only(colour):
    train_colour_quietly(colour)
    run_dir = Path(colour.out)
    state = torch.load(run_dir / runs.TRAINING_STATE_FILE, weights_only=True)
    assert state["format"] == runs.STATE_FORMAT and state["epoch"] == 2
    assert {"model", "optimizer", "rng", "settings", "history", "started_at"} <= set(state)
    checkpoint = torch.load(run_dir / runs.CHECKPOINT_FILE, weights_only=True)
    assert_identical(checkpoint, state["model"])
    train_colour.build_model(colour).load_state_dict(checkpoint)


def test_an_old_two_file_run_folder_is_refused_in_one_line(colour):
    train_colour_quietly(colour)
    run_dir = Path(colour.out)
    state = torch.load(run_dir / runs.TRAINING_STATE_FILE, weights_only=True)
    legacy = {key: state[key] for key in ("optimizer", "epoch", "rng", "settings")}
    torch.save(legacy, run_dir / runs.TRAINING_STATE_FILE)
    with pytest.raises(ValueError, match="is from an older convtally") as caught:
        train_colour_quietly(replace(colour, resume=True))
    assert "\n" not in str(caught.value)

    (run_dir / runs.TRAINING_STATE_FILE).write_bytes(b"\x80\x02half a file")
    with pytest.raises(ValueError, match=r"cannot read .*training_state.pt") as caught:
        train_colour_quietly(replace(colour, resume=True))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"model": "unet"}, "holds a colour convtranspose run, not colour unet"),
    ({"epochs": 1}, "already finished 2 epochs, more than --epochs 1"),
    ({"seed": 3}, "setting seed is 3 but the saved run used 0"),
])
def test_resume_refuses_a_run_it_cannot_continue(colour, change, message):
    train_colour_quietly(colour)
    with pytest.raises(ValueError, match=message):
        train_colour_quietly(replace(colour, resume=True, **change))


def test_segment_resume_refuses_another_backbone_or_loss(segment, tmp_path):
    train_segmentation(replace(segment, epochs=1))
    with pytest.raises(ValueError, match="setting loss is 'iou' but the saved run used 'ce'"):
        train_segmentation(replace(segment, loss="iou", resume=True))
    with pytest.raises(ValueError, match="not segment deeplabv3_resnet50"):
        train_segmentation(replace(segment, backbone="resnet50", resume=True))
    with pytest.raises(FileNotFoundError, match="nothing to --resume"):
        train_segmentation(replace(segment, out=str(tmp_path / "empty"), resume=True))


# --- the run folder lock --------------------------------------------------------------------


HOLD_FOLDER = """
import sys
from convtally.models import runs
with runs.run_folder_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""

PAUSED_COLOUR_RUN = """
import json, sys
import torch
from convtally.models.train_colour import ColourConfig, train_colourization
torch.set_num_threads(1)

def log(line):
    print(line, flush=True)
    if line.startswith("Epoch [1/"):
        sys.stdin.readline()  # hold the folder, mid-run, until the test says go on

train_colourization(ColourConfig(**json.loads(sys.argv[1])), log=log)
print("done", flush=True)
"""


def start_child(code: str, argument: str, until: str, log: Path) -> subprocess.Popen:
    """Start `python -c code argument`; return once it has printed a line starting `until`."""
    with log.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", code, argument], cwd=REPO, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    for line in child.stdout:
        if line.startswith(until):
            return child
    child.wait(CHILD_TIMEOUT)
    raise AssertionError(f"child exited {child.returncode}: {log.read_text()}")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    """The child processes a test starts; any still alive at the end are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(CHILD_TIMEOUT)


def test_a_second_run_into_a_live_runs_folder_is_refused_and_the_first_finishes(
        colour, tmp_path, children, capsys):
    train_colour_quietly(replace(colour, out=str(tmp_path / "straight")))
    first = start_child(PAUSED_COLOUR_RUN, json.dumps(asdict(colour)), "Epoch [1/2]",
                        tmp_path / "first.log")
    children.append(first)
    busy = rf"{colour.out} is in use by another run \(process {first.pid}\)"
    for config in (colour, replace(colour, resume=True)):
        with pytest.raises(runs.RunFolderBusyError, match=busy):
            train_colour_quietly(config)

    from convtally.analysis.cli import main

    argv = ["train", "colour", "--model", colour.model, "--epochs", "2", "--data",
            colour.data_dir, "--cache-dir", colour.cache_dir, "--out", colour.out,
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is in use by another run" in error

    first.stdin.write("go on\n")
    first.stdin.flush()
    output, _ = first.communicate(timeout=CHILD_TIMEOUT)
    assert first.returncode == 0 and output.endswith("done\n")
    assert_identical(run_outcome(Path(colour.out), runs.CHECKPOINT_FILE),
                     run_outcome(tmp_path / "straight", runs.CHECKPOINT_FILE))


def test_a_run_killed_with_sigkill_leaves_a_stale_lock_that_the_resume_recovers(
        colour, tmp_path, children):
    train_colour_quietly(replace(colour, out=str(tmp_path / "straight")))
    first = start_child(PAUSED_COLOUR_RUN, json.dumps(asdict(colour)), "Epoch [1/2]",
                        tmp_path / "first.log")
    children.append(first)
    first.send_signal(signal.SIGKILL)
    assert first.wait(CHILD_TIMEOUT) == -signal.SIGKILL
    run_dir = Path(colour.out)
    assert (run_dir / runs.LOCK_FILE).read_text() == f"{first.pid}\n"  # stale: nobody holds it

    train_colour_quietly(replace(colour, resume=True))
    assert not (run_dir / runs.LOCK_FILE).exists()
    assert_identical(run_outcome(run_dir, runs.CHECKPOINT_FILE),
                     run_outcome(tmp_path / "straight", runs.CHECKPOINT_FILE))


def test_the_lock_refuses_a_segment_run_and_a_sweep_while_held(segment, colour, tmp_path,
                                                               children):
    holder = start_child(HOLD_FOLDER, segment.out, "locked", tmp_path / "holder.log")
    children.append(holder)
    with pytest.raises(runs.RunFolderBusyError, match=f"process {holder.pid}"):
        train_segmentation(segment)
    sweep = tmp_path / "sweep"
    sweep_holder = start_child(HOLD_FOLDER, str(sweep), "locked", tmp_path / "sweep.log")
    children.append(sweep_holder)
    with pytest.raises(runs.RunFolderBusyError, match=f"{sweep} is in use"):
        train_colour.sweep_colourization(colour, [16], sweep, log=quiet)
    assert sorted(path.name for path in sweep.iterdir()) == [runs.LOCK_FILE]

    holder.stdin.close()
    assert holder.wait(CHILD_TIMEOUT) == 0
    train_segmentation(replace(segment, epochs=1))  # the folder is free again


def test_one_process_cannot_take_a_folder_twice_and_a_released_lock_is_removed(tmp_path):
    with runs.run_folder_lock(tmp_path / "run") as run_dir:
        assert (run_dir / runs.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(runs.RunFolderBusyError, match=f"process {os.getpid()}"):
            with runs.run_folder_lock(run_dir):
                pass
    assert list((tmp_path / "run").iterdir()) == []
    with pytest.raises(KeyError), runs.run_folder_lock(tmp_path / "run"):
        raise KeyError("released on errors too")
    with runs.run_folder_lock(tmp_path / "run"):
        pass


def test_a_run_folder_that_cannot_be_made_is_one_value_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="cannot use .*a_file/run as a run folder") as caught:
        with runs.run_folder_lock(tmp_path / "a_file" / "run"):
            pass
    assert "\n" not in str(caught.value)


def test_a_colour_sweep_resumes_finished_started_and_unstarted_runs(colour, tmp_path,
                                                                    monkeypatch):
    sweep = tmp_path / "sweep"
    train_colour.sweep_colourization(colour, [8, 16], tmp_path / "straight", log=quiet)
    with monkeypatch.context() as patch, pytest.raises(SimulatedKill):
        install_kill_hook(patch, sweep / "batch_8", kill_after=4)
        train_colour.sweep_colourization(colour, [8, 16], sweep, log=quiet)
    assert not (sweep / "batch_16").exists()
    train_colour.sweep_colourization(replace(colour, resume=True), [8, 16], sweep, log=quiet)
    for size in (8, 16):
        assert_identical(run_outcome(sweep / f"batch_{size}", runs.CHECKPOINT_FILE),
                         run_outcome(tmp_path / "straight" / f"batch_{size}",
                                     runs.CHECKPOINT_FILE))
