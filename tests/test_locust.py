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


@pytest.mark.slow
def test_holiday_shape_honours_run_time_and_ends_by_itself(tmp_path):
    """LOAD_SHAPE=holiday with -t 12s: the whole ramp in 12 s, then the run
    ends with exit 0 (Locust itself ignores -t for a shape)."""
    with ServerProcess(str(tmp_path / "srv")) as server:
        env = {**os.environ, "TILLWIRE_SECRET": SECRET, "TW_TILLS": "100", "TW_STORES": "3",
               "LOAD_SHAPE": "holiday", "TW_NORMAL_USERS": "2", "TW_TICKET_EVERY": "2",
               "TILLWIRE_SERVER_PORT": str(server.port)}      # no --host: the config's port
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
             "--headless", "-t", "12s", "--only-summary", "--csv", str(tmp_path / "run")],
            cwd=ROOT, env=env, capture_output=True, timeout=120)    # (180 s of stages unsqueezed)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        assert "Shape test stopping" in proc.stderr.decode()          # it ended by itself
        with open(tmp_path / "run_stats.csv") as f:
            rows = {r["Name"]: r for r in csv.DictReader(f)}
        for name in ("connect", "send payment.result", "payment.result", "ticket.open"):
            assert int(rows[name]["Request Count"]) > 0, name
            assert int(rows[name]["Failure Count"]) == 0, name


def test_make_load_installs_locust_and_runs_the_documented_scenarios():
    """`make load` is the documented command: it installs the load extra
    (locust) and runs bench/locustfile.py (a dry run of make shows both)."""
    plan = subprocess.run(["make", "-n", "load", f"VENV={sys.prefix}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert plan.returncode == 0, plan.stderr
    text = plan.stdout
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'load = [\n    "locust' in pyproject
    if not (pathlib.Path(sys.prefix) / ".installed-load").exists():
        assert '-e ".[load]"' in text
    assert "bin/locust -f bench/locustfile.py --headless" in text
    readme = (ROOT / "README.md").read_text()
    assert "make load" in readme
