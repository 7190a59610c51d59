"""How `proxymq dlq` shows dead letters to a person: rich tables and the full view of one.

Everything a message carries is shown through `Text`, never as console markup: a path or header
value with `[brackets]` in it must print as it is, not restyle the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shared.cli.dlq_letters import (
    PREVIEW_BYTES,
    TEXT_PREVIEW_BYTES,
    DeadLetter,
    body_text,
    hex_preview,
    human_time,
    json_safe,
    properties,
)


def letter_table(letters: Sequence[DeadLetter], title: str, rows: int | None = None) -> Table:
    now = datetime.now(UTC)
    table = Table(title=escape(title), title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("request id", no_wrap=True)  # copied from logs into `dlq show`: one piece
    table.add_column("request", overflow="fold")
    table.add_column("key", overflow="fold")
    table.add_column("reason", overflow="fold", max_width=48)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("dead-lettered", no_wrap=True)
    table.add_column("body", justify="right", no_wrap=True)
    shown = letters if rows is None else letters[:rows]
    for letter in shown:
        table.add_row(
            str(letter.position),
            Text(letter.request_id or "-"),
            Text(request_line(letter)),
            Text(letter.partition_key if letter.partition_key is not None else "-"),
            Text(letter.reason + (" (broker)" if letter.source == "broker" else "")),
            "-" if letter.attempts is None else str(letter.attempts),
            human_time(letter.dead_at, now),
            size(letter.body_size),
        )
    if len(shown) < len(letters):
        table.add_section()
        table.add_row("", f"... and {len(letters) - len(shown)} more", "", "", "", "", "", "")
    return table


def request_line(letter: DeadLetter) -> str:
    if letter.method is None and letter.path is None:
        return "?"
    line = f"{letter.method or '?'} {letter.path or '?'}"
    return f"{line}?{letter.query}" if letter.query else line


def size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024 / 1024:.1f} MiB"


def render_letter(letter: DeadLetter, queue: str, console: Console) -> None:
    now = datetime.now(UTC)
    console.rule(Text(f"dead letter #{letter.position} of {queue}"))
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    deadline = human_time(letter.deadline, now)
    if letter.deadline is not None and letter.deadline < now:
        deadline += " - passed: replay removes it unless --keep-deadline"
    rows = [
        ("request id", letter.request_id or "-"),
        ("reason", f"{letter.reason} (from the {letter.source})"),
        ("attempts", "-" if letter.attempts is None else str(letter.attempts)),
        ("partition", letter.partition or "-"),
        ("dead-lettered at", human_time(letter.dead_at, now)),
        ("partition key", "-" if letter.partition_key is None else letter.partition_key),
        ("deadline", deadline),
    ]
    for name, value in rows:
        summary.add_row(name, Text(value))
    console.print(summary)

    console.print(Text("\nHTTP request", style="bold underline"))
    console.print(Text(request_line(letter)))
    if letter.http_headers is None:
        console.print(Text("(no readable x-proxymq-headers)", style="dim"))
    for name, value in letter.http_headers or ():
        console.print(Text(f"{name}: {value}"))

    console.print(Text("\nAMQP properties", style="bold underline"))
    console.print(key_values(properties(letter.message)))
    console.print(Text("\nAMQP headers", style="bold underline"))
    console.print(key_values(dict(letter.message.headers or {})))

    body = letter.message.body
    console.print(Text(f"\nbody ({size(len(body))})", style="bold underline"))
    text = body_text(body)
    if not body:
        console.print(Text("(empty)", style="dim"))
    elif text is not None:
        # Laid out whole, an 11 MB body took 40 s and 88,000 lines of the terminal.
        shown = body[:TEXT_PREVIEW_BYTES].decode("utf-8", "ignore")  # a cut character goes
        console.print(Text(shown))
        if len(shown) < len(text):
            more = len(body) - len(shown.encode())
            console.print(Text(f"... {more} more bytes (--json gives the whole body)", style="dim"))
    else:
        console.print(Text(hex_preview(body)))
        if len(body) > PREVIEW_BYTES:
            console.print(Text(f"... {len(body) - PREVIEW_BYTES} more bytes", style="dim"))
        console.print(Text("(binary: --json gives the whole body in base64)", style="dim"))


def key_values(values: dict[str, object]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in values.items():
        shown = json_safe(value)
        table.add_row(
            Text(key), Text(shown if isinstance(shown, str) else json.dumps(shown, default=str))
        )
    return table
