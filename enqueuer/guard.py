"""Who may call, and how much they may send in headers: checked before anything is published."""

from __future__ import annotations

import hmac
from pathlib import Path

from aiohttp import web

from shared.errors import HeadersTooLarge, Unauthorized


def read_token(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip().encode()
    except OSError as exc:
        raise ValueError(f"cannot read the auth token file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"the auth token file {path} is empty")
    if any(byte < 0x20 or byte == 0x7F for byte in token):
        # No caller could send it in a header: every call would be answered 401.
        raise ValueError(
            f"the auth token in {path} holds a line break or another control character"
        )
    return token


class CallerGuard:
    def __init__(self, token: bytes | None, max_headers: int, max_header_bytes: int) -> None:
        self.token = token
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    def check(self, request: web.Request) -> None:
        headers = request.raw_headers
        if len(headers) > self.max_headers:
            raise HeadersTooLarge(
                f"{len(headers)} request headers; at most {self.max_headers} are allowed"
            )
        size = sum(len(name) + len(value) for name, value in headers)
        if size > self.max_header_bytes:
            raise HeadersTooLarge(
                f"request headers are {size} bytes; at most {self.max_header_bytes} are allowed"
            )
        if self.token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(errors="surrogateescape"), self.token
            ):
                raise Unauthorized("send the enqueuer's token as Authorization: Bearer TOKEN")

    def forwarded(self, headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The enqueuer's token is for the enqueuer: the microservice never sees it."""
        if self.token is None:
            return headers
        return tuple((n, v) for n, v in headers if n.lower() != "authorization")
