"""docs/protocol.md documents exactly the request types, topics and error codes of the code."""

from __future__ import annotations

import re
from pathlib import Path

from vramchat.shared import protocol

DOC = Path(__file__).parent.parent / "docs" / "protocol.md"


def documented(section: str) -> set[str]:
    text = DOC.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return set(re.findall(r"^### `([^`]+)`$", text[start : end if end != -1 else None], re.MULTILINE))


def test_every_request_type_is_documented() -> None:
    assert documented("Request types") == set(protocol.REQUEST_TYPES)


def test_every_event_topic_is_documented() -> None:
    assert documented("Event topics") == set(protocol.EVENT_TOPICS)


def test_every_error_code_is_documented() -> None:
    assert documented("Error codes") == set(protocol.ERROR_CODES)


def test_the_documented_version_is_the_code_version() -> None:
    assert DOC.read_text().splitlines()[0].endswith(f"version {protocol.PROTOCOL_VERSION}")
