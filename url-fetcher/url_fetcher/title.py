"""Find the `<title>` of an HTML page while its body streams in."""

from __future__ import annotations

import codecs
import re
from html import unescape
from html.parser import HTMLParser

MAX_TITLE_CHARS = 300
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})

# How far into a page's text the title is looked for: far past where any realistic <head> has it,
# and a bound on what a crafted page can make the parser hold and scan.
MAX_HEAD_CHARS = 256 * 1024
# Stop collecting an unclosed title well before it could eat memory.
_MAX_RAW_TITLE_CHARS = 16 * MAX_TITLE_CHARS
# HTMLParser re-scans the incomplete construct it holds (`rawdata`) on every feed, and its
# close() takes time cubic in it on CPython 3.11 (13 ms for 1 KiB of "<x ", 2.7 s for 16 KiB).
_SMALL_PENDING = 1024
# Where a page without a charset in its Content-Type declares one: a <meta charset> or
# http-equiv Content-Type in its first 1024 bytes (the HTML standard's prescan looks that far).
_PRESCAN_BYTES = 1024
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([\w.:-]+)""", re.I)
# What browsers decode a charset as (the Encoding Standard): the superset its pages are written
# in, by Python's name for it. A page served as iso-8859-1 uses windows-1252's curly quotes.
_BROWSER_CODECS = {
    "ascii": "cp1252",
    "iso8859-1": "cp1252",
    "iso8859-9": "cp1254",
    "tis-620": "cp874",
    "iso8859-11": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "euc_kr": "cp949",
    "shift_jis": "cp932",
    "big5": "big5hkscs",
}
# A title's text runs to </title>, tags and all (RCDATA: `List<String>` is text). Pythons from
# mid-2025 on parse it so, unescaping its character references; older ones must be told.
_NATIVE_RCDATA = "title" in getattr(HTMLParser, "RCDATA_CONTENT_ELEMENTS", ())


class _TitleParser(HTMLParser):
    """Collects the text of the first `<title>`; `done` once it closed or `<body>` began.

    Until its `</title>` comes, the title's text waits in `rawdata`: `TitleScanner.title` takes
    it from there when the body ends first.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.collected = 0
        self.in_title = False
        self.done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.done:
            return
        if tag == "title" and not self.in_title:
            self.in_title = True
            if not _NATIVE_RCDATA:
                self.set_cdata_mode(tag)
        elif tag == "body":
            # A title belongs in <head>; past it, further parsing is wasted work.
            self.done = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.in_title:
            self.in_title = False
            self.done = True

    def handle_data(self, data: str) -> None:
        if self.in_title and not self.done:
            self.add(data if _NATIVE_RCDATA else unescape(data))

    def add(self, text: str) -> None:
        if self.collected < _MAX_RAW_TITLE_CHARS:
            self.parts.append(text[:_MAX_RAW_TITLE_CHARS])
            self.collected += len(text)


class TitleScanner:
    """Feed body chunks as they arrive; stops parsing once the title is known.

    Bytes are decoded as a byte order mark says, else with the response charset, else the one a
    `<meta>` in the first 1024 bytes declares (UTF-8 if none or unknown, bad bytes replaced): the
    order browsers follow. Decoding is incremental, so multi-byte
    characters split across chunks survive. Only the first
    `MAX_HEAD_CHARS` of text are searched, so a crafted page costs the parser time linear in that.
    """

    def __init__(self, charset: str | None = None) -> None:
        # The first bytes wait for the charset to be known: a BOM's three, else a <meta>'s 1024.
        self._charset = charset
        self._decoder: codecs.IncrementalDecoder | None = None
        self._head = b""
        self._parser = _TitleParser()
        self._room = MAX_HEAD_CHARS
        self._waiting: list[str] = []
        self._waiting_chars = 0
        self._ended = False

    @property
    def done(self) -> bool:
        """True when more bytes cannot change the title."""
        return self._parser.done or self._room == 0

    def feed(self, chunk: bytes) -> None:
        """Parse one more piece of the body (ignored once the title is known)."""
        if self.done:
            return
        if self._decoder is None:
            self._head += chunk
            if len(self._head) < (len(codecs.BOM_UTF8) if self._charset else _PRESCAN_BYTES):
                return
            chunk, self._head = self._head, b""
        self._add(self._decode(chunk))

    def title(self) -> str | None:
        """The title with whitespace collapsed, cut to 300 characters; None if absent or blank."""
        if not self._ended:
            self._ended = True
            if not self.done:
                head, self._head = self._head, b""
                self._add(self._decode(head, final=True))
            self._hand_over()
            # A title cut short by the end of the body: the text it has (close() would scan
            # all that the parser holds again, in cubic time on CPython 3.11).
            if self._parser.in_title and not self._parser.done:
                self._parser.add(unescape(self._parser.rawdata[:_MAX_RAW_TITLE_CHARS]))
        text = " ".join("".join(self._parser.parts).split())
        return text[:MAX_TITLE_CHARS] or None

    def _decode(self, data: bytes, final: bool = False) -> str:
        """`data` as text; a charset the body does not fit ends the search (utf-32 without a BOM
        raises even with errors="replace"): a title is a nicety, never a reason to fail a fetch."""
        if self._decoder is None:
            charset = _bom_charset(data) or self._charset or _prescan(data[:_PRESCAN_BYTES])
            self._decoder = _text_decoder(charset)
        try:
            return self._decoder.decode(data, final)
        except UnicodeError:
            self._room = 0
            return ""

    def _add(self, text: str) -> None:
        """Keep `text` (up to the room left); hand it over now unless the parser holds a large
        incomplete construct, which each feed scans again: then wait for at least as much new
        text, so those scans add up to linear time however small the chunks."""
        text = text[: self._room]
        self._room -= len(text)
        self._waiting.append(text)
        self._waiting_chars += len(text)
        pending = len(self._parser.rawdata)
        if pending <= _SMALL_PENDING or self._waiting_chars >= pending or self._room == 0:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._waiting_chars and not self._parser.done:
            self._parser.feed("".join(self._waiting))
        self._waiting.clear()
        self._waiting_chars = 0


def _bom_charset(head: bytes) -> str | None:
    """The charset a byte order mark at the start of the body names; the decoders named drop it."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _prescan(head: bytes) -> str | None:
    """The charset a page's `<meta>` declares; a UTF-16 or UTF-32 one means UTF-8 (a page that
    can be read as ASCII to find its meta is neither, the HTML standard says)."""
    found = _META_CHARSET.search(head)
    if found is None:
        return None
    charset = found.group(1).decode("ascii", "replace")
    return None if charset.lower().startswith(("utf-16", "utf-32")) else charset


def _text_decoder(charset: str | None) -> codecs.IncrementalDecoder:
    """A decoder for `charset` as browsers read it, or UTF-8 when it is unknown or not a text
    encoding (`base64`)."""
    if charset:
        try:
            "".encode(charset)  # LookupError for unknown and bytes-to-bytes codecs alike
            name = codecs.lookup(charset).name
            name = _BROWSER_CODECS.get(name, name)
            decoder = codecs.getincrementaldecoder(name)(errors="replace")
            decoder.decode(b"<")  # some codecs (idna) refuse errors="replace" only when used
            decoder.reset()
            return decoder
        except (LookupError, UnicodeError, ValueError, AssertionError):
            pass
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def extract_title(body: bytes, charset: str | None = None) -> str | None:
    """The title of a complete HTML document, see `TitleScanner`."""
    scanner = TitleScanner(charset)
    scanner.feed(body)
    return scanner.title()
