"""The installed namespace: `import convtally` is light and exposes the public names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import convtally


def test_import_convtally_does_not_import_torch():
    code = "import sys, convtally; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_public_names_are_the_modules_own():
    from convtally.analysis.accounting import Analysis, analyse
    from convtally.analysis.conventions import Convention
    from convtally.analysis.verification import verify

    assert (convtally.analyse, convtally.Analysis) == (analyse, Analysis)
    assert (convtally.Convention, convtally.verify) == (Convention, verify)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'analyze'"):
        convtally.analyze  # noqa: B018


def test_report_hand_tables_are_package_data():
    from convtally.analysis.report import HAND_TABLES

    assert all(path.parent.name == "tables" and path.is_file() for path in HAND_TABLES)
