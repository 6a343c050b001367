"""Byte sizes and durations as people write and read them: "11.5GiB" in, "11.50 GiB" out; "5m"."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse "11.5GiB", "512MiB", "12GB", "1e9" or a plain byte count."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write it like 11.5GiB, 512MiB, 12GB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | None) -> str:
    """ "11.50 GiB", "512.0 MiB", "N/A" for an unknown value."""
    if n is None:
        return "N/A"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 1024**3:
        return f"{sign}{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{sign}{n / 1024**2:.1f} MiB"
    if n >= 1024:
        return f"{sign}{n / 1024:.1f} KiB"
    return f"{sign}{n} B"


def format_count(n: int) -> str:
    """A parameter count as model cards write it: "135M", "1.7B", "70B", "172K"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(n)


_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | int | float) -> float | None:
    """Seconds from "30s", "5m", "1h30m", "250ms" or a plain number of seconds, as Ollama's
    keep_alive takes them; a negative one means "never" (None)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{value!r} is not a duration; write it like 30s, 5m, 1h or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        negative = text.startswith("-")
        body = text.lstrip("-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION_PART.findall(body)
            if not body or "".join(number + unit for number, unit in parts) != body:
                raise ValueError(f"{value!r} is not a duration; write it like 30s, 5m, 1h or a number of seconds") from None
            seconds = sum(float(number) * _SECONDS[unit] for number, unit in parts)
        seconds = -seconds if negative else seconds
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a duration; write it like 30s, 5m, 1h or a number of seconds")
    return None if seconds < 0 else seconds


def format_duration(seconds: float) -> str:
    """ "5m", "1h 30m", "45s", "0.5s"."""
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{rest}s" if rest else ""]
    return " ".join(part for part in parts if part)
