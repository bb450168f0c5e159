"""CLI habits: --version, the output format from -o's extension, help text on every option."""

from __future__ import annotations

import argparse

import pytest
from convtally.analysis.cli import build_parser, main


def test_version_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("convtally ")


@pytest.mark.parametrize(
    "suffix, first_line",
    [(".tex", "% needs \\usepackage{booktabs}"), (".csv", "layer,type,output shape,weights"),
     (".md", "- model: poolupsample"), (".json", "{"), (".txt", "model: poolupsample")],
)
def test_output_format_follows_the_extension(tmp_path, suffix, first_line):
    path = tmp_path / f"table{suffix}"
    assert main(["table", "poolupsample", "--res", "32", "-o", str(path)]) == 0
    assert path.read_text().splitlines()[0].startswith(first_line)


def test_a_format_that_contradicts_the_extension_is_refused(tmp_path, capsys):
    path = tmp_path / "table.tex"
    assert main(["table", "poolupsample", "--res", "32", "-o", str(path), "--format",
                 "csv"]) == 2
    assert "--format csv contradicts -o" in capsys.readouterr().err
    assert not path.exists()
    other = tmp_path / "table.out"  # an extension that implies nothing: the default format
    assert main(["table", "poolupsample", "--res", "32", "-o", str(other), "--format",
                 "json"]) == 0
    assert other.read_text().startswith("{")


def _actions(parser: argparse.ArgumentParser, path: str = "convtally"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_option_has_help_text():
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}"
               for path, a in _actions(build_parser()) if not a.help]
    assert missing == []
