"""The `convtally` command line."""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="convtally",
        description="Weights, outputs and connections of CNNs as exact formulas, verified.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a network (colourization or segmentation)")
    tasks = train.add_subparsers(dest="task", required=True, metavar="TASK")
    from models import train_colour, train_segment

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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 check failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, FileNotFoundError) as error:
        print(f"convtally {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convtally {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
