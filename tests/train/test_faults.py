"""benchmarks/faults.py on a few kills (the full 20 are a benchmark): every killed run resumes and
ends with the straight run's weights, bit for bit, losing at most one checkpoint interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_runs_killed_at_random_moments_resume_to_identical_weights(tmp_path):
    report = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--kills", "3", "--steps", "16",
                           "--json", str(report), "--seed", "1"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(report.read_text())
    assert {r["kind"] for r in records} == {"write", "step", "start"}
    assert all(r["resumed_ok"] and r["identical"] and r["lost"] <= 4 for r in records if r["killed"])
