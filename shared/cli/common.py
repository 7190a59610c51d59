"""What several `proxymq` subcommands share: options (each also read from its PROXYMQ_ variable)
and the [y/N] question before a destructive step."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from yarl import URL

from shared.settings import (
    DEFAULT_AMQP_URL,
    SidecarSettings,
    TlsFiles,
    check_amqp_url,
    read_secret_file,
)


def environment(variable: str) -> str | None:
    """The value of `variable`, or of the file `{variable}_FILE` names, as the sidecars read
    them; None when neither is set (`ValueError` says in one line why it cannot be used)."""
    value = read_secret_file(variable)
    return os.environ.get(variable) if value is None else value


def add_setting(
    parser: argparse.ArgumentParser,
    flag: str,
    parse: Callable[[str], Any] = str,
    *,
    default: Any = None,
    required: bool = False,
    help: str,
    **options: Any,
) -> None:
    """`flag`, also read from PROXYMQ_<FLAG> (or its `_FILE`); flags win over the environment.
    The variable is read, and checked by `parse`, only when parsing ends without the flag, so
    `--help` works whatever the environment holds; a value that cannot be used is a usage error
    naming the variable (exit 2), before anything is contacted."""
    variable = "PROXYMQ_" + flag.removeprefix("--").replace("-", "_").upper()
    # argparse passes a str default through `type`: this very object means "not given".
    unset = f"${variable}"

    def value(text: str) -> Any:
        if text is not unset:
            return parse(text)
        try:
            found = environment(variable)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if found is None:
            if required:
                raise argparse.ArgumentTypeError(f"required: give {flag} or set {variable}")
            return default
        try:
            return parse(found)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{variable}: {exc}") from None
        except (TypeError, ValueError):
            name = getattr(parse, "__name__", "")
            raise argparse.ArgumentTypeError(
                f"{variable}: invalid {name} value {found!r}"
            ) from None

    value.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid int value: 'x'"
    parser.add_argument(flag, type=value, default=unset, help=f"{help} [env {variable}]", **options)


def is_setting(action: argparse.Action) -> bool:
    """Whether `action` is one `add_setting` added (its default names its variable)."""
    return isinstance(action.default, str) and action.default.startswith("$PROXYMQ_")


def amqp_url(value: str) -> str:
    """argparse type of --amqp-url: one URL or a cluster's nodes, comma-separated. A value that
    cannot be a broker's is a usage error (exit 2) before anything is contacted."""
    try:
        return check_amqp_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_amqp_url(parser: argparse.ArgumentParser) -> None:
    """--amqp-url and the TLS files of an amqps:// broker, as the sidecars take them (their
    settings' descriptions are the help), so an operator reaches the brokers they reach."""
    add_setting(
        parser,
        "--amqp-url",
        amqp_url,
        default=DEFAULT_AMQP_URL,
        metavar="URL",
        help=f"{SidecarSettings.model_fields['amqp_url'].description}; PROXYMQ_AMQP_URL_FILE "
        f"reads it from a file (default: {DEFAULT_AMQP_URL})".replace("%", "%%"),
    )
    for field in fields(TlsFiles):
        flag = "--" + field.name.replace("_", "-")
        description = SidecarSettings.model_fields[field.name].description
        add_setting(parser, flag, metavar="FILE", help=str(description))
    parser.set_defaults(amqp_parser=parser)


def check_tls_files(args: argparse.Namespace) -> None:
    """The TLS files of a command `add_amqp_url` gave them to, checked as a sidecar checks its
    own when its settings load: one that cannot be used is a usage error (exit 2) before
    anything is contacted or started."""
    parser = getattr(args, "amqp_parser", None)
    if parser is None:
        return
    try:
        TlsFiles.of(args).context_for(args.amqp_url)
    except ValueError as exc:
        parser.error(str(exc))


MANAGEMENT_FROM_ENVIRONMENT = "$PROXYMQ_MANAGEMENT_URL"


def management_url(value: str) -> str | None:
    """argparse type of --management-url: an http:// or https:// URL with a host, from the flag
    or PROXYMQ_MANAGEMENT_URL; None when neither is set (the AMQP URL's host on 15672). A typo
    (`localhost:15672`) is a usage error (exit 2) at once, not an API reported unavailable."""
    try:
        if value is MANAGEMENT_FROM_ENVIRONMENT:
            return configured_management_url()
        return checked_management_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_management_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--management-url",
        type=management_url,
        default=MANAGEMENT_FROM_ENVIRONMENT,
        metavar="URL",
        help="RabbitMQ management API (default: the AMQP URL's host on port 15672; "
        "credentials: the URL's own, http://USER:PASSWORD@HOST:15672, else the AMQP URL's) "
        "[env PROXYMQ_MANAGEMENT_URL]",
    )


def configured_management_url() -> str | None:
    """PROXYMQ_MANAGEMENT_URL (or its `_FILE`), checked wherever it is read (`proxymq
    topology`, `make broker` too: they took a typo for an API that did not answer, and said so,
    or nothing); None when it is not set. A ValueError says what is wrong."""
    value = environment("PROXYMQ_MANAGEMENT_URL")
    return checked_management_url(value, " (PROXYMQ_MANAGEMENT_URL)") if value else None


def checked_management_url(value: str, source: str = "") -> str:
    try:
        url = URL(value)
        valid = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"{value!r}{source} is not an http:// or https:// URL, e.g. http://rabbitmq:15672"
        )
    return value.rstrip("/")


def description(doc: str | None) -> str:
    """A module docstring as `--help` shows it: without Markdown's code quotes, which a terminal
    prints as they are."""
    return (doc or "").replace("`", "")


def integer(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high]; anything else is a usage error (exit 2)
    before anything is contacted or declared."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, not {number}")
        return number

    return parse


async def confirm(question: str) -> bool:
    """Ask on the terminal; no terminal (a script, CI) means no, and says to pass --yes. The
    line is read by the event loop, not by `input()` in a worker thread: a Ctrl-C at the
    question cancels the wait at once, where `asyncio.run` waited for that thread, so for Enter."""
    if not sys.stdin.isatty():
        print(f"{question}\nrefusing without a terminal to ask on: pass --yes", file=sys.stderr)
        return False
    print(f"{question} [y/N] ", end="", flush=True)
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    line: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not line.done():
            line.set_result(os.read(fd, 4096))

    loop.add_reader(fd, readable)
    try:
        answer = await line  # b"" at end of input (Ctrl-D): a no
    finally:
        loop.remove_reader(fd)
    return answer.decode(errors="replace").strip().lower() in ("y", "yes")
