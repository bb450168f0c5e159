"""The `convtally` command line."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def _path(text: str) -> Path:
    """Return `text` as a Path (argparse's type for file arguments; pathlib is imported when a
    path is given, not to print --help)."""
    from pathlib import Path

    return Path(text)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# the keys of conventions.PRESETS, written out so that building the parser (and --help) does
# not import torch; tests/analysis/test_cli_speed.py keeps the two equal
PRESET_NAMES = ("default", "fvcore", "ptflops", "thop", "torchinfo", "torch")


def preset_names() -> list[str]:
    """Return the names of the convention presets, for --convention (without importing torch)."""
    return list(PRESET_NAMES)


def add_size_arguments(parser: argparse.ArgumentParser, default_res: str) -> None:
    """Add --res and --set; repeated flags accumulate."""
    parser.add_argument(
        "--res",
        nargs="+",
        action="extend",
        default=None,
        metavar="RES",
        help=f"resolutions: N for NxN or HxW (default: {default_res})",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=VALUE",
        help="hyperparameters, e.g. NF=64 K=5",
    )


def add_convention_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --convention and the switches that apply on top of it."""
    parser.add_argument(
        "--convention",
        choices=preset_names(),
        default="default",
        help="count as docs/counting.md says (default) or as fvcore, ptflops, thop, torchinfo or "
        "PyTorch's "
        "FlopCounterMode (torch) do; the switches below apply on top",
    )
    parser.add_argument(
        "--bias-connections",
        action="store_true",
        help="count one connection per output for each bias",
    )
    parser.add_argument(
        "--no-bias-connections",
        action="store_true",
        help="count no bias connections (the ptflops and torchinfo presets count them)",
    )
    parser.add_argument(
        "--no-batchnorm-weights",
        action="store_true",
        help="leave BatchNorm's affine parameters out of the weights",
    )
    parser.add_argument(
        "--no-bias-weights",
        action="store_true",
        help="leave biases out of the weights (as many papers and lecture tables count them)",
    )
    parser.add_argument(
        "--no-elementwise-connections",
        action="store_true",
        help="count no connections for BatchNorm, activations and add/mul",
    )


def add_model_arguments(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """Add MODEL, --res, --set, --convention, the switches, --exact and --allow-unknown."""
    parser.add_argument(
        "model",
        nargs="+" if many else None,
        metavar="MODEL",
        help="registry name (poolupsample, convtranspose, unet), "
        "torchvision:NAME, or package.module:callable",
    )
    add_size_arguments(parser, "32 64")
    if not many:
        parser.add_argument(
            "--input",
            default=None,
            metavar="SHAPE",
            help="the input of one example: CxHxW (default, C as the model's first layer "
            "takes), 1xHxW, CxT for a 1-d input (--res T) or CxDxHxW for a 3-d one "
            "(--res DxHxW); C may be a number or the letter C",
        )
    add_convention_arguments(parser)
    parser.add_argument(
        "--exact",
        action="store_true",
        help="keep PyTorch's floor() in the formulas instead of assuming "
        "the divisibility that removes it",
    )
    parser.add_argument(
        "--allow-unknown",
        action="store_true",
        help="count layers without a rule from the running network (the default; see --strict)",
    )
    add_capture_arguments(parser)


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --capture and --strict."""
    parser.add_argument(
        "--capture",
        choices=("auto", "fx", "export", "concrete"),
        default="auto",
        help="how the model is captured: fx (symbolic trace), export (torch.export, dynamic "
        "H, W), concrete (counted at each --res), or auto: the first that works (default)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse a model with an op that has no rule (by default its row says unknown "
        "and the total is marked incomplete)",
    )


SUFFIX_FORMATS = {".csv": "csv", ".md": "markdown", ".markdown": "markdown", ".tex": "latex",
                  ".json": "json", ".txt": "text"}


def add_output_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...]) -> None:
    """Add --format and -o/--output (the format follows FILE's extension unless given)."""
    parser.add_argument(
        "--format",
        choices=formats,
        default=None,
        help=f"output format (default: from -o FILE's extension, else {formats[0]})",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=_path,
        default=None,
        metavar="FILE",
        help="write to FILE (atomically) instead of standard output; "
        + ", ".join(f"{s} means {f}" for s, f in SUFFIX_FORMATS.items() if f in formats),
    )
    parser.set_defaults(formats=formats)


def resolve_format(args: argparse.Namespace) -> None:
    """Set args.format from -o's extension when --format is not given; refuse a contradiction."""
    formats = getattr(args, "formats", None)
    if not formats:
        return
    output = getattr(args, "output", None)
    implied = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    if implied is not None and implied not in formats:
        implied = None
    if args.format is None:
        args.format = implied or formats[0]
    elif implied is not None and implied != args.format:
        raise UsageError(
            f"--format {args.format} contradicts -o {output} (a {output.suffix} file is "
            f"{implied}); drop --format, or name the file for {args.format}"
        )


def emit(text: str, output: Path | None) -> None:
    """Print `text`, or write it atomically to `output`."""
    if output is None:
        sys.stdout.write(text)
    else:
        if output.is_dir():
            raise UsageError(f"-o {output} is a folder; give a file name, e.g. {output}/table.txt")
        from convtally.analysis.io import atomic_write_text

        atomic_write_text(output, text)
        print(f"wrote {output}", file=sys.stderr)


def convention_from(args: argparse.Namespace):
    """Return the Convention of --convention (a preset) with the switches applied on top."""
    from convtally.analysis.conventions import make_convention, preset

    if args.bias_connections and getattr(args, "no_bias_connections", False):
        raise UsageError("--bias-connections and --no-bias-connections contradict; give one")
    bias = True if args.bias_connections else None
    if getattr(args, "no_bias_connections", False):
        bias = False
    return make_convention(
        bias_in_connections=bias,
        batchnorm_in_weights=False if args.no_batchnorm_weights else None,
        bias_in_weights=False if getattr(args, "no_bias_weights", False) else None,
        elementwise_in_connections=False if args.no_elementwise_connections else None,
        base=preset(getattr(args, "convention", "default")),
    )


def resolutions_from(args: argparse.Namespace, default: tuple[str, ...] = ("32", "64")):
    """Return the (H, W) pairs of --res ((T,) or (D, H, W) with a 1-d or 3-d --input)."""
    from convtally.analysis.accounting import parse_input, parse_resolution

    rank = 2
    if getattr(args, "input", None) is not None:
        rank = len(parse_input(args.input)[1])
    return [parse_resolution(r, rank) for r in (args.res or default)]


_IMPORTS_FROZEN = False


def freeze_imports() -> None:
    """Put the objects the imports made (torch, torchvision and sympy: millions) out of the
    cyclic garbage collector's reach, once per process: a full collection over them cost about
    0.1 s of a `convtally table` run. What is made afterwards is collected as usual."""
    global _IMPORTS_FROZEN
    if not _IMPORTS_FROZEN:
        import gc

        gc.freeze()
        _IMPORTS_FROZEN = True


def analyse_from(args: argparse.Namespace, model: str, default: tuple[str, ...] = ("32", "64")):
    """Return the Analysis for `model` with the arguments' settings and convention."""
    from convtally.analysis.accounting import analyse, answer_every_resolution, parse_settings

    freeze_imports()

    def run(exact: bool):
        return analyse(
            model,
            parse_settings(args.set),
            convention_from(args),
            exact=exact,
            allow_unknown=not getattr(args, "strict", False),
            capture=getattr(args, "capture", "auto"),
            resolutions=resolutions,
            input_shape=getattr(args, "input", None),
        )

    resolutions = list(args.res or default)  # analyse reads them for the model's input
    analysis = run(args.exact)
    if getattr(args, "input", None) is None:  # what --res means from here: the model's input
        args.input = "x".join(("C", *map(str, analysis.axes)))
    resolutions = resolutions_from(args, default)
    return answer_every_resolution(analysis, resolutions, lambda: run(True))


def run_table(args: argparse.Namespace) -> int:
    """`convtally table`: print the per-layer cost table."""
    from convtally.analysis.formatting import render

    analysis = analyse_from(args, args.model)
    emit(render(analysis, resolutions_from(args), args.format, args.columns), args.output)
    return 0


def run_padding(args: argparse.Namespace) -> int:
    """`convtally padding`: the padding that halves (Conv2d) and doubles (ConvTranspose2d)."""
    from convtally.analysis.shapes import halving_and_doubling_padding

    if args.kernel < 1 or args.stride < 1:
        raise UsageError(
            f"--kernel and --stride must be positive, got {args.kernel}, {args.stride}"
        )
    padding, output_padding = halving_and_doubling_padding(args.kernel, args.stride)
    print(f"kernel {args.kernel}, stride {args.stride}:")
    print(
        f"  nn.Conv2d(..., kernel_size={args.kernel}, stride={args.stride}, "
        f"padding={padding})  maps H -> H/{args.stride}"
    )
    print(
        f"  nn.ConvTranspose2d(..., kernel_size={args.kernel}, stride={args.stride}, "
        f"padding={padding}, output_padding={output_padding})  maps H -> {args.stride}*H"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """`convtally verify`: check every formula against the running network; 1 on a mismatch."""
    from convtally.analysis.verification import CheckpointError, render_verification, verify

    analysis = analyse_from(args, args.model)
    try:
        result = verify(
            analysis, resolutions_from(args), checkpoint=args.checkpoint, device=args.device
        )
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    emit(render_verification(result, args.format), args.output)
    if args.output is not None:
        print(result.summary())
    return 1 if result.mismatches else 0


def run_compare(args: argparse.Namespace) -> int:
    """`convtally compare`: totals per model and resolution, ratios, accuracy when runs exist."""
    from convtally.analysis.accounting import parse_settings
    from convtally.analysis.compare import compare, render_comparison
    from convtally.analysis.figures import connections_vs_resolution

    resolutions = resolutions_from(args, ("32", "64", "128", "256"))
    if args.figure is not None and any(h != w for h, w in resolutions):
        raise UsageError(
            "--figure plots square resolutions only (N, not HxW); drop --figure or the HxW values"
        )
    if args.batch < 1:
        raise UsageError(f"--batch must be a positive integer, got {args.batch}; try 1 or 8")
    frame = compare(args.model, resolutions, parse_settings(args.set), convention_from(args),
                    memory_batch=args.batch)
    emit(render_comparison(frame, args.format), args.output)
    if args.figure is not None:
        from convtally.analysis.accounting import analyse

        analyses = [
            analyse(m, parse_settings(args.set) if ":" not in m else None, convention_from(args))
            for m in args.model
        ]
        sides = sorted({h for h, w in resolutions if h == w})
        for path in connections_vs_resolution(analyses, sides, args.figure):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def run_check_table(args: argparse.Namespace) -> int:
    """`convtally check-table`: every wrong cell of a hand table, diagnosed; 1 if any."""
    from convtally.analysis.handcheck import check_table, read_hand_table, render_check

    analysis = analyse_from(args, args.model, ("32",))
    tables: dict = {}
    resolutions = resolutions_from(args, ("32",))
    files = list(args.files)
    if len(files) > 1:
        if len(files) != len(resolutions):
            raise UsageError(
                f"{len(files)} table files but {len(resolutions)} --res values; "
                "give one resolution per file, in the same order"
            )
        from convtally.analysis.formatting import resolution_label

        for path, resolution in zip(files, resolutions, strict=True):
            tables[resolution_label(*resolution)] = read_hand_table(path).get(None) or []
    else:
        tables = read_hand_table(files[0])
    result = check_table(analysis, tables, resolutions)
    emit(render_check(result, args.format), args.output)
    if result.incomplete and not args.partial:
        print(
            "convtally check-table: incomplete: the table leaves out layers of the network (see "
            "above); list every layer, or pass --partial to check only the rows given",
            file=sys.stderr,
        )
        return 1
    return 1 if result.wrong else 0


def run_crosscheck(args: argparse.Namespace) -> int:
    """`convtally crosscheck`: each FLOP counter next to our preset for it; 1 if any differs."""
    from convtally.analysis.accounting import parse_settings
    from convtally.analysis.crosscheck import crosscheck, render_crosscheck

    result = crosscheck(
        args.model,
        resolutions_from(args, ("224",)),
        parse_settings(args.set) or None,
        tools=args.tools,
        exact=args.exact,
    )
    for note in result.skipped:
        print(note, file=sys.stderr)
    emit(render_crosscheck(result, args.format, layers=args.layers), args.output)
    if args.output is not None:
        print(f"{len(result.mismatches)} preset(s) differ from their tool")
    return 1 if result.mismatches else 0


def run_memory(args: argparse.Namespace) -> int:
    """`convtally memory`: bytes per layer (parameters, gradients, optimizer state, saved
    activations), the training and inference peaks, and with --budget what fits."""
    from convtally.analysis.accounting import parse_settings
    from convtally.analysis.limits import parse_bytes
    from convtally.analysis.memory import memory_table, render_memory

    if any(b < 1 for b in args.batch):
        raise UsageError(f"--batch sizes must be positive integers, got {args.batch}")
    budget = parse_bytes(args.budget) if args.budget is not None else None
    if budget is not None and budget < 1:
        raise UsageError(f"--budget must be positive, got {args.budget}")
    data = memory_table(
        args.model, resolutions_from(args, ("32",)), args.batch, args.dtype, args.optimizer,
        parse_settings(args.set), budget, args.mode, args.exact,
    )
    emit(render_memory(data, args.format), args.output)
    return 0


def run_report(args: argparse.Namespace) -> int:
    """`convtally report`: regenerate reports/."""
    from convtally.analysis.report import build_report

    lines = build_report(args.out, segmentation=not args.skip_segmentation)
    print("\n".join(lines))
    return 0


def build_parser(train: bool = True) -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand; `train=False` leaves out the training
    tasks' own arguments (their modules import torch, torchvision and matplotlib), for a
    command line that is not `train`."""
    parser = argparse.ArgumentParser(
        prog="convtally",
        description="Weights, outputs and connections of CNNs as exact formulas, verified.",
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    table = commands.add_parser("table", help="per-layer weights, outputs and connections")
    add_model_arguments(table)
    add_output_arguments(table, ("text", "csv", "markdown", "latex", "json"))
    table.add_argument(
        "--columns",
        choices=("both", "values", "formulas"),
        default="both",
        help="formula columns, value columns or both (default); a long network's total formula "
        "does not fit a page next to the values",
    )
    table.set_defaults(handler=run_table)

    verify = commands.add_parser(
        "verify", help="prove the formulas against hooks, fvcore and PyTorch's FLOP counter"
    )
    add_model_arguments(verify)
    verify.add_argument(
        "--checkpoint",
        type=_path,
        default=None,
        help="a state_dict file (e.g. a training run's checkpoint.pt)",
    )
    verify.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    add_output_arguments(verify, ("text", "json", "csv"))
    verify.set_defaults(handler=run_verify)

    compare = commands.add_parser("compare", help="compare architectures over resolutions")
    add_model_arguments(compare, many=True)
    add_output_arguments(compare, ("text", "csv", "markdown", "latex", "json"))
    compare.add_argument(
        "--figure",
        type=_path,
        default=None,
        metavar="STEM",
        help="also plot total connections vs resolution to STEM.png/.pdf",
    )
    compare.add_argument("--batch", type=int, default=1, metavar="B",
                         help="batch size of the memory columns (saved for backward, training "
                         "and inference peaks; float32, SGD; default: 1)")
    compare.set_defaults(handler=run_compare)

    memory = commands.add_parser(
        "memory", help="bytes per layer: parameters, gradients, optimizer state, saved "
        "activations; training and inference peaks; the largest batch that fits"
    )
    memory.add_argument("model", metavar="MODEL", help="as for table")
    add_size_arguments(memory, "32")
    memory.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64], metavar="B",
                        help="batch sizes (default: 1 8 64)")
    memory.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32", help="the dtype of parameters and activations")
    memory.add_argument("--optimizer", choices=("sgd", "momentum", "adam", "adamw"),
                        default="sgd", help="its state: sgd none, momentum 1x, adam/adamw 2x "
                        "the trainable parameters (default: sgd)")
    memory.add_argument("--mode", choices=("training", "inference"), default="training",
                        help="the peak --budget sizes against (default: training)")
    memory.add_argument("--budget", default=None, metavar="SIZE",
                        help="e.g. 24GiB: the largest batch at each --res and the largest "
                        "square resolution at each --batch that fit, from the formulas")
    memory.add_argument("--exact", action="store_true",
                        help="keep PyTorch's floor() in the formulas")
    add_output_arguments(memory, ("text", "csv", "markdown", "json"))
    memory.set_defaults(handler=run_memory)

    tools = [name for name in preset_names() if name != "default"]  # one preset per tool
    cross = commands.add_parser(
        "crosscheck",
        help="run fvcore, ptflops, thop, torchinfo and FlopCounterMode and match each with "
        "our preset for it, and break down their differences",
    )
    cross.add_argument("model", metavar="MODEL", help="as for table")
    add_size_arguments(cross, "224")
    cross.add_argument(
        "--tools",
        nargs="+",
        choices=tools,
        default=tools,
        metavar="TOOL",
        help=f"which tools ({', '.join(tools)}; default: all installed)",
    )
    cross.add_argument(
        "--layers", action="store_true", help="also list every tool's count per layer"
    )
    cross.add_argument(
        "--exact",
        action="store_true",
        help="formulas with floor() at every resolution (a resolution off the simple formulas' "
        "divisibility gets them anyway)",
    )
    add_output_arguments(cross, ("text", "json", "csv", "markdown"))
    cross.set_defaults(handler=run_crosscheck)

    check = commands.add_parser("check-table", help="check a hand-derived cost table (CSV)")
    check.add_argument(
        "files",
        nargs="+",
        type=_path,
        metavar="FILE.csv",
        help="one CSV per resolution (with --res in the same order), or one "
        "CSV with a resolution column",
    )
    check.add_argument(
        "--model", required=True, help="the network the table describes (as for table)"
    )
    check.add_argument(
        "--partial",
        action="store_true",
        help="check only the rows given: a table that lists under half of the network's layers, "
        "or leaves out a layer with weights, is otherwise reported as incomplete (exit 1)",
    )
    add_size_arguments(check, "32")
    add_convention_arguments(check)
    check.add_argument(
        "--exact",
        action="store_true",
        help="check values and formulas against the formulas with floor() that hold at every "
        "size (a hand formula such as NF*H/2 is then wrong unless it keeps the floor)",
    )
    check.set_defaults(allow_unknown=False, strict=True)
    add_output_arguments(check, ("text", "markdown", "csv", "json"))
    check.set_defaults(handler=run_check_table)

    report = commands.add_parser("report", help="regenerate reports/ (the main job)")
    report.add_argument(
        "--out",
        type=_path,
        default="reports",
        help="the folder to (re)generate (default: reports)",
    )
    report.add_argument(
        "--skip-segmentation",
        action="store_true",
        help="leave DeepLabV3 out (its analysis takes a few seconds)",
    )
    report.set_defaults(handler=run_report)

    padding = commands.add_parser(
        "padding", help="Conv2d/ConvTranspose2d padding that halves/doubles the size exactly"
    )
    padding.add_argument("--kernel", type=int, required=True, help="the kernel size K")
    padding.add_argument(
        "--stride", type=int, default=2, help="the factor to halve and double by (default: 2)"
    )
    padding.set_defaults(handler=run_padding)

    training = commands.add_parser("train", help="train a network (colourization or segmentation)")
    tasks = training.add_subparsers(dest="task", required=True, metavar="TASK")
    if not train:
        return parser
    from convtally.models import train_colour, train_segment

    train_colour.configure_colour_parser(
        tasks.add_parser("colour", help="train a colourization CNN on CIFAR-10")
    )
    train_colour.configure_sweep_parser(
        tasks.add_parser("colour-sweep", help="one colourization run per batch size")
    )
    train_segment.configure_segment_parser(
        tasks.add_parser("segment", help="fine-tune DeepLabV3 on Oxford 17 Flowers")
    )
    return parser


class _VersionAction(argparse.Action):
    """--version: print the installed version and exit (read only when asked for: the package
    metadata takes longer to import than the rest of the parser)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"convtally {_version()}\n")
        parser.exit()


def _version() -> str:
    """Return the installed convtally version (without importing torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convtally")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 check failed, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(train="train" in argv)
    args = parser.parse_args(argv)
    try:
        resolve_format(args)
        return int(args.handler(args) or 0)
    except (UsageError, ValueError) as error:
        print(f"convtally {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        message = _os_error(error) if error.filename else _one_line(error)
        print(f"convtally {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder that cannot be written, a disk that is full, ...
        print(f"convtally {args.command}: error: {_os_error(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"convtally {args.command}: error: out of memory; try smaller sizes (--res, --set, "
            "--batch-size) or a machine with more memory",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"convtally {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line, the traceback on request
        if os.environ.get("CONVTALLY_DEBUG"):
            raise
        print(
            f"convtally {args.command}: internal error: {type(error).__name__}: "
            f"{_one_line(error)}; rerun with CONVTALLY_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 1


def _one_line(error: BaseException) -> str:
    """Return the error's message on one line (a multi-line message is joined with '; ')."""
    text = str(error) if not isinstance(error, KeyError) else repr(error.args[0])
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_error(error: OSError) -> str:
    """Return an OSError as 'cannot write PATH: Permission denied; <what to do>'."""
    path = error.filename or ""
    reason = error.strerror or str(error)
    remedies = {
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.EISDIR: "give a file name, not a folder",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENOSPC: "the disk is full; free space or choose another folder",
        errno.ENOENT: "check the path",
    }
    remedy = remedies.get(error.errno, "check the path")
    return f"{path}: {reason}; {remedy}" if path else f"{reason}; {remedy}"


if __name__ == "__main__":
    sys.exit(main())
