"""Title extraction from HTML bodies, whole or in chunks."""

from __future__ import annotations

import pytest

from url_fetcher.title import MAX_TITLE_CHARS, TitleScanner, extract_title


@pytest.mark.parametrize(
    ("body", "title"),
    [
        (b"<html><head><title>Hello</title></head></html>", "Hello"),
        (b"<TITLE>Upper case</TITLE>", "Upper case"),
        (b"<title>\n   Spread \t over\n\n lines  </title>", "Spread over lines"),
        (b"<title>Fish &amp; chips &#8212; &lt;cheap&gt;</title>", "Fish & chips \u2014 <cheap>"),
        (b"<html><head></head><body><p>no title</p></body></html>", None),
        (b"<title>   </title>", None),
        (b"<title></title>", None),
        (b"<head><title>First</title><title>Second</title></head>", "First"),
        (b"<body><svg><title>icon</title></svg></body>", None),
        (b"<title>never closed", "never closed"),
        (b"", None),
        (b"\xff\xfe<title>ok \xff</title>", "ok \ufffd"),
    ],
)
def test_extract_title(body: bytes, title: str | None) -> None:
    assert extract_title(body) == title


def test_title_is_cut_to_300_characters() -> None:
    title = extract_title(b"<title>" + b"x" * 5000 + b"</title>")
    assert title == "x" * MAX_TITLE_CHARS


@pytest.mark.parametrize(
    ("charset", "encoded"),
    [
        ("iso-8859-1", "<title>Caf\u00e9</title>".encode("latin-1")),
        ("windows-1251", "<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode("cp1251")),
        ("utf-16", "<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode("utf-16")),
    ],
)
def test_body_is_decoded_with_the_response_charset(charset: str, encoded: bytes) -> None:
    assert extract_title(encoded, charset) == encoded.decode(charset)[7:-8]


@pytest.mark.parametrize("charset", ["no-such-charset", "base64", "rot13", "idna", None])
def test_unknown_or_non_text_charsets_fall_back_to_utf8(charset: str | None) -> None:
    assert extract_title("<title>Caf\u00e9</title>".encode(), charset) == "Caf\u00e9"


def test_multibyte_characters_split_across_chunks_survive() -> None:
    body = "<title>\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600</title>".encode()
    scanner = TitleScanner("utf-8")
    for i in range(len(body)):
        scanner.feed(body[i : i + 1])
    assert scanner.done
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600"
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600"


def test_scanner_stops_parsing_at_body() -> None:
    scanner = TitleScanner()
    scanner.feed(b"<html><head></head><body>")
    assert scanner.done
    scanner.feed(b"<title>late</title>")
    assert scanner.title() is None
