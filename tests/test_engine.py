"""Pieces of the engine that need no model."""

from __future__ import annotations

from vramchat.daemon.llama.chat_model import StopFilter


def test_stop_filter_cuts_at_a_stop_string_split_over_tokens() -> None:
    stops = StopFilter(["<|im_end|>"])
    out = []
    for piece in ["Par", "is.", "<|im", "_e", "nd|>", "never"]:
        text, stopped = stops.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Paris." and stopped


def test_stop_filter_releases_a_false_alarm() -> None:
    stops = StopFilter(["<|im_end|>"])
    assert stops.feed("a <|i") == ("a ", False)
    assert stops.feed("s fine") == ("<|is fine", False)
    assert stops.flush() == ""


def test_stop_filter_without_stops_passes_everything() -> None:
    stops = StopFilter([])
    assert stops.feed("abc") == ("abc", False)
