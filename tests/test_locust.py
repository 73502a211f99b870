"""The Locust scenarios run against a real server (a short headless run)."""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from support import SECRET, ServerProcess

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_locust_holiday_scenarios_run_headless(tmp_path):
    with ServerProcess(str(tmp_path / "srv")) as server:
        env = {**os.environ, "TILLWIRE_SECRET": SECRET, "TW_TILLS": "30", "TW_STORES": "3"}
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
             "--headless", "-u", "24", "-r", "24", "-t", "8s", "--only-summary",
             "--host", f"tcp://127.0.0.1:{server.port}", "--csv", str(tmp_path / "run")],
            cwd=ROOT, env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        with open(tmp_path / "run_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
        for name in ("connect", "send payment.result", "send price.update"):
            assert int(rows[name]["Request Count"]) > 0, name
            assert int(rows[name]["Failure Count"]) == 0, name
        assert int(rows["payment.result"]["Request Count"]) > 0      # arrived at tills
