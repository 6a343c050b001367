"""Envelope validation and framing."""

from __future__ import annotations

import msgpack
import pytest

from vramchat.shared import protocol
from vramchat.shared.protocol import ProtocolError, decode_event, decode_request, field_of


def test_request_round_trip_ignores_unknown_fields() -> None:
    frame = msgpack.packb({"v": 1, "id": "a", "type": "status", "body": {"x": 1}, "extra": True})
    request = decode_request(frame)
    assert (request.id, request.type, request.body) == ("a", "status", {"x": 1})
    assert decode_request(request.encode()) == request


@pytest.mark.parametrize(
    "obj",
    [
        [1],
        {"type": "x"},
        {"id": "", "type": "x"},
        {"id": "a" * 129, "type": "x"},
        {"id": 3, "type": "x"},
        {"id": "a", "type": None},
        {"id": "a", "type": "x", "body": [1]},
        {"id": "a", "type": "x", "v": "1"},
    ],
)
def test_invalid_envelopes_are_bad_requests(obj: object) -> None:
    with pytest.raises(ProtocolError) as error:
        decode_request(msgpack.packb(obj))
    assert error.value.code == "bad_request"


def test_truncated_and_oversized_frames() -> None:
    frame = msgpack.packb({"id": "a", "type": "x", "body": {"s": "y" * 100}})
    with pytest.raises(ProtocolError) as truncated:
        decode_request(frame[:-10])
    assert truncated.value.code == "bad_request"
    with pytest.raises(ProtocolError) as oversized:
        decode_request(frame, max_bytes=50)
    assert oversized.value.code == "too_large" and "MiB" in oversized.value.message


def test_request_id_of_recovers_the_id_of_an_invalid_request() -> None:
    assert protocol.request_id_of(msgpack.packb({"id": "abc", "type": 5})) == "abc"
    assert protocol.request_id_of(b"\xc1") is None


def test_field_of_checks_types_and_rejects_booleans_for_numbers() -> None:
    body = {"n": 3, "flag": True, "s": "x"}
    assert field_of(body, "n", int) == 3
    assert field_of(body, "missing", int, 7) == 7
    for name, kind in (("flag", int), ("s", int), ("missing", str)):
        with pytest.raises(ProtocolError):
            field_of(body, name, kind)


def test_events_round_trip_and_junk_is_skipped() -> None:
    event = protocol.Event("tok", "e1", 5, {"text": "hi"})
    assert decode_event(event.frames()) == event
    assert decode_event([b"tok"]) is None
    assert decode_event([b"tok", b"\xc1"]) is None


def test_unknown_error_codes_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ProtocolError("nonsense", "x")
