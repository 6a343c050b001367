"""Durations as people write them (keep_alive), and the config key that takes one."""

from __future__ import annotations

import math

import pytest

from vramchat.shared.config import Config, ConfigError
from vramchat.shared.units import format_duration, parse_duration


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("90", 90), (45, 45), (2.5, 2.5), ("0", 0), ("1d", 86400)],
)
def test_durations_parse_as_ollama_writes_them(written: str | int | float, seconds: float) -> None:
    assert parse_duration(written) == pytest.approx(seconds)


@pytest.mark.parametrize("never", ["-1", -1, "-5m"])
def test_a_negative_duration_means_never(never: str | int) -> None:
    assert parse_duration(never) is None


@pytest.mark.parametrize("wrong", ["", "5 minutes", "m", "5x", "1h 30m", "nan", "inf", True, [5], math.nan])
def test_what_is_not_a_duration_says_how_to_write_one(wrong: object) -> None:
    with pytest.raises(ValueError, match="write it like 30s, 5m, 1h"):
        parse_duration(wrong)  # type: ignore[arg-type]


def test_durations_read_back_as_written() -> None:
    assert [format_duration(s) for s in (0.5, 45, 300, 5400, 3601)] == ["0.5s", "45s", "5m", "1h 30m", "1h 1s"]


def test_keep_alive_in_the_config() -> None:
    assert Config.from_mapping({}).keep_alive_s is None
    assert Config.from_mapping({"keep_alive": "30m"}).keep_alive_s == 1800
    with pytest.raises(ConfigError, match="keep_alive"):
        Config.from_mapping({"keep_alive": "soon"})
