"""Wire protocol v1: message envelopes, framing, error codes.

Two sockets (see docs/protocol.md, which a test keeps in step with this module):

- control: the daemon's ROUTER and each client's DEALER. A request is one msgpack frame
  ``{"v": 1, "id": str, "type": str, "body": {...}}``. The reply is one frame
  ``{"v": 1, "id": same, "ok": true, "body": {...}}`` or
  ``{"v": 1, "id": same, "ok": false, "error": {"code": str, "message": str}}``.
- events: the daemon's XPUB and each client's SUB. An event is two frames, the topic as bytes and
  ``{"topic": str, "epoch": str, "seq": int, "body": {...}}``. ``seq`` increases by exactly one per
  event within an epoch, over all topics, so a subscriber to every topic can detect a gap.

Unknown fields are ignored everywhere, so either side may add fields without a version bump.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# The daemon's own check on a control request. Above it a request gets a `too_large` error.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# The sampling settings a chat, a regenerate or a conversation may carry, and their kind of
# number (a float field also takes a whole number on the wire).
SAMPLING_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "max_tokens": int,
    "seed": int,
}
# What a conversation does once it is longer than the context window (its `context_overflow`
# setting): leave its oldest messages out of the model's view (never out of the store), or fail.
CONTEXT_OVERFLOW_POLICIES = ("drop_oldest", "error")
# ZMQ's MAXMSGSIZE on the daemon's sockets: a peer that sends more is disconnected by libzmq
# before the bytes reach Python. It sits well above MAX_REQUEST_BYTES so that an oversized but
# sane request still gets a clear error reply instead of a silent disconnect.
ZMQ_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CONTROL_SOCKET = "control.sock"
EVENTS_SOCKET = "events.sock"

# --- request types --------------------------------------------------------------------------
# Each maps to the body fields it reads; docs/protocol.md documents them one by one.
REQUEST_TYPES: dict[str, str] = {
    "hello": "version handshake; the first request of every client",
    "snapshot": "full state for a late joiner (Clone pattern)",
    "status": "daemon, model, queue and latest telemetry",
    "models": "the GGUF models the daemon can load",
    "load": "start a fresh engine with a model; loads run one after another, in the order they came",
    "unload": "stop the engine and give its memory back; the next request loads the model again",
    "chat": "append a user message to a conversation and queue a reply",
    "regenerate": "queue a new version of a reply (by default the last); the earlier one stays stored",
    "edit": "store a new version of a question, make its branch current and queue a reply",
    "cancel": "stop a queued or running generation",
    "conversation.create": "create a conversation",
    "conversation.list": "list conversations, newest first",
    "conversation.get": "one conversation with its messages",
    "conversation.update": "rename, or set the system prompt or sampling settings",
    "conversation.delete": "delete a conversation and its messages",
    "conversation.switch": "make current the version (branch) through a message",
    "conversation.search": "full-text search over every message of every conversation, earlier versions included",
    "pull": "queue a download of a quantization from the Hugging Face Hub into its cache",
    "pull.cancel": "stop a download, queued or running, and remove its partial files",
}

# --- event topics ---------------------------------------------------------------------------
EVENT_TOPICS: dict[str, str] = {
    "tok": "text of one or more tokens of a reply, as they are produced (those within 15 ms share one event)",
    "msg": "a message was created, or changed status (generating, complete, ...)",
    "conversation": "a conversation was created, updated, deleted, or switched to another version",
    "model": "model state: loading progress, ready with its split, failed, engine crashed",
    "queue": "the generation queue changed",
    "telemetry": "a memory and speed sample",
    "alarm": "a memory condition a person should act on",
    "clients": "the number of attached subscribers changed",
    "download": "a pull from the Hub changed state or moved bytes: its progress, rate and time left",
}

# --- error codes: stable strings, safe for clients to branch on ---------------------------------
ERROR_CODES: dict[str, str] = {
    "bad_request": "the frame is not a valid request envelope, or a body field has a wrong type",
    "unknown_type": "the request type is not one this daemon knows",
    "too_large": "the request is larger than the daemon accepts",
    "protocol_mismatch": "the client speaks a protocol version the daemon does not",
    "not_found": "no such conversation, message, request or model",
    "invalid_value": "a field has a value outside what is allowed (n_gpu_layers, n_ctx, ...)",
    "not_gguf": "the file is missing, unreadable, or not a GGUF model",
    "load_failed": "the engine could not load the model",
    "no_model": "no model is loaded and none is loading",
    "prompt_too_long": "the conversation does not fit the context window",
    "queue_full": "too many requests are queued",
    "rate_limited": "the client sends requests faster than allowed",
    "would_swap": "the load would push the system into swap; retry with force to override",
    "busy": "the operation cannot run now (the conversation has a reply queued or generating)",
    "storage": "the conversation store failed (disk full, locked or damaged); nothing stored was lost",
    "hub": "the Hugging Face Hub refused the request or could not be reached",
    "no_space": "the disk under the hub cache has no room for what a pull has left to fetch",
    "internal": "a bug in the daemon; the daemon stays up",
}


class ProtocolError(Exception):
    """An error that travels to the client as ``{"code", "message"}``."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, max_bytes: int | None = None) -> Any:
    """Decode one msgpack frame; raises ProtocolError(bad_request) on anything malformed."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(
            "too_large",
            f"the request is {len(data) / 1048576:.1f} MiB; the daemon accepts at most "
            f"{max_bytes / 1048576:.0f} MiB. Send a shorter prompt.",
        )
    try:
        return msgpack.unpackb(data, raw=False)
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            "invalid_value", f"a string in the request is not valid UTF-8 (byte {exc.start} of it); send UTF-8 text"
        ) from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("bad_request", f"not a msgpack frame: {exc}") from None


def refuse_invalid_text(value: Any, where: str) -> None:
    """Raise invalid_value if any string in `value` (keys included) is not valid Unicode.

    JSON's escapes can carry a lone surrogate ("\\ud800"), which Python keeps in a str but which
    no UTF-8 encoder takes: it could be neither stored, nor sent to the engine, nor tokenized.
    `where` names the value in the message, e.g. "the body".
    """
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ProtocolError(
                    "invalid_value",
                    f"{where} holds text that is not valid Unicode (a lone surrogate, U+{ord(value[exc.start]):04X}, "
                    f"at character {exc.start}); send UTF-8 text",
                ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_invalid_text(key, f"a field name in {where}")
            refuse_invalid_text(item, f"{where}.{key}" if isinstance(key, str) and key.isascii() else where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_invalid_text(item, f"{where}[{index}]")


@dataclass(frozen=True)
class Request:
    id: str
    type: str
    body: dict[str, Any]
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return pack({"v": self.version, "id": self.id, "type": self.type, "body": self.body})


def decode_request(data: bytes, *, max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """Parse and validate a control frame. The error names what is wrong with it."""
    obj = unpack(data, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a request must be a msgpack map with v, id, type, body")
    request_id = obj.get("id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise ProtocolError("bad_request", "request field 'id' must be a non-empty string (max 128)")
    version = obj.get("v", PROTOCOL_VERSION)
    if not isinstance(version, int):
        raise ProtocolError("bad_request", "request field 'v' must be an integer")
    request_type = obj.get("type")
    if not isinstance(request_type, str):
        raise ProtocolError("bad_request", "request field 'type' must be a string")
    body = obj.get("body", {})
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "request field 'body' must be a map")
    return Request(id=request_id, type=request_type, body=body, version=version)


def request_id_of(data: bytes) -> str | None:
    """Best-effort id of a frame that failed validation, so the error reply can name it."""
    try:
        obj = msgpack.unpackb(data, raw=False, unicode_errors="replace")
    except Exception:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return obj["id"][:128]
    return None


def encode_reply(request_id: str | None, body: dict[str, Any]) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "body": body})


def encode_error(request_id: str | None, error: ProtocolError) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()})


@dataclass(frozen=True)
class Event:
    topic: str
    epoch: str
    seq: int
    body: dict[str, Any] = field(default_factory=dict)

    def frames(self) -> list[bytes]:
        return [
            self.topic.encode(),
            pack({"topic": self.topic, "epoch": self.epoch, "seq": self.seq, "body": self.body}),
        ]


def decode_event(frames: list[bytes]) -> Event | None:
    """Parse an event; None for a frame that is not one (clients skip those)."""
    if len(frames) != 2:
        return None
    try:
        obj = msgpack.unpackb(frames[1], raw=False)
        return Event(topic=obj["topic"], epoch=obj["epoch"], seq=int(obj["seq"]), body=obj.get("body") or {})
    except Exception:
        return None


# --- body field helpers used by the daemon's handlers -----------------------------------------


def field_of(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Read a body field, checking its type; raises bad_request naming the field."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ProtocolError("bad_request", f"missing field '{name}'")
        return default
    value = body[name]
    # bool is an int in Python; a boolean where a number is expected is a client bug.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError("bad_request", f"field '{name}' must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ProtocolError("bad_request", f"field '{name}' must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "a map", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
