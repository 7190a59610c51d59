"""The API's HTTP connections: what aiohttp's parser refuses is answered as ProxyMQ answers.

aiohttp answers a request it cannot parse (an unknown method, a line over 8,190 bytes, too many
headers, a malformed header, a bad Content-Length or chunk) itself, before any middleware runs,
with a plain-text 400 without X-Correlation-ID; it has no hook for that answer
(aio-libs/aiohttp#3287). So the API's runner makes connections whose `handle_error` renders it
as a `400 bad_request`. `tests/unit/test_protocol.py` fails when aiohttp stops calling it.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import _ErrInfo

from enqueuer.app import CORRELATION_HEADER, error_response
from enqueuer.handlers import new_request_id
from shared import logs
from shared.errors import malformed

log = logging.getLogger(__name__)


class ApiRequestHandler(web.RequestHandler):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        """aiohttp's C parser, refusing what follows a head (a bad chunk), left that request's
        body open: its handler waited for the rest until its deadline (504). The body fails as
        with aiohttp's Python parser, and ends, so that aiohttp does not wait to drain it."""
        request = self._current_request
        super().data_received(data)
        if request is None or request.content.is_eof() or not self._messages:
            return
        refused = self._messages[-1][0]
        if isinstance(refused, _ErrInfo):
            failed = web.RequestPayloadError(str(refused.exc))
            failed.__cause__ = refused.exc
            request.content.set_exception(failed)
            request.content.feed_eof()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size:
            return super().handle_error(request, status, exc, message)
        error = malformed(exc)
        request_id = new_request_id()
        log.log(
            # An unknown method is also what TLS or another protocol sent to this port looks like.
            logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING,
            "refused a malformed HTTP request (400)",
            extra=logs.fields(
                correlation_id=request_id,
                peer=request.remote,
                reason=error.message.partition(": ")[2],
            ),
        )
        response = error_response(error)
        response.headers[CORRELATION_HEADER] = request_id
        return response


class _ApiServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return ApiRequestHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:  # BaseRunner's hook: what serves connections
        server = await super()._make_server()
        server.__class__ = _ApiServer
        return server
