"""convtally: weights, outputs and connections of convolutional networks as exact formulas.

The code lives in two subpackages, `convtally.analysis` (the accounting, verification, exports
and the `convtally` command) and `convtally.models` (the seed networks, data and training).
The names below are imported on first use, so `import convtally` (and `convtally --help`)
does not import torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

__version__ = "0.1.0"

# A source checkout run without installing (e.g. `python3 benchmarks/gpu_evidence.py` on a bare
# machine) keeps the subpackages beside this folder; an installed wheel has them inside it.
_here = Path(__file__).resolve().parent
if not (_here / "analysis").is_dir() and (_here.parent / "analysis" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # type: ignore[name-defined]  # noqa: F821

_PUBLIC = {
    "analyse": "convtally.analysis.accounting",
    "Analysis": "convtally.analysis.accounting",
    "Convention": "convtally.analysis.conventions",
    "verify": "convtally.analysis.verification",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    """Import a public name from its module the first time it is asked for."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'convtally' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
