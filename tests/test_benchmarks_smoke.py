"""Every benchmark runs once, briefly, and reports numbers, so none can rot. Speed is not checked here."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import BENCHMARKS, section  # noqa: E402


@pytest.mark.timeout(900)  # every benchmark once: about 130 s on 2 idle cores, and they keep coming
def test_every_benchmark_completes_and_reports_numbers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-write"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    reports = [json.loads(block) for block in re.findall(r"^\{\n.*?^\}$", result.stdout, re.S | re.M)]
    assert len(reports) == len(BENCHMARKS)
    for report in reports:
        assert "error" not in report, report
        numbers = [v for v in report.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert numbers and all(math.isfinite(v) for v in numbers), report  # present, not NaN (deltas may be negative)
        for goal in report.get("targets", []):
            assert goal["met"] or goal["why"], goal  # every miss is explained
        assert "### " in section(report)


def test_a_miss_is_written_with_its_target_and_reason() -> None:
    text = section(
        {
            "name": "x",
            "settings": {"model": "m"},
            "ratio": 0.5,
            "targets": [{"figure": "ratio", "target": ">= 0.99", "met": False, "why": "because"}],
        }
    )
    assert "| ratio | 0.500 | >= 0.99 | no |" in text
    assert "**Missed** ratio = 0.500 (target >= 0.99): because." in text
