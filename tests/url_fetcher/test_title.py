"""Title extraction from HTML bodies, whole or in chunks."""

from __future__ import annotations

import encodings
import pkgutil

import pytest

from url_fetcher.title import (
    MAX_HEAD_CHARS,
    MAX_TITLE_CHARS,
    TitleScanner,
    _TitleParser,
    extract_title,
)


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
        # A title's text is everything up to </title> (RCDATA), as browsers show it: a tag in it
        # is text, not a tag to drop or, for <body>, the end of the search.
        (b"<title>List<String> in Java</title>", "List<String> in Java"),
        (b"<title>Use <b>bold</b> &amp; </i>more</title>", "Use <b>bold</b> & </i>more"),
        (b"<title>a <body> b</title><body>", "a <body> b"),
        (b"<title>no <!-- comment --></title>", "no <!-- comment -->"),
        (b"<title>never closed <p>text", "never closed <p>text"),
        (b"", None),
        (b"\xff\xff<title>ok \xff</title>", "ok \ufffd"),
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


@pytest.mark.parametrize(
    "meta",
    [
        '<meta charset="windows-1251">',
        "<META CHARSET=windows-1251 />",
        "<meta http-equiv='Content-Type' content='text/html; charset=windows-1251'>",
    ],
)
def test_without_a_response_charset_the_pages_meta_charset_is_used(meta: str) -> None:
    """Pages in legacy encodings often declare theirs in a <meta> only: their titles came out
    as U+FFFD, decoded as UTF-8."""
    body = f"<html><head>{meta}<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode("cp1251")
    assert extract_title(body) == "\u041f\u0440\u0438\u0432\u0435\u0442"
    scanner = TitleScanner()
    for i in range(len(body)):  # arriving a byte at a time
        scanner.feed(body[i : i + 1])
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442"
    assert extract_title(body.replace(b"windows-1251", b"utf-16")) == "\ufffd" * 6
    past_1024 = b"<!--" + b"x" * 1024 + b"-->" + body  # browsers look no further either
    assert extract_title(past_1024) == "\ufffd" * 6


@pytest.mark.parametrize(
    ("body", "charset"),
    [
        ("\ufeff<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode("utf-16-le"), None),
        ("\ufeff<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode("utf-16-be"), None),
        ("\ufeff<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode(), "iso-8859-1"),
        (
            '\ufeff<meta charset="windows-1251">'.encode()
            + "<title>\u041f\u0440\u0438\u0432\u0435\u0442</title>".encode(),
            None,
        ),
    ],
    ids=["utf-16-le", "utf-16-be", "utf-8 served as latin-1", "utf-8 with a meta charset"],
)
def test_a_byte_order_mark_wins_over_any_declared_charset(body: bytes, charset: str | None) -> None:
    """As in browsers (the HTML standard's encoding sniffing): a UTF-16 page came out without
    a title, a UTF-8 one served as Latin-1 in mojibake."""
    assert extract_title(body, charset) == "\u041f\u0440\u0438\u0432\u0435\u0442"
    scanner = TitleScanner(charset)
    for i in range(len(body)):  # arriving a byte at a time
        scanner.feed(body[i : i + 1])
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442"


@pytest.mark.parametrize(
    ("label", "encoded", "title"),
    [
        ("iso-8859-1", b"\x93Caf\xe9\x94 \x96 \x80", "\u201cCaf\u00e9\u201d \u2013 \u20ac"),
        ("us-ascii", b"it\x92s", "it\u2019s"),
        ("iso-8859-9", b"\x93\xfe\x94", "\u201c\u015f\u201d"),
        ("tis-620", b"\x85", "\u2026"),
        ("gb2312", "\u4e2d \u5586".encode("gbk"), "\u4e2d \u5586"),
        ("euc-kr", "\ub620".encode("cp949"), "\ub620"),
        ("shift_jis", "\u2460 \uff5e".encode("cp932"), "\u2460 \uff5e"),
        ("big5", "\u7881".encode("big5hkscs"), "\u7881"),
    ],
)
def test_a_charset_is_read_as_browsers_read_it(label: str, encoded: bytes, title: str) -> None:
    """Browsers decode these labels as the superset their pages are written in (the Encoding
    Standard): a page served as iso-8859-1 with curly quotes had C1 controls in its title."""
    body = b"<title>" + encoded + b"</title>"
    assert extract_title(body, label) == title
    meta = f'<meta charset="{label}">'.encode() + body
    assert extract_title(meta) == title


def test_the_response_charset_wins_over_the_meta() -> None:
    body = '<meta charset="windows-1251"><title>Caf\u00e9</title>'.encode()
    assert extract_title(body, "utf-8") == "Caf\u00e9"


@pytest.mark.parametrize("charset", ["no-such-charset", "base64", "rot13", "idna", None])
def test_unknown_or_non_text_charsets_fall_back_to_utf8(charset: str | None) -> None:
    assert extract_title("<title>Caf\u00e9</title>".encode(), charset) == "Caf\u00e9"


CODECS = sorted(module.name for module in pkgutil.iter_modules(encodings.__path__))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # unicode_escape on bad escapes
@pytest.mark.parametrize("charset", CODECS)
def test_no_charset_fails_on_any_body(charset: str) -> None:
    """utf-32 and utf-16 without a BOM, punycode with a byte over 127: some decoders raise even
    with errors="replace"; the title is then not found, and nothing is raised."""
    for body in [
        "<title>x</title>".encode("utf-32-le"),
        b"<title>a-\xe9</title>",
        bytes(range(256)) * 2,
        b"<title>ok</title>\xff\xfe\x00",
    ]:
        scanner = TitleScanner(charset)
        for i in range(0, len(body), 3):
            scanner.feed(body[i : i + 3])
        scanner.title()


def test_multibyte_characters_split_across_chunks_survive() -> None:
    body = "<title>\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600</title>".encode()
    scanner = TitleScanner("utf-8")
    for i in range(len(body)):
        scanner.feed(body[i : i + 1])
    assert scanner.done
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600"
    assert scanner.title() == "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001f600"


def test_scanner_stops_parsing_at_body() -> None:
    scanner = TitleScanner("utf-8")  # without, the first 1024 bytes wait for a <meta charset>
    scanner.feed(b"<html><head></head><body>")
    assert scanner.done
    scanner.feed(b"<title>late</title>")
    assert scanner.title() is None


@pytest.mark.parametrize("unit", [b"<x", b"<x ", b"</", b"<?", b"<!", b"<!--", b"<a b='"])
@pytest.mark.parametrize("chunk", [7, 64 * 1024])
def test_a_crafted_page_costs_the_parser_linear_work(
    monkeypatch: pytest.MonkeyPatch, unit: bytes, chunk: int
) -> None:
    """An incomplete construct the parser holds is scanned again on each feed, and close() is
    cubic in it (seconds for tens of KiB): the parser may only ever hold so much, never be closed
    on more than 1 KiB of it, and scan no more than a few times the text it is given."""
    scanned = [0]
    goahead = _TitleParser.goahead

    def counting(parser: _TitleParser, end: bool) -> None:
        assert len(parser.rawdata) <= (1024 if end else MAX_HEAD_CHARS)
        scanned[0] += len(parser.rawdata)
        assert scanned[0] <= 3 * MAX_HEAD_CHARS
        goahead(parser, end)

    monkeypatch.setattr(_TitleParser, "goahead", counting)
    body = b"<html><head>" + unit * (1024 * 1024 // len(unit))
    scanner = TitleScanner()
    for i in range(0, len(body), chunk):
        if not scanner.done:
            scanner.feed(body[i : i + chunk])
    assert scanner.title() is None


@pytest.mark.parametrize("head", [b"<script>" + b"x" * 200_000 + b"</script>", b"<meta>" * 30_000])
def test_a_title_after_a_large_head_is_still_found(head: bytes) -> None:
    body = b"<html><head>" + head + b"<title>Deep</title></head><body>" + b"y" * 100_000
    scanner = TitleScanner()
    for i in range(0, len(body), 64 * 1024):
        scanner.feed(body[i : i + 64 * 1024])
    assert scanner.title() == "Deep"


def test_text_past_max_head_chars_is_not_searched() -> None:
    assert extract_title(b"<!--" + b"x" * MAX_HEAD_CHARS + b"--><title>Late</title>") is None


def test_a_title_cut_short_by_the_end_of_the_body_is_kept() -> None:
    assert extract_title(b"<title>Fish &amp") == "Fish &"


def test_title_text_split_across_chunks_is_read_as_one() -> None:
    body = b"<head><title>Fish &amp; <chips> &#8212; </b>ok</title></head><body>"
    scanner = TitleScanner("utf-8")
    for i in range(len(body)):
        scanner.feed(body[i : i + 1])
    assert scanner.done
    assert scanner.title() == "Fish & <chips> \u2014 </b>ok"


def test_an_unclosed_title_costs_linear_work_and_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser holds a title's text until its </title> comes: a page that never sends it
    must not make every feed scan all of it again."""
    scanned = [0]
    goahead = _TitleParser.goahead

    def counting(parser: _TitleParser, end: bool) -> None:
        scanned[0] += len(parser.rawdata)
        assert scanned[0] <= 3 * MAX_HEAD_CHARS
        goahead(parser, end)

    monkeypatch.setattr(_TitleParser, "goahead", counting)
    scanner = TitleScanner("utf-8")
    scanner.feed(b"<title>")
    for _ in range(100_000):
        scanner.feed(b"</ti")
    assert scanner.title() == "</ti" * (MAX_TITLE_CHARS // 4)
