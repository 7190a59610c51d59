"""Turning a reply back into the microservice's exact HTTP answer."""

from __future__ import annotations

from aiohttp import hdrs, web
from multidict import CIMultiDict

from shared.envelope import HttpResponse

_DEFAULTED = (hdrs.CONTENT_TYPE, hdrs.DATE, hdrs.SERVER)


class PassThroughResponse(web.Response):
    """aiohttp adds Content-Type, Date and Server when a response has none; a pass-through must
    not, or a reply without Content-Type would come back as application/octet-stream.

    A reply carries Content-Length only for a HEAD or a 304 (the size of what a GET would send,
    which aiohttp cannot count from an empty body); answering anything else, the length is the
    body's, whatever a reply says. (aiohttp would count a HEAD's from the empty body, and
    drop a 304's.)"""

    def __init__(self, reply: HttpResponse, *, head: bool) -> None:
        headers = CIMultiDict(reply.headers)
        length = headers.popall(hdrs.CONTENT_LENGTH, [None])[0]
        self._length = length if head or reply.status == 304 else None
        self._absent = [name for name in _DEFAULTED if name not in headers]
        super().__init__(status=reply.status, headers=headers, body=reply.body)

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self._absent:
            self.headers.popall(name, None)
        if self._length is not None:
            self.headers[hdrs.CONTENT_LENGTH] = self._length
