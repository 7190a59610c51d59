"""`proxymq`: the operator's tool. Each subcommand lives in its own module with `add_parser`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from shared.cli import bench, cluster, demo, dlq, docs_cmd, inject, keda, status, topology_cmd
from shared.cli.common import check_tls_files


def commands() -> list[ModuleType]:
    return [demo, bench, status, topology_cmd, dlq, docs_cmd, inject, keda, cluster]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxymq",
        description="Operate ProxyMQ: run the demo, measure, look at a service's partitions.",
        epilog=(
            "The broker, the service a command works on and its layout are also environment "
            "variables, as the sidecars read them: --amqp-url is PROXYMQ_AMQP_URL, "
            "--management-url PROXYMQ_MANAGEMENT_URL, --service PROXYMQ_SERVICE, --partitions "
            "PROXYMQ_PARTITIONS, ... (each command's --help marks them [env ...]; "
            "VARIABLE_FILE reads one from a file, not both). Flags win over the environment. "
            "Other options are flags only, and so are demo's --service and bench's "
            "--partitions: those are of their own service, not of the one a shell describes."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in commands():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """A Ctrl-C a command does not handle itself (dlq, demo and bench do) is one line and the
    shell's exit code for SIGINT, not a KeyboardInterrupt traceback."""
    args = build_parser().parse_args(argv)
    check_tls_files(args)
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        print(f"proxymq {args.command}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
