"""The table `proxymq demo` prints, as a terminal of 80 or 100 columns shows it."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from shared.cli import demo, demo_plan

SITE = "http://127.0.0.1:15966"
SUMMARY = "'Product 3 - ProxyMQ demo shop' (page 200): polled"
README = Path(__file__).resolve().parents[2] / "README.md"


def table(width: int) -> list[str]:
    calls = demo_plan.plan("url-fetcher", SITE, 37429)
    answers = [
        demo_plan.Answer(
            "202 -> 200" if call.asynchronous else "200", 1612.0, f"{n:08x}-id", SUMMARY, None
        )
        for n, call in enumerate(calls, start=1)
    ]
    out = io.StringIO()
    demo.render(calls, answers, SITE, Console(file=out, width=width, no_color=True))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_the_table_reads_at_80_columns() -> None:
    """At 80 columns the header wrapped (`what came` over `back`), the request column was cut
    to `/url-fetcher…`, and each answer took up to eight lines: the borders and a `correlation`
    column of 11 characters for 8 took the width."""
    lines = table(80)
    assert " ".join(lines[1].split()) == "# request key status ms what came back id"
    assert sum("/url-fetcher/fetch " in line for line in lines) == 10
    assert all(f"{n:08x}" in "\n".join(lines) for n in range(1, 13))
    assert len(lines) <= 3 + 12 * 3 + 2


def test_the_readme_shows_the_table_as_printed() -> None:
    """The README's sample had neither the correlation column nor the rows' second lines."""
    head = table(100)[:3]
    readme = README.read_text()
    for line in head:
        assert f"\n{line}\n" in readme, line


def test_the_lines_around_the_table_fit_80_columns() -> None:
    """At 80 columns the website's row of the component table and the closing summary each
    wrapped onto a second line."""
    out = io.StringIO()
    console = Console(file=out, width=80, no_color=True)
    console.print(
        demo.components(SITE, "http://127.0.0.1:15836", 17451, "http://127.0.0.1:17659", 10787)
    )
    console.print(demo.summary(12, 12, 1.7, "url-fetcher"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5, lines
    assert f"\n{lines[-1]}\n" in README.read_text(), lines[-1]
