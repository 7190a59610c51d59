"""Find the `<title>` of an HTML page while its body streams in."""

from __future__ import annotations

import codecs
from html.parser import HTMLParser

MAX_TITLE_CHARS = 300
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})

# Stop collecting an unclosed title well before it could eat memory.
_MAX_RAW_TITLE_CHARS = 16 * MAX_TITLE_CHARS


class _TitleParser(HTMLParser):
    """Collects the text of the first `<title>`; `done` once it closed or `<body>` began."""

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
        elif tag == "body":
            # A title belongs in <head>; past it, further parsing is wasted work.
            self.done = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.in_title:
            self.in_title = False
            self.done = True

    def handle_data(self, data: str) -> None:
        if self.in_title and not self.done and self.collected < _MAX_RAW_TITLE_CHARS:
            self.parts.append(data)
            self.collected += len(data)


class TitleScanner:
    """Feed body chunks as they arrive; stops parsing once the title is known.

    Bytes are decoded with the response charset (UTF-8 if absent or unknown, bad bytes replaced),
    incrementally, so multi-byte characters split across chunks survive.
    """

    def __init__(self, charset: str | None = None) -> None:
        self._decoder = _text_decoder(charset)
        self._parser = _TitleParser()
        self._closed = False

    @property
    def done(self) -> bool:
        """True when more bytes cannot change the title."""
        return self._parser.done

    def feed(self, chunk: bytes) -> None:
        """Parse one more piece of the body (ignored once the title is known)."""
        if not self._parser.done:
            self._parser.feed(self._decoder.decode(chunk))

    def title(self) -> str | None:
        """The title with whitespace collapsed, cut to 300 characters; None if absent or blank."""
        if not self._parser.done and not self._closed:
            self._parser.feed(self._decoder.decode(b"", final=True))
            self._parser.close()
            self._closed = True
        text = " ".join("".join(self._parser.parts).split())
        return text[:MAX_TITLE_CHARS] or None


def _text_decoder(charset: str | None) -> codecs.IncrementalDecoder:
    """A decoder for `charset`, or UTF-8 when it is unknown or not a text encoding (`base64`)."""
    if charset:
        try:
            "".encode(charset)  # LookupError for unknown and bytes-to-bytes codecs alike
            decoder = codecs.getincrementaldecoder(charset)(errors="replace")
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
