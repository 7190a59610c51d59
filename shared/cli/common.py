"""Options shared by several `proxymq` subcommands, each also read from its PROXYMQ_ variable."""

from __future__ import annotations

import argparse
import os

from shared.broker import redact
from shared.settings import DEFAULT_AMQP_URL


def env_default(name: str, default: str) -> str:
    """Flags win over the environment, which wins over the default; `NAME_FILE` reads a file."""
    path = os.environ.get(f"PROXYMQ_{name}_FILE")
    if path:
        with open(path) as file:
            return file.read().strip()
    return os.environ.get(f"PROXYMQ_{name}", default)


def add_amqp_url(parser: argparse.ArgumentParser) -> None:
    default = env_default("AMQP_URL", DEFAULT_AMQP_URL)
    parser.add_argument(
        "--amqp-url",
        default=default,
        help=f"RabbitMQ URL (env PROXYMQ_AMQP_URL; now {redact(default)})".replace("%", "%%"),
    )
