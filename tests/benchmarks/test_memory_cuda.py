"""benchmarks/memory_cuda.py: without CUDA it refuses in one line and writes nothing."""

from __future__ import annotations

import pytest
import torch

from tests.scripts import load_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path, capsys):
    memory_cuda = load_script("benchmarks/memory_cuda.py")
    assert memory_cuda.main(["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no CUDA device" in error
    assert not (tmp_path / "out").exists()
