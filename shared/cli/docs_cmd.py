"""`proxymq docs-config`: print or write the configuration reference of every command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared import reference


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "docs-config",
        help="print the configuration reference (every flag and variable)",
        description="Render docs/configuration.md from the settings code.",
    )
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="write to this file instead of stdout"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    text = reference.render()
    if args.output is None:
        print(text, end="")
    else:
        try:
            args.output.write_text(text)
        except OSError as exc:
            print(
                f"proxymq docs-config: cannot write {args.output}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
    return 0
