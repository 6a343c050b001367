"""Every benchmark runs once, briefly, and reports numbers, so none can rot. Speed is not checked here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_benchmark_completes_and_reports_numbers() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-write"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(block) for block in re.findall(r"^\{\n.*?^\}$", result.stdout, re.S | re.M)]
    assert [r["name"] for r in reports] == ["streaming through the daemon", "resume a conversation",
                                            "model switch and daemon footprint", "telemetry sampler CPU at 2 Hz"]
    for report in reports:
        numbers = [v for v in report.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert numbers and all(v == v and v >= 0 for v in numbers), report  # present, not NaN, not negative
