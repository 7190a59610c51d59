"""Where a request's partition key comes from: header, JSON Pointer into the body, or query."""

from __future__ import annotations

import gc
import json

import pytest
from multidict import CIMultiDict

from shared.errors import BadPartitionKey
from shared.partition_key import KeySource, extract, parse_sources, resolve_pointer

JSON = "application/json"


def key_of(
    specs: list[str],
    *,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    query: str = "",
    body: object = None,
    raw: bytes | None = None,
    content_type: str = JSON,
    required: bool = False,
) -> str | None:
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    return extract(
        parse_sources(specs),
        CIMultiDict(headers or {}),
        query,
        data,
        content_type,
        required=required,
    )


def test_parse_sources() -> None:
    assert parse_sources(["header:X-Key", "json:/user/id", "query:k"]) == (
        KeySource("header", "X-Key"),
        KeySource("json", "/user/id"),
        KeySource("query", "k"),
    )
    assert str(KeySource("json", "/a")) == "json:/a"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cookie:session", "is not one of header:NAME"),
        ("X-Partition-Key", "is not one of header:NAME"),
        ("header:", "is not one of header:NAME"),
        ("query:", "is not one of header:NAME"),
        ("json:", "is not one of header:NAME"),
        ("", "is not one of header:NAME"),
        ("json:user/id", "must start with '/'"),
        # No request has such a header: the service was silently unkeyed.
        ("header: X-Key", "' X-Key' is not an HTTP header name"),
        ("header:X Key", "'X Key' is not an HTTP header name"),
        ("header:X-Key:", "'X-Key:' is not an HTTP header name"),
    ],
)
def test_parse_sources_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sources([spec])


def test_header_case_insensitive() -> None:
    assert key_of(["header:X-Partition-Key"], headers={"x-partition-key": "k1"}) == "k1"


def test_query() -> None:
    assert key_of(["query:tenant"], query="a=1&tenant=acme%20co&b=2") == "acme co"


def test_the_first_of_repeated_names_is_the_key() -> None:
    """As for a repeated header: the first value counts, whichever source."""
    assert key_of(["query:k"], query="k=first&k=second") == "first"
    assert key_of(["header:X-Key"], headers=[("X-Key", "first"), ("X-Key", "second")]) == "first"


def test_json_pointer() -> None:
    assert key_of(["json:/user/id"], body={"user": {"id": "u-7"}}) == "u-7"


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("/a~1b", "slash"),
        ("/m~0n", "tilde"),
        ("/~01", "tilde-one"),
        ("/", "empty-name"),
        ("/items/1/id", "second"),
        ("/items/0/id", "first"),
    ],
)
def test_json_pointer_rfc6901(pointer: str, expected: str) -> None:
    document = {
        "a/b": "slash",
        "m~n": "tilde",
        "~1": "tilde-one",
        "": "empty-name",
        "items": [{"id": "first"}, {"id": "second"}],
    }
    assert key_of([f"json:{pointer}"], body=document) == expected


@pytest.mark.parametrize("pointer", ["/items/2", "/items/-", "/items/x", "/missing/deep", "/a/b"])
def test_pointer_to_nothing_is_none(pointer: str) -> None:
    assert resolve_pointer({"items": [1, 2], "a": "text"}, pointer) is None


def test_first_match_wins_in_order() -> None:
    specs = ["header:X-Key", "json:/id", "query:k"]
    header = {"X-Key": "from-header"}
    body = {"id": "from-json"}
    assert key_of(specs, headers=header, body=body, query="k=from-query") == "from-header"
    assert key_of(specs, body=body, query="k=from-query") == "from-json"
    assert key_of(specs, body={"other": 1}, query="k=from-query") == "from-query"
    reverse = list(reversed(specs))
    assert key_of(reverse, headers=header, body=body, query="k=from-query") == "from-query"
    assert key_of(reverse, headers=header, body=body) == "from-json"


def test_empty_values_fall_through() -> None:
    specs = ["header:X-Key", "query:k", "json:/id"]
    assert key_of(specs, headers={"X-Key": ""}, query="k=", body={"id": "j"}) == "j"
    assert key_of(specs, body={"id": None}) is None


def test_missing_key_spreads_when_not_required() -> None:
    assert key_of(["header:X-Key", "json:/id"], body={"other": 1}) is None


def test_missing_key_refused_when_required() -> None:
    with pytest.raises(BadPartitionKey, match=r"header:X-Key, json:/id") as caught:
        key_of(["header:X-Key", "json:/id"], body={"other": 1}, required=True)
    assert caught.value.status == 400
    assert caught.value.code == "bad_partition_key"


def test_malformed_json_refused_when_required() -> None:
    with pytest.raises(BadPartitionKey, match="JSON"):
        key_of(["json:/id"], raw=b'{"id": ', required=True)


def test_a_body_that_is_no_json_leaves_the_key_to_the_next_source_when_required() -> None:
    """`--require-partition-key` refuses a request without a key; this one had a key, which the
    next source gave it without the flag, and was refused for its body."""
    specs = ["json:/id", "query:k"]
    assert key_of(specs, raw=b"{oops", query="k=q", required=True) == "q"
    with pytest.raises(BadPartitionKey, match=r"looked in json:/id \(the body is not valid JSON"):
        key_of(specs, raw=b"{oops", required=True)


def test_a_required_key_refused_says_why_the_body_was_not_read() -> None:
    """`curl -d '{"id": 7}'` sends `application/x-www-form-urlencoded`: the body is not read."""
    with pytest.raises(
        BadPartitionKey,
        match=r"looked in json:/id \(the body's Content-Type application/x-www-form-urlencoded "
        r"is not JSON\), query:k$",
    ):
        key_of(
            ["json:/id", "query:k"],
            body={"id": 7},
            content_type="application/x-www-form-urlencoded",
            required=True,
        )


def test_malformed_json_falls_through_when_not_required() -> None:
    assert key_of(["json:/id", "query:k"], raw=b"{oops", query="k=q") == "q"
    assert key_of(["json:/id"], raw=b"{oops") is None
    assert key_of(["json:/id"], raw=b"\xff\xfe\xfd") is None


def test_json_body_is_not_parsed_when_an_earlier_source_wins() -> None:
    assert key_of(["header:X-Key", "json:/id"], headers={"X-Key": "h"}, raw=b"{bad") == "h"
    assert (
        key_of(["header:X-Key", "json:/id"], headers={"X-Key": "h"}, raw=b"{bad", required=True)
        == "h"
    )


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.api+json", ""]
)
def test_json_content_types(content_type: str) -> None:
    assert key_of(["json:/id"], body={"id": "k"}, content_type=content_type) == "k"


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
def test_non_json_content_type_skips_json_source(content_type: str) -> None:
    specs = ["json:/id", "query:k"]
    assert key_of(specs, body={"id": "j"}, query="k=q", content_type=content_type) == "q"
    assert key_of(["json:/id"], body={"id": "j"}, content_type=content_type) is None


def test_json_content_type_is_case_insensitive() -> None:
    assert key_of(["json:/id"], body={"id": "k"}, content_type="Application/JSON") == "k"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (-7, "-7"), (1.5, "1.5"), (True, "true"), (False, "false"), ("s", "s")],
)
def test_scalars_become_strings(value: object, expected: str) -> None:
    assert key_of(["json:/id"], body={"id": value}) == expected


@pytest.mark.parametrize("text", ["10", "10.0", "1e1", "1.0E+1", "10.000"])
def test_one_number_is_one_key_however_it_is_written(text: str) -> None:
    """JSON has one kind of number: `10` from one client and `10.0` from another (Python's
    json.dumps of a float) are the same id, and were two keys in two partitions, with no
    order between them. A whole number is keyed as an integer, like `X-Partition-Key: 10`."""
    assert key_of(["json:/id"], raw=b'{"id": ' + text.encode() + b"}") == "10"


@pytest.mark.parametrize(
    ("text", "expected"), [("-0.0", "0"), ("0.25", "0.25"), ("1e-7", "1e-07"), ("Infinity", "inf")]
)
def test_other_numbers_are_keyed_as_python_writes_them(text: str, expected: str) -> None:
    assert key_of(["json:/id"], raw=b'{"id": ' + text.encode() + b"}") == expected


@pytest.mark.parametrize(
    ("written", "text"),
    [
        ("9007199254740992.0", "9007199254740992"),  # 2^53
        ("1e16", "10000000000000000"),  # Python's json.dumps(1e16)
        ("1.2345678901234568e+18", "1234567890123456768"),  # an id read into a float64 column
        ("1e21", "1000000000000000000000"),  # JavaScript's JSON.stringify(1e21)
    ],
)
def test_a_large_whole_number_is_keyed_as_an_integer(written: str, text: str) -> None:
    """Beyond 2^53, a whole number written with a fraction or an exponent (by Python's or
    JavaScript's encoder) was keyed as `9007199254740992.0` or `1e+16`: another key, in another
    partition, than the same number written as an integer by another client."""
    assert key_of(["json:/id"], raw=b'{"id": ' + written.encode() + b"}") == text
    assert key_of(["json:/id"], raw=b'{"id": ' + text.encode() + b"}") == text


def test_a_number_too_long_as_an_integer_is_refused() -> None:
    """As is the same number written with all its digits: a key is at most 255 bytes."""
    for written in (b"1e300", b"1" + b"0" * 300):
        with pytest.raises(BadPartitionKey, match="255"):
            key_of(["json:/id"], raw=b'{"id": ' + written + b"}")


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], []])
def test_object_or_array_value_refused(value: object) -> None:
    with pytest.raises(BadPartitionKey, match="must be a string or a number"):
        key_of(["json:/id"], body={"id": value})


@pytest.mark.parametrize(
    ("key", "ok"),
    [
        ("a" * 255, True),
        ("a" * 256, False),
        ("é" * 127, True),  # 254 bytes
        ("é" * 128, False),  # 256 bytes in 128 characters
        ("€" * 85, True),  # 255 bytes
        ("€" * 86, False),
    ],
)
def test_key_length_in_bytes(key: str, ok: bool) -> None:
    if ok:
        assert key_of(["json:/id"], body={"id": key}) == key
        assert key_of(["query:k"], query=f"k={key}") == key
    else:
        with pytest.raises(BadPartitionKey, match="255"):
            key_of(["json:/id"], body={"id": key})
        with pytest.raises(BadPartitionKey, match="255"):
            key_of(["header:X-Key"], headers={"X-Key": key})


def test_unicode_digit_pointer_does_not_crash() -> None:
    assert key_of(["json:/items/²"], body={"items": ["a", "b", "c"]}) is None


def test_reading_a_json_body_runs_no_garbage_collection() -> None:
    """A JSON document has no reference cycles, so the collector's passes while it is built
    find nothing: they took four fifths of the parse of 1 MiB of nested arrays (over 300 ms
    of a stalled event loop, every other caller waiting)."""
    body = b"[" + b",".join([b"[" * 10 + b"]" * 10] * 50_000) + b"]"
    passes: list[str] = []

    def count(phase: str, info: dict[str, int]) -> None:
        passes.append(phase)

    gc.callbacks.append(count)
    try:
        assert key_of(["json:/id"], raw=body) is None
    finally:
        gc.callbacks.remove(count)
    assert passes == []
    assert gc.isenabled()
