"""The configuration reference (docs/configuration.md), rendered from the settings classes so the
documentation cannot drift from the code; a test compares the two."""

from __future__ import annotations

import argparse
import inspect

from pydantic.fields import FieldInfo

from shared.settings import CommandSettings, shown_default


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    return shown_default(field) or "-"


def section(settings: type[CommandSettings]) -> str:
    head = f"## `{settings.prog}`\n\n{inspect.cleandoc(settings.__doc__ or '')}\n\n"
    return head + table(settings)


def table(settings: type[CommandSettings]) -> str:
    """The command's flags as `--help` tells them, one Markdown row each; url-fetcher's README
    shows it too."""
    lines = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "PROXYMQ_" + name.upper()
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{flag}` | `{env}` | `{_default(field)}` | {text} |")
    return "\n".join(lines) + "\n"


def tool_section() -> str:
    """`proxymq`'s options that are also variables, found in its parser: a command with
    actions is named alone when every action takes the option."""
    from shared.cli.common import is_setting
    from shared.cli.main import build_parser

    takes: dict[str, dict[str, list[str]]] = {}  # flag -> command -> its actions taking it
    actions: dict[str, list[str]] = {}  # command -> all its actions

    def walk(parser: argparse.ArgumentParser, command: str, action: str) -> None:
        for option in parser._actions:
            if isinstance(option, argparse._SubParsersAction):
                for name, child in option.choices.items():
                    if command:
                        actions.setdefault(command, []).append(name)
                    walk(child, command or name, name if command else "")
            elif is_setting(option):
                flag = option.option_strings[0]
                takes.setdefault(flag, {}).setdefault(command, []).append(action)

    walk(build_parser(), "", "")
    lines = [
        "## `proxymq`",
        "",
        "The operator's tool reads from the environment the broker, the service it works on and",
        "that service's layout, under the names the sidecars use; its other options (filters,",
        "`--yes`, `--json`, ...) are flags only, and so are `demo`'s `--service` and `bench`'s",
        "`--partitions`, which are of their own service. `proxymq COMMAND --help` marks each",
        "variable `[env ...]`. The TLS files of an `amqps://` broker are the sidecars' options,",
        "and `demo` and `bench` hand them on to the sidecars they start.",
        "",
        "| flag | environment | commands |",
        "| --- | --- | --- |",
    ]
    for flag, commands in takes.items():
        names = []
        for command, taking in commands.items():
            every = sorted(taking) == sorted(actions.get(command, [""]))
            names += [command] if every else [f"{command} {action}" for action in taking]
        variable = "PROXYMQ_" + flag.removeprefix("--").replace("-", "_").upper()
        lines.append(f"| `{flag}` | `{variable}` | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    from dequeuer.settings import DequeuerSettings
    from enqueuer.settings import EnqueuerSettings
    from url_fetcher.settings import UrlFetcherSettings

    head = (
        "# Configuration reference\n\n"
        "Generated from the settings code by `proxymq docs-config` (a test checks it is current).\n"
        "Every flag is also an environment variable; flags win over the environment. Any value\n"
        "can be read from a file instead: `PROXYMQ_AMQP_URL_FILE=/run/secrets/amqp` (for\n"
        "secrets, so they never sit on a command line). A variable and its file set at once are\n"
        "refused; a flag wins over both, and its file is not read. Sizes take units (`512KiB`,\n"
        "`1MiB`); durations, in seconds (or milliseconds for `-ms` flags), are at most 30 days;\n"
        "lists are comma separated or the flag repeated.\n"
    )
    parts = [section(s) for s in (EnqueuerSettings, DequeuerSettings, UrlFetcherSettings)]
    parts.append(tool_section())
    return head + "\n" + "\n".join(parts)
