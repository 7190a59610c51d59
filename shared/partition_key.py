"""Where a request's partition key comes from: `header:NAME`, `json:/json/pointer` or `query:NAME`.

Sources are tried in order and the first that yields a key wins. No key at all means the request
has no ordering needs and is spread over the partitions, unless the key is required.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

from shared.errors import BadPartitionKey

_INDEX = re.compile(r"0|[1-9][0-9]*")  # RFC 6901 array index: ASCII digits, no leading zero
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
MAX_KEY_BYTES = 255  # an AMQP routing key is a short string
Kind = Literal["header", "json", "query"]


@dataclass(frozen=True, slots=True)
class KeySource:
    kind: Kind
    name: str  # header name, query parameter or JSON Pointer

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_sources(specs: Sequence[str]) -> tuple[KeySource, ...]:
    """Read `--partition-key` values; a typo is a startup error, not a silently unkeyed service."""
    sources = []
    for spec in specs:
        kind, sep, name = spec.partition(":")
        if not sep or kind not in ("header", "json", "query") or not name:
            raise ValueError(
                f"partition key source {spec!r} is not one of "
                "header:NAME, json:/pointer, query:NAME"
            )
        if kind == "header" and not _HEADER_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~), "
                "e.g. header:X-Partition-Key"
            )
        if kind == "json" and not name.startswith("/"):
            raise ValueError(
                f"JSON Pointer {name!r} must start with '/' (RFC 6901), e.g. json:/user/id"
            )
        sources.append(KeySource(kind, name))  # type: ignore[arg-type]
    return tuple(sources)


def resolve_pointer(document: object, pointer: str) -> object:
    """RFC 6901; a missing member gives None rather than an error."""
    node = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(token)
        elif isinstance(node, list) and _INDEX.fullmatch(token) and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def extract(
    sources: Sequence[KeySource],
    headers: Mapping[str, str],
    query: str,
    body: bytes,
    content_type: str,
    *,
    required: bool = False,
) -> str | None:
    """The partition key of one request, or None to spread it."""
    in_body: dict[str, object] | None = None  # each JSON Pointer's value, once the body is read
    unread = ""  # why the body gave no value
    for source in sources:
        value: object
        if source.kind == "header":
            value = headers.get(source.name)
        elif source.kind == "query":
            # The first of repeated names, as for a header (a dict kept the last one).
            pairs = parse_qsl(query, keep_blank_values=True)
            value = next((v for name, v in pairs if name == source.name), None)
        else:
            if in_body is None:
                in_body, unread = _json_values(body, content_type, sources)
            value = in_body.get(source.name)
        key = _as_key(value, source)
        if key is not None:
            return key
    if required:
        looked = [str(s) for s in sources]
        if unread:
            first = next(i for i, s in enumerate(sources) if s.kind == "json")
            looked[first] += f" ({unread})"
        raise BadPartitionKey(f"this request has no partition key; looked in {', '.join(looked)}")
    return None


def _json_values(
    body: bytes, content_type: str, sources: Sequence[KeySource]
) -> tuple[dict[str, object], str]:
    """Every JSON source's value in the body, or none and why: a body that is no JSON has no
    key, and the next source may have one.

    The garbage collector waits meanwhile: a JSON document has no reference cycles, and the
    collector's passes while one was built and read (one per 700 new lists or objects) made
    three quarters of the time the event loop stood still on a body of nested arrays.
    """
    if not body:
        return {}, "the request has no body"
    if "json" not in content_type.lower() and content_type:
        media_type = content_type.partition(";")[0].strip()[:100]
        return {}, f"the body's Content-Type {media_type} is not JSON"
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _resolve_all(body, [s.name for s in sources if s.kind == "json"]), ""
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..."
        return {}, f"the body is not valid JSON: {exc}"
    finally:
        if was_enabled:
            gc.enable()


def _resolve_all(body: bytes, pointers: list[str]) -> dict[str, object]:
    """A function of its own, so that the document is freed when it returns."""
    document = json.loads(body)
    return {pointer: resolve_pointer(document, pointer) for pointer in pointers}


def _as_key(value: object, source: KeySource) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        key = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        key = str(int(value))  # JSON has one kind of number: 10.0 and 1e16 are integers
    elif isinstance(value, str | int | float):
        key = str(value)
    else:
        raise BadPartitionKey(
            f"the partition key at {source} is a JSON {type(value).__name__}; it must be a string "
            "or a number"
        )
    try:  # a header's bytes that are no UTF-8, or a lone surrogate in JSON (`"\ud800"`)
        size = len(key.encode())
    except UnicodeEncodeError:
        raise BadPartitionKey(f"the partition key from {source} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise BadPartitionKey(
            f"the partition key from {source} is {size} bytes; at most {MAX_KEY_BYTES} are allowed"
        )
    return key
