"""Placeholder until the subcommand lands."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("demo".replace("_cmd", ""), help="(not yet available)")
    parser.set_defaults(run=lambda _: 2)
