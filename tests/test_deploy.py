"""The operator kit in deploy/ and the operations docs, checked against the
code they describe: the example config through the real loader, the systemd
unit against the drain timeout and the descriptor reserve (and
``systemd-analyze verify`` where it exists), the Grafana dashboard against a
real server's /metrics, and the README's restore steps run as written."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import tillwire.client
from support import ServerProcess, aiotest, connect, free_port, token
from tillwire.server.config import describe_keys, load_config
from tillwire.server.limits import FD_RESERVE
from tillwire.server.main import DRAIN_TIMEOUT
from tillwire.server.node import STOP_GRACE

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
README = (ROOT / "README.md").read_text()

STOP_MARGIN = 20
"""Seconds the unit gives the server after the drain timeout (the last writes)."""


def toml_sections(text: str) -> dict[str, list[str]]:
    """Lines of each ``[section]`` of a TOML text (comments kept)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        header = re.fullmatch(r"\[([a-z_]+)\]", line.strip())
        if header:
            current = header.group(1)
            sections.setdefault(current, [])
        else:
            sections.setdefault(current, []).append(line)
    return sections


def test_example_config_has_every_key_with_its_comment_and_loads():
    path = DEPLOY / "tillwire.toml"
    cfg = load_config(str(path), env={})       # the real loader: no unknown or bad key
    assert cfg.server.data_dir == "/var/lib/tillwire"
    assert cfg.auth.secret == ""                 # secrets stay out of the file
    fleet = load_config(str(path), env={"TILLWIRE_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert fleet.store.backend == "redis"        # the file pins nothing a fleet changes
    sections = toml_sections(path.read_text())
    missing = []
    for key, env, _default, doc in describe_keys():
        section, name = key.split(".", 1)
        lines = sections.get(section, [])
        table = f"# [[{key}]]"
        # Set, or shown commented out where setting it would pin a default that
        # depends on other keys (store.backend follows redis.url).
        at = next((i for i, line in enumerate(lines)
                   if line.startswith((f"{name} = ", f"# {name} = ")) or line == table), None)
        if at is None:
            missing.append(f"{key}: {doc}")
            continue
        # The comment block above it names the key's variable (and says what it does).
        above = []
        for line in reversed(lines[:at]):
            if not line.startswith("#"):
                break
            above.append(line)
        assert any(env in line for line in above), f"{key}: no comment naming {env} above it"
    assert not missing, "deploy/tillwire.toml lacks:\n" + "\n".join(missing)


def unit_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def test_systemd_unit_matches_the_drain_timeout_and_the_descriptor_reserve(tmp_path):
    text = (DEPLOY / "tillwire.service").read_text()
    unit = unit_values(text)
    stop = float(unit["TimeoutStopSec"])
    assert stop == DRAIN_TIMEOUT + STOP_MARGIN
    assert stop > DRAIN_TIMEOUT + STOP_GRACE               # the drain, then the stop's own grace
    assert f"TimeoutStopSec={stop:g}" in README            # (the README's drain section says it)
    nofile = int(unit["LimitNOFILE"])
    assert nofile > FD_RESERVE
    assert f"LimitNOFILE={nofile}" in README
    assert f"{nofile - FD_RESERVE:,} terminals" in README   # the sizing the README promises
    assert unit["KillSignal"] == "SIGTERM" and unit["KillMode"] == "mixed"
    assert unit["Restart"] == "on-failure"
    assert "serve --config /etc/tillwire/tillwire.toml" in unit["ExecStart"]
    assert load_config(str(DEPLOY / "tillwire.toml"), env={}).server.data_dir == \
        "/var/lib/" + unit["StateDirectory"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return                                              # parsed and checked above
    # Verified as installed, with ExecStart pointing at this checkout's tillwire.
    local = tmp_path / "tillwire.service"
    local.write_text(text.replace("/opt/tillwire/.venv/bin/tillwire",
                                  os.path.join(sys.prefix, "bin", "tillwire")))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if "tillwire.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def exported_labels(text: str) -> dict[str, set[str]]:
    """The label names each series name shows in a /metrics text."""
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" in line:
            name, rest = line.split("{", 1)
            labels.setdefault(name, set()).update(re.findall(r'(\w+)="', rest.split("}", 1)[0]))
    return labels


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics text can show (histogram parts included)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{part}" for part in ("_bucket", "_sum", "_count"))
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.mark.slow
def test_every_dashboard_query_names_a_metric_the_server_exports(tmp_path):
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(graphs) >= 12 and all(p.get("targets") for p in graphs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    admin_port = free_port()
    with ServerProcess(str(tmp_path / "srv"), admin_port=admin_port,
                       env={"TILLWIRE_ADMIN_TOKEN": "dash-token"}) as server:
        assert server.proc.poll() is None
        # One refused publish: the refusal and admin-request series get their labels.
        bad = urllib.request.Request(
            f"http://127.0.0.1:{admin_port}/v1/publish", method="POST",
            data=json.dumps({"to": "store:acme/s1", "kind": "price.update", "body": {}}).encode(),
            headers={"Authorization": "Bearer dash-token", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 400
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    exported, labels = exported_names(text), exported_labels(text)
    used = set()
    for expr in exprs:
        names = set(re.findall(r"\btillwire_[a-z0-9_]+", expr))
        assert names, f"a query names no tillwire metric: {expr}"
        used |= names
        # Every label it groups by is one those metrics carry (as far as their
        # series exist yet: a labelled counter shows none before its first count).
        if not any(n in labels for n in names):
            continue
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert any(label in labels.get(n, set()) for n in names), \
                    f"{expr}: no metric of it has the label {label!r}"
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries metrics the server does not export: {unknown}"


def restore_command() -> str:
    """The restore command of the README's "Backup and restore" section."""
    section = README.split("### Backup and restore", 1)[1].split("\n### ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 1 and "tillwire restore" in commands[0], commands
    return commands[0]


def run_as_written(command: str, backup: pathlib.Path, data: pathlib.Path):
    """The README's command with this test's paths in place of the example's."""
    command = command.replace(".venv/bin/tillwire", os.path.join(sys.prefix, "bin", "tillwire"))
    command = re.sub(r"--from \S+", f"--from {backup}", command)
    command = re.sub(r"--data-dir \S+", f"--data-dir {data}", command)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLWIRE_")}
    return subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


async def paid(to: str, n: int, sender) -> None:
    await sender.send("payment.result", {"order": f"o{n}", "status": "paid"}, to, ref=n)


@pytest.mark.slow
@aiotest(timeout=180)
async def test_backup_then_the_readmes_restore_serves_the_restored_data(tmp_path):
    data = tmp_path / "data"
    backup = tmp_path / "backups" / "tillwire-backup.db"
    backup.parent.mkdir()
    state = str(tmp_path / "till2.json")
    server = ServerProcess(str(data)).start()
    try:
        payer = await connect(server.addr, "pay", store="hq", roles=("backend",))
        await (await connect(server.addr, "till1")).close()   # (a till the server knows)
        await asyncio.sleep(0.3)                            # (its registration is written)
        for n in (1, 2, 3):
            await paid("terminal:acme/till1", n, payer)      # till1 is offline: kept
        till2 = await tillwire.client.connect(*server.addr, token=token("till2"),
                                              state_path=state)
        for n in (11, 12):
            await paid("terminal:acme/till2", n, payer)
        for _ in range(2):
            await (await till2.receive(timeout=5)).ack()
        await till2.close()
        await asyncio.sleep(0.3)                            # (the acks are written)
        took = subprocess.run([sys.executable, "-m", "tillwire", "backup", "--data-dir",
                               str(data), "--out", str(backup)],
                              capture_output=True, text=True, timeout=60)
        assert took.returncode == 0, took.stderr
        # After the backup: more for till1, and till2 processes two more.
        await paid("terminal:acme/till1", 4, payer)
        till2 = await tillwire.client.connect(*server.addr, token=token("till2"),
                                              state_path=state)
        for n in (13, 14):
            await paid("terminal:acme/till2", n, payer)
        for _ in range(2):
            await (await till2.receive(timeout=5)).ack()
        await till2.close()
        await payer.close()
        # Refused while the server has the database open.
        busy = run_as_written(restore_command(), backup, data)
        assert busy.returncode == 1 and "stop the server first" in busy.stderr, busy.stderr
    finally:
        server.stop()
    restored = run_as_written(restore_command(), backup, data)
    assert restored.returncode == 0, restored.stderr
    kept = [p for p in data.iterdir() if p.name.startswith("before-restore-")]
    assert len(kept) == 1 and (kept[0] / "tillwire.db").exists()   # the old one set aside
    server = ServerProcess(str(data)).start()
    try:
        till1 = await connect(server.addr, "till1")
        got = []
        for _ in range(3):
            msg = await till1.receive(timeout=5)
            got.append(msg.body["order"])
            till1.ack(msg.lane, msg.seq)
        assert got == ["o1", "o2", "o3"]                    # o4 came after the backup
        with pytest.raises(asyncio.TimeoutError):
            await till1.receive(timeout=0.5)
        # till2 had processed further than the backup: the new epoch makes it
        # start over instead of skipping what the restored store hands out.
        payer = await connect(server.addr, "pay", store="hq", roles=("backend",))
        till2 = await tillwire.client.connect(*server.addr, token=token("till2"),
                                              state_path=state)
        await paid("terminal:acme/till2", 15, payer)
        msg = await till2.receive(timeout=5)
        assert msg.body["order"] == "o15"
        await msg.ack()
        await till2.close()
    finally:
        server.stop()


def test_license_and_upgrade_notes_are_where_the_readme_and_pyproject_say():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    upgrading = (ROOT / "docs" / "upgrading.md").read_text()
    assert "docs/upgrading.md" in README
    assert "tillwire backup" in upgrading and "Going back" in upgrading


def test_restore_refuses_what_it_cannot_restore_and_touches_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tillwire.db").write_bytes(b"the live database")
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLWIRE_")}
    cmd = [sys.executable, "-m", "tillwire", "restore", "--from", str(junk), "--data-dir",
           str(data)]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "restore failed" in bad.stderr, bad.stderr
    assert (data / "tillwire.db").read_bytes() == b"the live database"
    assert not [p for p in data.iterdir() if p.name.startswith("before-restore-")]
    fleet = subprocess.run(cmd, env={**env, "TILLWIRE_REDIS_URL": "redis://127.0.0.1:6379/0"},
                           capture_output=True, text=True, timeout=60)
    assert fleet.returncode == 2 and "store.backend is redis" in fleet.stderr, fleet.stderr
