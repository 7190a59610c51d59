"""The configuration reference (docs/configuration.md), rendered from the settings classes so the
documentation cannot drift from the code; a test compares the two."""

from __future__ import annotations

import inspect

from pydantic_core import PydanticUndefined

from shared.settings import CommandSettings


def _default(field: object) -> str:
    default = getattr(field, "default", PydanticUndefined)
    if default is PydanticUndefined:
        return "(required)"
    if default is None:
        return "-"
    if isinstance(default, list):
        return ",".join(default) or "(empty)"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def section(settings: type[CommandSettings]) -> str:
    lines = [
        f"## `{settings.prog}`",
        "",
        inspect.cleandoc(settings.__doc__ or ""),
        "",
        "| flag | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "PROXYMQ_" + name.upper()
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{flag}` | `{env}` | `{_default(field)}` | {text} |")
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
    return head + "\n" + "\n".join(parts)
