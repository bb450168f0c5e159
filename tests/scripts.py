"""Loading the project's stand-alone scripts (benchmarks/, docs/) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """Return the script at REPOSITORY/relative_path imported as a module named after it."""
    path = REPOSITORY / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
