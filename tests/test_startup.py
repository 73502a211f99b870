"""Starting the server as a user does: ``make run`` says where it really
listens and keeps its dev secrets private; a server that cannot start says
why in one line naming the key to change, and exits non-zero."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import trustme

from support import SECRET, free_port
from tillwire.server.config import NON_CONFIG_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent


def outside_env() -> dict:
    """This environment without its Tillwire configuration variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("TILLWIRE_") or k in NON_CONFIG_ENV}


def serve(tmp_path, *args, env=None, timeout=60):
    """``tillwire serve`` on free ports in ``tmp_path``; it must exit by itself."""
    run_env = outside_env()
    run_env.update({"TILLWIRE_SECRET": SECRET, **(env or {})})
    cmd = [sys.executable, "-m", "tillwire", "serve", "--host", "127.0.0.1", *args]
    if "--data-dir" not in args:
        cmd += ["--data-dir", str(tmp_path / "data")]
    if "--port" not in args:
        cmd += ["--port", str(free_port())]
    if "--admin-port" not in args:
        cmd += ["--admin-port", "0"]
    return subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def last_line(result) -> str:
    """The one line an operator reads: stderr's last, and no traceback before it."""
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@contextlib.contextmanager
def taken_port():
    """A loopback port something else listens on, for as long as the ``with``."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_port_in_use_is_one_line_naming_the_key(tmp_path):
    with taken_port() as port:
        result = serve(tmp_path, "--port", str(port))
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("tillwire: cannot start: server.port:"), line
    assert f"127.0.0.1:{port} is already in use" in line
    assert "--port" in line and "TILLWIRE_SERVER_PORT" in line
    assert not (tmp_path / "data" / "tillwire.db").exists()     # nothing opened first


def test_admin_port_in_use_names_admin_port(tmp_path):
    with taken_port() as port:
        result = serve(tmp_path, "--admin-port", str(port))
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("tillwire: cannot start: admin.port:"), line
    assert "already in use" in line and "--admin-port" in line


def test_unusable_data_dir_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    result = serve(tmp_path, "--data-dir", str(tmp_path / "a-file" / "data"))
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("tillwire: cannot start: server.data_dir:"), line
    assert "Not a directory" in line and "--data-dir" in line


def test_unusable_tls_files_name_the_file_and_key(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "junk.pem").write_text("this is not PEM\n")
    cases = [
        ({"TILLWIRE_TLS_CERT": str(tmp_path / "junk.pem"),
          "TILLWIRE_TLS_KEY": str(tmp_path / "server.key")}, "tls.cert:", "holds no PEM certificate"),
        ({"TILLWIRE_TLS_CERT": str(tmp_path / "server.pem"),
          "TILLWIRE_TLS_KEY": str(tmp_path / "junk.pem")}, "tls.key:", "holds no PEM private key"),
        ({"TILLWIRE_TLS_CERT": str(tmp_path / "server.pem"),
          "TILLWIRE_TLS_KEY": str(tmp_path / "other.key")}, "tls.key:", "is not the private key of"),
    ]
    for env, key, why in cases:
        result = serve(tmp_path, env=env)
        assert result.returncode == 1, result.stderr
        line = last_line(result)
        assert line.startswith(f"tillwire: cannot start: {key}"), line
        assert why in line, line


def test_bad_config_still_names_the_key_with_exit_2(tmp_path):
    result = serve(tmp_path, env={"TILLWIRE_SERVER_BACKLOG": "many"})
    assert result.returncode == 2
    line = last_line(result)
    assert line.startswith("tillwire: config error: server.backlog (TILLWIRE_SERVER_BACKLOG)"), line


@pytest.mark.slow
def test_make_run_prints_the_real_ports_and_keeps_dev_secrets_private(tmp_path):
    port, admin_port = free_port(), free_port()
    env = outside_env()
    env.update({"TILLWIRE_SERVER_PORT": str(port), "TILLWIRE_ADMIN_PORT": str(admin_port)})
    data = tmp_path / "data"
    # The venv this test runs in is the one `make run` uses.
    proc = subprocess.Popen(["make", "-s", "run", f"DATA={data}", f"VENV={sys.prefix}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "ready: terminals on" in line:
                break
        banner = seen[-1] if seen else ""
        assert f"ready: terminals on 127.0.0.1:{port}," in banner, "".join(seen)
        assert f"admin API on http://127.0.0.1:{admin_port}" in banner
        assert not any(":7070" in s or ":7071" in s for s in seen), "".join(seen)
        for name in ("dev-secret", "dev-admin-token"):
            mode = stat.S_IMODE((data / name).stat().st_mode)
            assert mode == 0o600, f"{name} is {oct(mode)}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_store_newer_than_this_version_is_one_line(tmp_path):
    """A downgrade without restoring the backup taken before the upgrade
    (docs/upgrading.md): refused in one line, the database untouched."""
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "tillwire.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '999')")
    db.commit()
    db.close()
    result = serve(tmp_path)
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("tillwire: cannot start: server.data_dir:"), line
    assert "schema version 999 is newer than this Tillwire's" in line
