"""Progress bars: shown on a terminal by every long command, never in pipes or files."""

from __future__ import annotations

import csv
import io
import sys

import pytest
from convtally.analysis.cli import main


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm's automatic bars switch on."""

    def isatty(self) -> bool:
        return True


def resnet18_hand_table(path) -> str:
    """Write our own resnet18 table at 64 as a hand table (69 rows) and return its path."""
    exported = path / "exported.csv"
    assert main(["table", "torchvision:resnet18", "--res", "64", "--format", "csv",
                 "-o", str(exported)]) == 0
    table = path / "resnet18_64.csv"
    with exported.open() as source, table.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["layer", "type", "weights", "outputs", "connections"])
        for row in csv.DictReader(source):
            writer.writerow([row["layer"], row["type"], row["weights @64"], row["outputs @64"],
                             row["connections @64"]])
    return str(table)


@pytest.mark.parametrize("command, bar", [
    (["verify", "poolupsample", "--res", "32", "64"], "verify"),
    (["crosscheck", "poolupsample", "--res", "32", "--tools", "fvcore", "torch"], "crosscheck"),
    (["check-table", "TABLE", "--model", "torchvision:resnet18", "--res", "64"],
     "check-table 64"),
])
def test_long_commands_show_a_bar_on_a_terminal(command, bar, tmp_path, monkeypatch):
    command = [resnet18_hand_table(tmp_path) if part == "TABLE" else part for part in command]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*command, "-o", str(tmp_path / "out.txt")]) == 0
    assert f"{bar}:" in terminal.getvalue()
    piped = io.StringIO()  # not a terminal: no bar
    monkeypatch.setattr(sys, "stderr", piped)
    assert main([*command, "-o", str(tmp_path / "out.txt")]) == 0
    assert f"{bar}:" not in piped.getvalue()
