"""benchmarks/gpu_evidence.py: the CPU rehearsal of the GPU evidence run, refusals, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from convtally.models import cifar

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


gpu_evidence = load_script("benchmarks/gpu_evidence.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda_in_one_line(tmp_path, capsys):
    assert gpu_evidence.main(["--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err and "--quick" in err
    assert not (tmp_path / "gpu").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_script_runs_from_any_folder_and_refuses_without_cuda(tmp_path):
    """As `make gpu-evidence` runs it: a script, not an import, from another working folder."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_evidence.py"),
                             "--out", str(tmp_path / "gpu")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "gpu_evidence: error: no CUDA GPU here (torch.cuda.is_available() is False); run it on "
        "a GPU machine, or rehearse with --device cpu --quick"]


def test_quick_cpu_rehearsal_runs_every_step(tmp_path, data_dir):
    out, archive = tmp_path / "gpu", tmp_path / "back" / "gpu_evidence.tar.gz"
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--archive", str(archive),
            "--data", str(data_dir), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--throughput-images", "100", "--throughput-epochs", "1",
            "--segment-size", "32", "--segment-images", "8"]
    assert gpu_evidence.main(argv) == 0

    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["status"] == "complete" and evidence["quick"] is True
    assert [(s["name"], s["status"]) for s in evidence["steps"]] == [
        ("train", "ok"), ("verify", "ok"), ("throughput", "ok"), ("segment", "ok")]
    assert evidence["machine"]["torch"] == torch.__version__
    for model in ("poolupsample", "convtranspose", "unet"):
        metrics = json.loads((out / "training" / model / "metrics.json").read_text())
        assert metrics["settings"]["batch_size"] == 100 and metrics["settings"]["filters"] == 32
        assert metrics["device"].startswith("cpu") and "cuda" in metrics["software"]
        assert len(metrics["epochs"]) == 1 and metrics["timing"]["warmup_seconds"] >= 0
        assert not (out / "training" / model / "training_state.pt").exists()
        report = json.loads((out / "verification" / f"{model}.json").read_text())
        assert report["mismatches"] == 0 and report["resolutions"] == ["32", "64"]
        assert "0 mismatch" in (out / "verification" / f"{model}.txt").read_text()
    throughput = json.loads((out / "benchmarks" / "train_throughput.json").read_text())
    assert [row["model"] for row in throughput["results"]] == ["poolupsample", "convtranspose",
                                                               "unet"]
    assert (out / "benchmarks" / "segment_fast_path.md").is_file()

    readme = (out / "README.md").read_text()
    assert readme.startswith("# GPU evidence: cpu") and "quick CPU rehearsal" in readme
    assert "python benchmarks/gpu_evidence.py --device cpu --quick" in readme
    assert "Status: **complete**" in readme and "0 mismatch" in readme
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"README.md", "evidence.json", "training/unet/checkpoint.pt",
            "verification/unet.json", "benchmarks/train_throughput.json"} <= names
    assert not any(Path(name).name.startswith(".") for name in names)  # no lock or temporaries
    assert (archive.parent / "gpu_evidence.md").read_text() == readme


def test_a_failed_step_is_recorded_and_the_next_runs(tmp_path, data_dir):
    out = tmp_path / "gpu"
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--steps", "train", "verify",
            "--data", str(tmp_path / "missing"), "--models", "poolupsample"]
    assert gpu_evidence.main(argv) == 1
    evidence = json.loads((out / "evidence.json").read_text())
    train, verify = evidence["steps"]
    assert train["status"] == "failed" and "missing" in train["error"]
    assert verify["status"] == "failed" and "no checkpoint" in verify["error"]
    readme = (out / "README.md").read_text()
    assert "Status: **failed: train, verify**" in readme and "**error**" in readme

    # a second run empties the earlier evidence folder, but never a folder that is not one
    (out / "stale.txt").write_text("old")
    argv[argv.index(str(tmp_path / "missing"))] = str(data_dir)
    argv += ["--epochs", "1"]
    assert gpu_evidence.main(argv) == 0
    assert not (out / "stale.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    assert gpu_evidence.main([*argv[:4], str(other), *argv[5:]]) == 2
    assert (other / "precious.txt").read_text() == "keep"


def test_prepare_carry_copies_data_fvcore_and_the_commit(tmp_path, data_dir, monkeypatch):
    carry = tmp_path / "carry"
    monkeypatch.setattr(gpu_evidence, "CARRY", carry)
    monkeypatch.setattr(gpu_evidence, "CARRIED_DATA", carry / cifar.CIFAR_DIRNAME)
    assert gpu_evidence.main(["--prepare-carry", "--data", str(data_dir)]) == 0
    assert sorted(p.name for p in (carry / cifar.CIFAR_DIRNAME).iterdir()) == sorted(
        p.name for p in data_dir.iterdir())
    for package in gpu_evidence.CARRIED_PACKAGES:
        assert (carry / "site" / package).exists() or (carry / "site" / f"{package}.py").exists()
    assert "commit" in json.loads((carry / "source.json").read_text())


def test_reports_readme_indexes_the_gpu_evidence(tmp_path):
    from convtally.analysis.report import _readme

    assert not any("gpu/" in line for line in _readme(tmp_path, [], "today", "machine"))
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "README.md").write_text("# GPU evidence: cuda (NVIDIA H100), 2026\n")
    lines = _readme(tmp_path, [], "today", "machine")
    assert any(line.startswith("- `gpu/`") and "NVIDIA H100" in line for line in lines)
