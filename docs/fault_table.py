"""Run every bad input and fault we know of through the real `convtally` command; write faults.md.

    python docs/fault_table.py            # writes docs/faults.md (about 3 minutes on 2 cores)

Each case runs `convtally` in a fresh process in a scratch folder (files it needs are made
there first), and the table records its exit code, the first line of what it printed on
stderr, and how long it took. Paths of the scratch folder are shown as `$TMP`.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVTALLY = str(Path(sys.executable).with_name("convtally"))
HEADER = "layer,type,weights,outputs,connections,weights_formula\n"


@dataclass
class Case:
    """One bad input: what it is, the arguments, and the files to make in the scratch folder."""

    name: str
    argv: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


def _formula_table(formula: str) -> str:
    quoted = formula.replace('"', '""')
    return HEADER + f'0,Conv2d,896,32768,884736,"{quoted}"\n'


def _checkpoints() -> dict[str, bytes]:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    from convtally.models.registry import resolve

    valid = saved(resolve("poolupsample").build({"NIC": 1}).state_dict())
    return {
        "module.pt": saved(torch.nn.Linear(2, 2)),
        "malicious.pt": saved({"weight": Payload()}),
        "truncated.pt": valid[: len(valid) // 2],
        "other_net.pt": saved(resolve("unet").build({"NIC": 1}).state_dict()),
    }


def cases() -> list[Case]:
    """Return every case of the table, in order."""
    checkpoints = _checkpoints()
    verify = ["verify", "poolupsample", "--set", "NIC=1", "--res", "32", "--checkpoint"]
    modules = {
        "raises_at_import.py": "x = 1\nraise RuntimeError('my module is broken')\n",
        "syntax_error.py": "def build(:\n    pass\n",
        "factories.py": "from torch import nn\n\ndef needs(n):\n    return nn.Linear(n, n)\n\n"
        "def typo():\n    return nn.Linear('8', 3)\n",
    }
    return [
        Case("formula cell with code", ["check-table", "t.csv", "--model", "poolupsample",
                                        "--partial"],
             {"t.csv": _formula_table("__import__('os').system('touch pwned')")}),
        Case("formula cell 2**2**2**2**2**2", ["check-table", "t.csv", "--model",
                                                "poolupsample", "--partial"],
             {"t.csv": _formula_table("2**2**2**2**2**2")}),
        Case("formula cell factorial(10**8)", ["check-table", "t.csv", "--model",
                                                "poolupsample", "--partial"],
             {"t.csv": _formula_table("factorial(10**8)")}),
        Case("formula cell nested 200 deep", ["check-table", "t.csv", "--model",
                                               "poolupsample", "--partial"],
             {"t.csv": _formula_table("(" * 200 + "H" + ")" * 200)}),
        Case("value cell of 30 digits", ["check-table", "t.csv", "--model", "poolupsample",
                                         "--partial"],
             {"t.csv": HEADER + "0,Conv2d," + "9" * 30 + ",1,1,\n"}),
        Case("hand table of binary garbage", ["check-table", "t.csv", "--model", "poolupsample"],
             {"t.csv": bytes(range(256)) * 4}),
        Case("hand table is a folder", ["check-table", ".", "--model", "poolupsample"]),
        Case("hand table lists 1 of 17 layers", ["check-table", "t.csv", "--model",
                                                 "poolupsample"],
             {"t.csv": HEADER + "0,Conv2d,896,32768,884736,\n"}),
        Case("padding of a kernel of 10^9", ["padding", "--kernel", "1000000000",
                                              "--stride", "3"]),
        Case("padding with no solution", ["padding", "--kernel", "4", "--stride", "1"]),
        Case("hyperparameter too big to build", ["table", "poolupsample", "--set",
                                                 "NF=100000000"]),
        Case("verify at 100000x100000", ["verify", "poolupsample", "--res", "100000"]),
        Case("memory limit set small", ["table", "poolupsample"], {},
             {"CONVTALLY_MEMORY_LIMIT": "1MiB"}),
        Case("bad --res", ["table", "poolupsample", "--res", "32x"]),
        Case("bad --input", ["table", "poolupsample", "--input", "2xQ"]),
        Case("--input 1-d for a 2-d network", ["table", "poolupsample", "--input", "3xT",
                                                "--res", "32"]),
        Case("bad --set", ["table", "poolupsample", "--set", "NF=big"]),
        Case("unknown model", ["table", "resnet18"]),
        Case("-o onto a folder", ["table", "poolupsample", "-o", "."]),
        Case("-o under a file", ["table", "poolupsample", "-o", "afile/t.txt"],
             {"afile": ""}),
        Case("report --out under a file", ["report", "--out", "afile/reports"], {"afile": ""}),
        Case("module raises at import", ["table", "raises_at_import:build"], modules),
        Case("module with a syntax error", ["table", "syntax_error:build"], modules),
        Case("factory needs arguments", ["table", "factories:needs"], modules),
        Case("TypeError inside a factory", ["table", "factories:typo"], modules),
        Case("checkpoint is a pickled module", [*verify, "module.pt"], checkpoints),
        Case("checkpoint with code in its pickle", [*verify, "malicious.pt"], checkpoints),
        Case("checkpoint truncated", [*verify, "truncated.pt"], checkpoints),
        Case("checkpoint of another network", [*verify, "other_net.pt"], checkpoints),
        Case("checkpoint is a folder", [*verify, "."]),
        Case("checkpoint missing", [*verify, "missing.pt"]),
        Case("training data folder missing", ["train", "colour", "--model", "unet", "--data",
                                              "nowhere", "--out", "run"]),
        Case("--resume of a folder with no run", ["train", "colour", "--model", "unet", "--data",
                                                  str(ROOT.parent / "shared" / "data" /
                                                      "cifar-10-batches-py"),
                                                  "--out", ".", "--resume"]),
        Case("formula cell in LaTeX, wrong on purpose", ["check-table", "t.csv", "--model",
                                                         "poolupsample", "--partial"],
             {"t.csv": HEADER.replace("weights_formula", "outputs_formula")
              + "0,Conv2d,896,32768,884736,$\\frac{NF \\cdot H \\cdot W}{2}$\n"}),
    ]


def run(case: Case, scratch: Path) -> tuple[int, str, float, bool]:
    """Run one case in an empty scratch folder; return exit code, first stderr line, seconds and
    whether anything the case planted ran (a file named `pwned` appeared)."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for name, content in case.files.items():
        path = scratch / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    environment = {**os.environ, "PYTHONPATH": str(scratch), **case.environment}
    environment.pop("CONVTALLY_DEBUG", None)
    started = time.perf_counter()
    completed = subprocess.run(
        [CONVTALLY, *case.argv], cwd=scratch, env=environment, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=300,
    )
    seconds = time.perf_counter() - started
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    first = lines[0] if lines else (completed.stdout.splitlines() or [""])[0]
    return completed.returncode, first.replace(str(scratch), "$TMP"), seconds, (
        scratch / "pwned").exists()


def main() -> int:
    """Run every case and write docs/faults.md; return 1 if a planted payload ran."""
    sys.path.insert(0, str(ROOT))
    rows, ran = [], False
    with tempfile.TemporaryDirectory() as folder:
        for case in cases():
            code, first, seconds, planted = run(case, Path(folder) / "scratch")
            ran |= planted
            shown = " ".join(case.argv).replace("|", "\\|")
            first = first.replace("|", "\\|")
            rows.append(f"| {case.name} | `convtally {shown}` | {code} | {seconds:.1f} | "
                        f"{'**yes**' if planted else 'no'} | {first} |")
            print(f"{code}  {seconds:5.1f} s  {case.name}", file=sys.stderr)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# Bad input and faults: what each command says",
        "",
        f"This file is generated by `python docs/fault_table.py` (run {now}, on "
        f"{os.cpu_count()} CPU cores). Each row is a real run of the `convtally` command in a "
        "scratch folder (`$TMP`) holding the files the case needs. Exit codes: 2 bad input, "
        "1 a failed check or run, 0 success. \"payload ran\" says whether a case that plants "
        "code (a `touch pwned` in a formula cell or a pickle) managed to run it.",
        "",
        "| case | command | exit | seconds | payload ran | first line on stderr |",
        "|---|---|---:|---:|---|---|",
        *rows,
        "",
    ])
    (ROOT / "docs" / "faults.md").write_text(text, encoding="utf-8")
    print(f"wrote {ROOT / 'docs' / 'faults.md'}", file=sys.stderr)
    return 1 if ran else 0


if __name__ == "__main__":
    sys.exit(main())
