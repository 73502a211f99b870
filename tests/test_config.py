"""Configuration loader (server/config.py) and the `tillwire config` command.

Every test passes an explicit ``env`` mapping (or a cleaned process
environment), so the developer's own TILLWIRE_* variables never leak in.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tillwire.core.codes import MAX_FRAME_SIZE_LIMIT
from tillwire.core.errors import ConfigError
from tillwire.server import cli
from tillwire.server.config import (
    NON_CONFIG_ENV,
    AdminToken,
    AuthConfig,
    Config,
    ServerConfig,
    audit_log_path,
    describe_keys,
    load_config,
    node_id,
    parse_duration,
    parse_size,
    role_value,
    tenant_value,
)

ALL_KEYS = [row[0] for row in describe_keys()]
ENV_OF = {row[0]: row[1] for row in describe_keys()}


def toml_file(tmp_path, text: str) -> str:
    path = tmp_path / "tillwire.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def toml_value(value) -> str:
    """A Python value as a TOML literal (enough for these tests)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def set_in_file(tmp_path, dotted: str, value) -> str:
    section, name = dotted.split(".")
    return toml_file(tmp_path, f"[{section}]\n{name} = {toml_value(value)}\n")


# --------------------------------------------------------------------------
# Defaults and the key table


def test_defaults_without_any_source():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 7070
    assert cfg.server.max_frame_size == 1 << 20
    assert cfg.auth.secret == "" and cfg.auth.clock_skew == 300.0 and cfg.auth.default_ttl == 86400.0
    assert (cfg.heartbeat.min, cfg.heartbeat.interval, cfg.heartbeat.max) == (5.0, 30.0, 600.0)
    assert cfg.lanes.weights == (8, 4, 1)
    assert cfg.delivery.p0_ttl == 604800.0 and cfg.delivery.ack_batch_ms == 2.0
    assert cfg.store.backend == "sqlite" and cfg.store.synchronous == "FULL"
    assert cfg.admin.port == 7071 and cfg.admin.tokens == ()
    assert cfg.log.level == "info" and cfg.log.format == "kv"
    assert cfg.redis.url == "" and cfg.redis.prefix == "tw"
    assert cfg.tls.require_client_cert is False


def test_sections_are_frozen():
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server = ServerConfig()  # type: ignore[misc]


def test_describe_keys_covers_every_field_once():
    rows = describe_keys()
    declared = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(Config(), section.name))
    ]
    assert [row[0] for row in rows] == declared
    defaults = Config().to_dict(mask_secrets=False)
    for key, env, default, doc in rows:
        section, name = key.split(".")
        assert default == defaults[section][name], key
        assert doc and "\n" not in doc and doc.endswith("."), key
        if key == "admin.tokens":
            assert env == "TILLWIRE_ADMIN_TOKEN"
        else:
            assert env == f"TILLWIRE_{section.upper()}_{name.upper()}"


def test_node_id_configured_or_derived():
    assert node_id(load_config(env={"TILLWIRE_SERVER_NODE_ID": "edge-1"})) == "edge-1"
    derived = node_id(load_config(env={}))
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", derived)
    assert derived.endswith(f"-{os.getpid()}")


def test_audit_path_defaults_into_data_dir():
    assert audit_log_path(load_config(env={"TILLWIRE_SERVER_DATA_DIR": "/var/tw"})) == "/var/tw/audit.log"
    assert audit_log_path(load_config(env={"TILLWIRE_LOG_AUDIT_PATH": "/log/a.log"})) == "/log/a.log"


# --------------------------------------------------------------------------
# Sources and precedence


FULL_FILE = """
[server]
host = "0.0.0.0"
port = 9000
max_frame_size = "64KiB"
auth_timeout = "500ms"

[auth]
secret = "file-secret"
default_ttl = "1d"

[heartbeat]
interval = "1m"
min = 10
max = "1h"

[lanes]
weights = [5, 3, 2]

[store]
backend = "sqlite"
synchronous = "normal"
group_commit_ms = 0

[log]
level = "DEBUG"

[[admin.tokens]]
name = "ops"
token = "ops-token"
tenants = ["*"]

[[admin.tokens]]
name = "acme-support"
token = "acme-token"
tenants = ["acme", "beta"]
"""


def test_a_fleet_over_redis_keeps_its_store_there(tmp_path):
    cfg = load_config(env={"TILLWIRE_REDIS_URL": "redis://r:6379/0"})
    assert cfg.store.backend == "redis" and cfg.server.workers == 1
    cfg = load_config(env={"TILLWIRE_REDIS_URL": "redis://r:6379/0",
                           "TILLWIRE_SERVER_WORKERS": "4"})
    assert cfg.server.workers == 4
    # Each refusal names the key to change.
    cases = [
        ({"TILLWIRE_SERVER_WORKERS": "2"}, "server.workers (TILLWIRE_SERVER_WORKERS)",
         "needs redis.url"),
        ({"TILLWIRE_REDIS_URL": "redis://r:6379/0", "TILLWIRE_STORE_BACKEND": "sqlite"},
         "store.backend (TILLWIRE_STORE_BACKEND)", "redis.url is set"),
        ({"TILLWIRE_STORE_BACKEND": "redis"}, "redis.url", "store.backend is redis"),
        ({"TILLWIRE_SERVER_WORKERS": "0"}, "server.workers (TILLWIRE_SERVER_WORKERS)", "1-64"),
    ]
    for env, key, words in cases:
        with pytest.raises(ConfigError) as err:
            load_config(env=env)
        assert str(err.value).startswith(key + ":") and words in str(err.value), str(err.value)
    path = toml_file(tmp_path, '[server]\nworkers = 2\n[redis]\nurl = "redis://r:6379/1"\n')
    cfg = load_config(path, env={})
    assert (cfg.server.workers, cfg.store.backend) == (2, "redis")


def test_toml_file_values(tmp_path):
    cfg = load_config(toml_file(tmp_path, FULL_FILE), env={})
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 9000
    assert cfg.server.max_frame_size == 65536
    assert cfg.server.auth_timeout == 0.5
    assert cfg.auth.secret == "file-secret" and cfg.auth.default_ttl == 86400.0
    assert (cfg.heartbeat.min, cfg.heartbeat.interval, cfg.heartbeat.max) == (10.0, 60.0, 3600.0)
    assert isinstance(cfg.heartbeat.min, float)
    assert cfg.lanes.weights == (5, 3, 2)
    assert cfg.store.backend == "sqlite" and cfg.store.synchronous == "NORMAL"  # canonical case
    assert cfg.store.group_commit_ms == 0.0 and isinstance(cfg.store.group_commit_ms, float)
    assert cfg.log.level == "debug"
    assert cfg.admin.tokens == (
        AdminToken("ops", "ops-token", ("*",)),
        AdminToken("acme-support", "acme-token", ("acme", "beta")),
    )
    assert cfg.admin.tokens[0].allows("anyone") and cfg.admin.tokens[1].allows("beta")
    assert not cfg.admin.tokens[1].allows("gamma")
    # untouched keys keep their defaults
    assert cfg.delivery == Config().delivery


def test_env_overrides_file(tmp_path):
    path = toml_file(tmp_path, FULL_FILE)
    cfg = load_config(path, env={
        "TILLWIRE_SERVER_PORT": "9100",
        "TILLWIRE_LANES_WEIGHTS": "4, 2, 1",
        "TILLWIRE_TLS_REQUIRE_CLIENT_CERT": "no",
        "TILLWIRE_HEARTBEAT_INTERVAL": "45s",
        "TILLWIRE_SERVER_SEND_BUFFER": "128KiB",
        "TILLWIRE_DELIVERY_ACK_BATCH_MS": "0.5",
        "TILLWIRE_LOG_FORMAT": "json",
    })
    assert cfg.server.port == 9100
    assert cfg.server.host == "0.0.0.0"  # still from the file
    assert cfg.lanes.weights == (4, 2, 1)
    assert cfg.tls.require_client_cert is False
    assert cfg.heartbeat.interval == 45.0
    assert cfg.server.send_buffer == 131072
    assert cfg.delivery.ack_batch_ms == 0.5
    assert cfg.log.format == "json"


@pytest.mark.parametrize("text, expected", [
    ("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False),
])
def test_env_booleans(tmp_path, text, expected):
    ca = tmp_path / "ca.pem"
    cert = tmp_path / "cert.pem"
    key = tmp_path / "key.pem"
    for f in (ca, cert, key):
        f.write_text("x")
    cfg = load_config(env={
        "TILLWIRE_TLS_CERT": str(cert), "TILLWIRE_TLS_KEY": str(key), "TILLWIRE_TLS_CLIENT_CA": str(ca),
        "TILLWIRE_TLS_REQUIRE_CLIENT_CERT": text,
    })
    assert cfg.tls.require_client_cert is expected


def test_overrides_beat_env_and_file(tmp_path):
    path = toml_file(tmp_path, FULL_FILE)
    env = {"TILLWIRE_SERVER_PORT": "9100", "TILLWIRE_LOG_LEVEL": "warning"}
    cfg = load_config(path, env=env, overrides={
        "server.port": 7171,            # typed, like a test would pass it
        "log.level": "error",           # text, like a CLI flag
        "server.data_dir": None,        # a flag that was not given
        "heartbeat.max": "2h",
    })
    assert cfg.server.port == 7171
    assert cfg.log.level == "error"
    assert cfg.server.data_dir == "./data"
    assert cfg.heartbeat.max == 7200.0


def test_override_text_is_parsed_like_env():
    cfg = load_config(env={}, overrides={"server.port": "7272", "lanes.weights": "2,2,2"})
    assert cfg.server.port == 7272 and cfg.lanes.weights == (2, 2, 2)


def test_override_unknown_key():
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"server.prot": 1})
    assert info.value.key == "server.prot"
    assert "server.port" in str(info.value)


def test_to_dict_round_trips_through_overrides(tmp_path):
    cfg = load_config(toml_file(tmp_path, FULL_FILE), env={})
    flat = {f"{section}.{name}": value
            for section, table in cfg.to_dict(mask_secrets=False).items()
            for name, value in table.items()}
    assert load_config(env={}, overrides=flat) == cfg


def test_secret_alias():
    assert load_config(env={"TILLWIRE_SECRET": "s"}).auth.secret == "s"
    assert load_config(env={"TILLWIRE_AUTH_SECRET": "t"}).auth.secret == "t"
    same = {"TILLWIRE_SECRET": "s", "TILLWIRE_AUTH_SECRET": "s"}
    assert load_config(env=same).auth.secret == "s"
    with pytest.raises(ConfigError) as info:
        load_config(env={"TILLWIRE_SECRET": "s", "TILLWIRE_AUTH_SECRET": "t"})
    assert info.value.key == "auth.secret"


def test_secret_alias_overrides_file(tmp_path):
    path = toml_file(tmp_path, '[auth]\nsecret = "from-file"\n')
    assert load_config(path, env={}).auth.secret == "from-file"
    assert load_config(path, env={"TILLWIRE_SECRET": "from-env"}).auth.secret == "from-env"


def test_admin_token_alias_appends(tmp_path):
    path = toml_file(tmp_path, FULL_FILE)
    cfg = load_config(path, env={"TILLWIRE_ADMIN_TOKEN": "env-token"})
    assert [t.name for t in cfg.admin.tokens] == ["ops", "acme-support", "env"]
    assert cfg.admin.tokens[-1] == AdminToken("env", "env-token", ("*",))
    # empty means unset
    assert load_config(env={"TILLWIRE_ADMIN_TOKEN": ""}).admin.tokens == ()


def test_admin_tokens_not_settable_from_env():
    with pytest.raises(ConfigError) as info:
        load_config(env={"TILLWIRE_ADMIN_TOKENS": "a,b"})
    assert info.value.key == "admin.tokens"
    assert "TILLWIRE_ADMIN_TOKENS" in str(info.value)
    assert "config file" in str(info.value) and "TILLWIRE_ADMIN_TOKEN " in str(info.value)


def test_admin_token_alias_name_clash(tmp_path):
    path = toml_file(tmp_path, '[[admin.tokens]]\nname = "env"\ntoken = "a"\ntenants = ["*"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"TILLWIRE_ADMIN_TOKEN": "b"})
    assert info.value.key == "admin.tokens[1].name"
    assert "TILLWIRE_ADMIN_TOKEN" in str(info.value)


def test_non_config_env_is_ignored():
    env = {name: "1" for name in NON_CONFIG_ENV}
    env.update({"PATH": "/bin", "tillwire_lowercase": "x", "TILLWIREX": "y"})
    assert load_config(env=env) == Config()
    assert {"TILLWIRE_NO_EXTENSIONS", "TILLWIRE_DEBUG", "TILLWIRE_CONFIG"} <= set(NON_CONFIG_ENV)


def test_loader_ignores_tillwire_config(tmp_path):
    path = toml_file(tmp_path, "[server]\nport = 9999\n")
    assert load_config(env={"TILLWIRE_CONFIG": path}).server.port == 7070


def test_unknown_env_var_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(env={"TILLWIRE_SERVER_PROT": "7070"})
    assert info.value.key == "TILLWIRE_SERVER_PROT"
    assert "TILLWIRE_SERVER_PORT" in str(info.value)


def test_env_from_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TILLWIRE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TILLWIRE_SERVER_BACKLOG", "17")
    assert load_config().server.backlog == 17


# --------------------------------------------------------------------------
# Validation: every bad value names its key


# dotted key -> (bad value in the TOML file, bad text in the environment or None
# when every string is valid there)
BAD_VALUES = {
    "server.host": ("", ""),
    "server.port": (70000, "x"),
    "server.data_dir": ("", ""),
    "server.node_id": ("has space", "a/b"),
    "server.max_frame_size": (63, "1GiB"),
    "server.compress_threshold": (-1, "-1"),
    "server.auth_timeout": (0, "0s"),
    "server.backlog": (0, "0"),
    "server.send_buffer": (4095, "1KiB"),
    "server.notsent_lowat": (-1, "low"),
    "server.write_high_water": (1023, "1000"),
    "server.write_chunk": ("1KB", "abc"),
    "server.read_budget_ms": (-1, "soon"),
    "server.flush_slice_ms": (-0.5, "fast"),
    "server.max_connections": (-1, "1.5"),
    "auth.secret": (5, None),
    "auth.clock_skew": (-1, "-5s"),
    "auth.default_ttl": (0, "forever"),
    "heartbeat.interval": (0, "0"),
    "heartbeat.min": (-1.0, "x"),
    "heartbeat.max": ("1y", ""),
    "heartbeat.tick": (0, "0ms"),
    "heartbeat.wheel_size": (7, "4"),
    "lanes.max_queued_bytes": (100, "4KB"),
    "lanes.weights": ([8, 4, 65536], "8,4,0"),
    "lanes.p3_ttl": (0, "nan"),
    "delivery.retransmit_initial": (0, "inf"),
    "delivery.retransmit_max": (-1, "x"),
    "delivery.p0_ttl": (0, "0"),
    "delivery.p1_ttl": ("0d", "-1"),
    "delivery.dedup_window": (0, "x"),
    "delivery.ack_batch_ms": (-1, "nan"),
    "delivery.inflight": (0, "many"),
    "delivery.max_uncommitted": (0, "lots"),
    "delivery.slow_consumer_timeout": (0, "-1s"),
    "delivery.unknown_terminals": ({"acme": "maybe"}, "*=drop"),
    "limits.handshake_frame": (63, "1KB"),
    "limits.max_send_body": (63, "big"),
    "limits.max_body_depth": (0, "129"),
    "limits.unacked_sends": ({"till": 5}, "pos"),
    "limits.send_rate": ({"pos": -1}, "pos=-1"),
    "limits.send_burst": ("many", "*=x"),
    "limits.send_wait_max": (0, "0s"),
    "limits.request_rate": (-1, "x"),
    "limits.request_burst": (0, "0"),
    "limits.max_subscriptions": (-1, "x"),
    "limits.topic_roles": (["admin"], "admin"),
    "limits.segment_roles": ("admin", "x,y"),
    "limits.history_page": (0, "0"),
    "limits.max_connections_per_source": (-1, "x"),
    "limits.max_connections_per_tenant": (-1, "x"),
    "limits.auth_fail_delay_max": (-1, "x"),
    "history.max_messages": (-1, "x"),
    "history.max_age": (0, "0"),
    "store.backend": ("postgres", "mysql"),
    "server.workers": (0, "65"),
    "store.synchronous": ("SOMETIMES", "maybe"),
    "store.group_commit_ms": (-0.5, "-1"),
    "store.writer": ("fork", "sometimes"),
    "admin.host": ("", ""),
    "admin.port": (70000, "-1"),
    "admin.tokens": ("abc", "x"),
    "log.level": ("trace", "verbose"),
    "log.format": ("xml", "yaml"),
    "log.audit_path": (1, None),
    "log.audit_max_bytes": (1, "1B"),
    "log.audit_backups": (-1, "x"),
    "redis.url": ("http://x", "localhost:6379"),
    "redis.prefix": ("", "has space"),
    "tls.cert": (1, None),
    "tls.key": (1, None),
    "tls.client_ca": (1, None),
    "tls.require_client_cert": ("yes", "maybe"),
    "directory.default_timezone": ("Mars/Base", "America"),
    "directory.stores": ("abc", "x"),
    "tickets.escalate_after": (0, "soon"),
    "tickets.escalate_role": ("boss", "admin"),
    "tickets.auto_replies": (5, "E1=reboot"),
    "offers.quiet_start": ("24:00", "7pm"),
    "offers.quiet_end": ("08:60", "8"),
    "offers.cap_count": (-1, "x"),
    "offers.cap_window": (0, "0s"),
    "retention.chat": (0, "90 days"),
    "retention.member_notice": (-1, "0"),
    "retention.tickets": (0, "3 months"),
}


def test_bad_value_table_covers_every_key():
    assert sorted(BAD_VALUES) == sorted(ALL_KEYS)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_bad_file_value_names_key(tmp_path, key):
    path = set_in_file(tmp_path, key, BAD_VALUES[key][0])
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


@pytest.mark.parametrize("key", sorted(k for k, (_, text) in BAD_VALUES.items() if text is not None))
def test_bad_env_value_names_key_and_variable(key):
    var = "TILLWIRE_ADMIN_TOKENS" if key == "admin.tokens" else ENV_OF[key]
    with pytest.raises(ConfigError) as info:
        load_config(env={var: BAD_VALUES[key][1]})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key} ({var}): ")


@pytest.mark.parametrize("key", sorted(k for k in BAD_VALUES if k != "admin.tokens"))
def test_bad_override_names_key(key):
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={key: BAD_VALUES[key][0]})
    assert info.value.key == key


def test_error_message_format_for_env():
    with pytest.raises(ConfigError) as info:
        load_config(env={"TILLWIRE_SERVER_PORT": "x"})
    assert str(info.value) == "server.port (TILLWIRE_SERVER_PORT): must be an integer 0-65535, got 'x'"


@pytest.mark.parametrize("key, value", [
    ("server.port", "7070"),     # a string where the file needs an integer
    ("server.port", 7070.0),     # a float
    ("server.port", True),       # a boolean is not an integer
    ("server.backlog", 1.5),
    ("lanes.weights", [8, 4, True]),
    ("lanes.weights", "8,4,1"),  # the env syntax is not TOML
    ("heartbeat.tick", True),
    ("tls.require_client_cert", 1),
    ("server.host", 127),
    ("store.group_commit_ms", "2ms"),
])
def test_file_types_are_checked(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        load_config(set_in_file(tmp_path, key, value), env={})
    assert info.value.key == key


@pytest.mark.parametrize("key, value, expected", [
    ("server.port", 0, 0),
    ("server.port", 65535, 65535),
    ("server.max_frame_size", 64, 64),
    ("server.max_frame_size", (1 << 21) - 64, (1 << 21) - 64),
    # Larger than the default lanes.max_queued_bytes allows (relation error).
    ("server.max_frame_size", MAX_FRAME_SIZE_LIMIT, None),
    ("server.max_frame_size", "256MiB", None),   # 2**28 is one too many
    ("server.compress_threshold", 0, 0),
    ("auth.clock_skew", 0, 0.0),
    ("admin.port", 0, 0),
    ("heartbeat.wheel_size", 8, 8),
    ("history.max_messages", 0, 0),
    ("log.audit_backups", 0, 0),
    ("server.node_id", "", ""),
    ("redis.url", "rediss://:pw@redis.example:6380/1", "rediss://:pw@redis.example:6380/1"),
    ("redis.url", "unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_boundaries(tmp_path, key, value, expected):
    path = set_in_file(tmp_path, key, value)
    section, name = key.split(".")
    if expected is None:
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert info.value.key == key
    else:
        assert getattr(getattr(load_config(path, env={}), section), name) == expected


def test_role_tables_override_the_defaults_entry_by_entry(tmp_path):
    path = toml_file(tmp_path, """
        [limits]
        unacked_sends = {pos = 10}
        send_rate = {"*" = 7, backend = 100}
        topic_roles = ["staff", "staff"]
        """)
    lim = load_config(path, env={"TILLWIRE_LIMITS_SEND_BURST": "customer=3, kiosk=9"}).limits
    # What a table names replaces the default's entry; the rest of the default stays.
    assert dict(lim.unacked_sends) == {"*": 256, "backend": 16384, "pos": 10}
    assert dict(lim.send_rate) == {"*": 7, "backend": 100, "customer": 5}
    assert dict(lim.send_burst) == {"*": 100, "backend": 0, "customer": 3, "kiosk": 9}
    assert lim.topic_roles == ("staff",)
    # A token's most generous role counts, and 0 (no limit) beats any number.
    assert role_value(lim.unacked_sends, ("pos",)) == 10
    assert role_value(lim.unacked_sends, ("pos", "staff")) == 256
    assert role_value(lim.unacked_sends, ("staff", "backend")) == 16384
    assert role_value(load_config(env={}).limits.send_rate, ("customer", "backend")) == 0
    # The table's plain form round-trips (config --print, describe_keys).
    assert load_config(env={}, overrides={"limits.unacked_sends": {"pos": 10}}).limits \
        .unacked_sends == lim.unacked_sends


def test_unknown_terminals_is_a_word_by_tenant_in_every_form(tmp_path):
    path = toml_file(tmp_path, """
        [delivery]
        unknown_terminals = {legacy = "accept", "*" = "refuse"}
        """)
    table = load_config(path, env={}).delivery.unknown_terminals
    assert [tenant_value(table, t) for t in ("legacy", "acme")] == ["accept", "refuse"]
    assert load_config(path, env={}, overrides={"delivery.unknown_terminals": dict(table)}) \
        .delivery.unknown_terminals == table             # (its plain form round-trips)
    for text, acme, legacy in (("accept", "accept", "accept"), ("Refuse", "refuse", "refuse"),
                               ("*=accept, legacy=refuse", "accept", "refuse"),
                               ("legacy=accept", "refuse", "accept")):
        table = load_config(env={"TILLWIRE_DELIVERY_UNKNOWN_TERMINALS": text}) \
            .delivery.unknown_terminals
        assert (tenant_value(table, "acme"), tenant_value(table, "legacy")) == (acme, legacy), text
    assert dict(load_config(env={}).delivery.unknown_terminals) == {"*": "refuse"}
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"delivery.unknown_terminals": {"bad tenant": "accept"}})
    assert info.value.key == "delivery.unknown_terminals"


def test_role_names_of_the_config_are_the_token_roles():
    from tillwire.server.auth import ROLES
    from tillwire.server.config import ROLE_NAMES
    assert ROLE_NAMES == ROLES


# --------------------------------------------------------------------------
# Relations between keys


@pytest.mark.parametrize("env, key", [
    ({"TILLWIRE_HEARTBEAT_MIN": "60"}, "heartbeat.min"),
    ({"TILLWIRE_HEARTBEAT_INTERVAL": "2"}, "heartbeat.interval"),
    ({"TILLWIRE_HEARTBEAT_INTERVAL": "20m"}, "heartbeat.interval"),
    ({"TILLWIRE_HEARTBEAT_MAX": "10"}, "heartbeat.max"),
    ({"TILLWIRE_DELIVERY_RETRANSMIT_MAX": "1"}, "delivery.retransmit_max"),
    ({"TILLWIRE_DELIVERY_RETRANSMIT_INITIAL": "2m"}, "delivery.retransmit_initial"),
    ({"TILLWIRE_ADMIN_PORT": "7070"}, "admin.port"),
    ({"TILLWIRE_SERVER_PORT": "7071"}, "server.port"),
])
def test_relations_blame_the_key_that_was_set(env, key):
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.key == key
    (var,) = env
    assert f"({var})" in str(info.value)


def test_heartbeat_bounds_may_be_equal():
    cfg = load_config(env={"TILLWIRE_HEARTBEAT_MIN": "30", "TILLWIRE_HEARTBEAT_MAX": "30"})
    assert cfg.heartbeat.min == cfg.heartbeat.interval == cfg.heartbeat.max == 30.0


def test_admin_and_server_port_may_match_on_distinct_hosts():
    cfg = load_config(env={"TILLWIRE_ADMIN_PORT": "7070", "TILLWIRE_ADMIN_HOST": "10.0.0.1"})
    assert cfg.admin.port == cfg.server.port
    with pytest.raises(ConfigError):
        load_config(env={"TILLWIRE_ADMIN_PORT": "7070", "TILLWIRE_SERVER_HOST": "0.0.0.0",
                         "TILLWIRE_ADMIN_HOST": "10.0.0.1"})
    # admin port 0 = disabled, never a clash
    assert load_config(env={"TILLWIRE_ADMIN_PORT": "0"}).admin.port == 0


def test_tls(tmp_path):
    cert, key, ca = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text("pem")
    cfg = load_config(env={"TILLWIRE_TLS_CERT": str(cert), "TILLWIRE_TLS_KEY": str(key)})
    assert cfg.tls.cert == str(cert) and cfg.tls.client_ca == ""

    cases = [
        ({"TILLWIRE_TLS_CERT": str(cert)}, "tls.key"),
        ({"TILLWIRE_TLS_KEY": str(key)}, "tls.cert"),
        ({"TILLWIRE_TLS_CERT": str(tmp_path / "missing.pem"), "TILLWIRE_TLS_KEY": str(key)}, "tls.cert"),
        ({"TILLWIRE_TLS_CERT": str(cert), "TILLWIRE_TLS_KEY": str(tmp_path)}, "tls.key"),  # a directory
        ({"TILLWIRE_TLS_CERT": str(cert), "TILLWIRE_TLS_KEY": str(key),
          "TILLWIRE_TLS_CLIENT_CA": str(tmp_path / "nope.pem")}, "tls.client_ca"),
        ({"TILLWIRE_TLS_CLIENT_CA": str(ca)}, "tls.client_ca"),
        ({"TILLWIRE_TLS_CERT": str(cert), "TILLWIRE_TLS_KEY": str(key),
          "TILLWIRE_TLS_REQUIRE_CLIENT_CERT": "true"}, "tls.require_client_cert"),
    ]
    for env, bad_key in cases:
        with pytest.raises(ConfigError) as info:
            load_config(env=env)
        assert info.value.key == bad_key, env


ADMIN_TOKEN_ERRORS = [
    ('name = "a"\ntoken = "t"', "admin.tokens[0].tenants"),
    ('name = "a"\ntenants = ["*"]', "admin.tokens[0].token"),
    ('token = "t"\ntenants = ["*"]', "admin.tokens[0].name"),
    ('name = "a"\ntoken = "t"\ntenant = ["*"]', "admin.tokens[0].tenant"),
    ('name = "a b"\ntoken = "t"\ntenants = ["*"]', "admin.tokens[0].name"),
    ('name = "a"\ntoken = ""\ntenants = ["*"]', "admin.tokens[0].token"),
    ('name = "a"\ntoken = "t t"\ntenants = ["*"]', "admin.tokens[0].token"),
    ('name = "a"\ntoken = "t"\ntenants = []', "admin.tokens[0].tenants"),
    ('name = "a"\ntoken = "t"\ntenants = "*"', "admin.tokens[0].tenants"),
    ('name = "a"\ntoken = "t"\ntenants = ["*", "acme"]', "admin.tokens[0].tenants"),
    ('name = "a"\ntoken = "t"\ntenants = ["ac/me"]', "admin.tokens[0].tenants"),
    ('name = "a"\ntoken = "t"\ntenants = ["acme", "acme"]', "admin.tokens[0].tenants"),
]


@pytest.mark.parametrize("body, key", ADMIN_TOKEN_ERRORS)
def test_admin_token_tables_are_checked(tmp_path, body, key):
    path = toml_file(tmp_path, "[[admin.tokens]]\n" + body + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == key


SERVICES_FILE = """
[directory]
default_timezone = "Asia/Shanghai"

[[directory.stores]]
tenant = "acme"
store = "s1"
on_duty = ["h1", "h2"]
managers = ["m1"]

[[directory.stores]]
tenant = "acme"
store = "s2"
timezone = "Europe/Berlin"

[tickets]
escalate_after = "5m"

[[tickets.auto_replies]]
code = "E42"
reply = "Reseat the paper roll and press FEED."

[[tickets.auto_replies]]
code = "E42"
reply = "Call the acme printer desk."
tenant = "acme"

[offers]
quiet_start = "21:30"
quiet_end = "07:00"
cap_count = 0
cap_window = "12h"

[retention]
chat = "30d"
member_notice = "7d"
tickets = "60d"
"""


def test_services_sections_from_file(tmp_path):
    from tillwire.server.config import AutoReply, StoreEntry

    cfg = load_config(toml_file(tmp_path, SERVICES_FILE), env={})
    assert cfg.directory.default_timezone == "Asia/Shanghai"
    assert cfg.directory.stores == (
        StoreEntry("acme", "s1", "", ("h1", "h2"), ("m1",)),
        StoreEntry("acme", "s2", "Europe/Berlin", (), ()),
    )
    assert cfg.tickets.escalate_after == 300.0
    assert cfg.tickets.auto_replies == (
        AutoReply("E42", "Reseat the paper roll and press FEED.", "*"),
        AutoReply("E42", "Call the acme printer desk.", "acme"),
    )
    assert (cfg.offers.quiet_start, cfg.offers.quiet_end) == ("21:30", "07:00")
    assert cfg.offers.cap_count == 0 and cfg.offers.cap_window == 43200.0
    assert cfg.retention.chat == 30 * 86400.0 and cfg.retention.member_notice == 7 * 86400.0
    assert cfg.retention.tickets == 60 * 86400.0
    # The tables survive to_dict -> overrides.
    flat = {f"{section}.{name}": value
            for section, table in cfg.to_dict(mask_secrets=False).items()
            for name, value in table.items()}
    assert load_config(env={}, overrides=flat) == cfg


def test_services_defaults():
    cfg = load_config(env={})
    assert cfg.directory.default_timezone == "UTC" and cfg.directory.stores == ()
    assert cfg.tickets.escalate_after == 300.0 and cfg.tickets.auto_replies == ()
    assert (cfg.offers.quiet_start, cfg.offers.quiet_end) == ("22:00", "08:00")
    assert cfg.offers.cap_count == 3 and cfg.offers.cap_window == 86400.0
    assert cfg.retention.chat == 7776000.0 and cfg.retention.member_notice == 2592000.0
    assert cfg.retention.tickets == 7776000.0


@pytest.mark.parametrize("body, key", [
    ('[[directory.stores]]\ntenant = "a"\nstore = "s1"\n[[directory.stores]]\ntenant = "a"\n'
     'store = "s2"\n[[directory.stores]]\ntenant = "a"\nstore = "s3"\ntimezone = "Mars/Base"\n',
     "directory.stores[2].timezone"),
    ('[[directory.stores]]\ntenant = "a"\n', "directory.stores[0].store"),
    ('[[directory.stores]]\ntenant = "a b"\nstore = "s"\n', "directory.stores[0].tenant"),
    ('[[directory.stores]]\ntenant = "a"\nstore = "s"\non_duty = "h1"\n',
     "directory.stores[0].on_duty"),
    ('[[directory.stores]]\ntenant = "a"\nstore = "s"\nmanagers = ["m1", "m1"]\n',
     "directory.stores[0].managers"),
    ('[[directory.stores]]\ntenant = "a"\nstore = "s"\nzone = "UTC"\n', "directory.stores[0].zone"),
    ('[[directory.stores]]\ntenant = "a"\nstore = "s"\n[[directory.stores]]\ntenant = "a"\n'
     'store = "s"\n', "directory.stores[1].store"),
    ('[directory.stores]\ntenant = "a"\nstore = "s"\n', "directory.stores"),
    ('[[tickets.auto_replies]]\ncode = "E1"\n', "tickets.auto_replies[0].reply"),
    ('[[tickets.auto_replies]]\ncode = ""\nreply = "x"\n', "tickets.auto_replies[0].code"),
    ('[[tickets.auto_replies]]\ncode = "E1"\nreply = "x"\ntenant = "a/b"\n',
     "tickets.auto_replies[0].tenant"),
    ('[[tickets.auto_replies]]\ncode = "E1"\nreply = "x"\n[[tickets.auto_replies]]\n'
     'code = "E1"\nreply = "y"\n', "tickets.auto_replies[1].code"),
])
def test_services_tables_are_checked(tmp_path, body, key):
    with pytest.raises(ConfigError) as info:
        load_config(toml_file(tmp_path, body), env={})
    assert info.value.key == key


def test_services_tables_not_settable_from_env():
    for var, key in (("TILLWIRE_DIRECTORY_STORES", "directory.stores"),
                     ("TILLWIRE_TICKETS_AUTO_REPLIES", "tickets.auto_replies")):
        with pytest.raises(ConfigError) as info:
            load_config(env={var: "[]"})
        assert info.value.key == key and "config file" in str(info.value)


def test_admin_token_duplicates(tmp_path):
    dup_name = toml_file(tmp_path, """
        [[admin.tokens]]
        name = "ops"
        token = "one"
        tenants = ["*"]
        [[admin.tokens]]
        name = "ops"
        token = "two"
        tenants = ["*"]
    """)
    with pytest.raises(ConfigError) as info:
        load_config(dup_name, env={})
    assert info.value.key == "admin.tokens[1].name"

    dup_token = toml_file(tmp_path, """
        [[admin.tokens]]
        name = "ops"
        token = "same-secret"
        tenants = ["*"]
        [[admin.tokens]]
        name = "other"
        token = "same-secret"
        tenants = ["acme"]
    """)
    with pytest.raises(ConfigError) as info:
        load_config(dup_token, env={})
    assert info.value.key == "admin.tokens[1].token"
    assert "same-secret" not in str(info.value)  # never echo a secret


def test_errors_never_echo_secrets(tmp_path):
    cases = [
        ('[admin]\ntokens = ["t0ps3cret"]\n', "admin.tokens[0]"),
        ('[admin.tokens]\nname = "a"\ntoken = "t0ps3cret"\ntenants = ["*"]\n', "admin.tokens"),
        ('[redis]\nurl = "http://user:t0ps3cret@redis:6379"\n', "redis.url"),
    ]
    for text, key in cases:
        with pytest.raises(ConfigError) as info:
            load_config(toml_file(tmp_path, text), env={})
        assert info.value.key == key
        assert "t0ps3cret" not in str(info.value)


# --------------------------------------------------------------------------
# Unknown keys and broken files


@pytest.mark.parametrize("text, key, hint", [
    ("[servr]\nport = 1\n", "servr", "server"),
    ("[server]\nprot = 1\n", "server.prot", "port"),
    ("[heartbeat]\ninterval_s = 1\n", "heartbeat.interval_s", "interval"),
    ("port = 1\n", "port", "[server]"),
    ("server = 1\n", "server", "table"),
    ("[[server]]\nport = 1\n", "server", "table"),
])
def test_unknown_or_misplaced_keys(tmp_path, text, key, hint):
    path = toml_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == key
    assert hint in str(info.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == path
    assert "cannot read" in str(info.value)


def test_invalid_toml(tmp_path):
    path = toml_file(tmp_path, "[server\nport = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.key == path
    assert "invalid TOML" in str(info.value)


def test_binary_file(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.key == str(path)


# --------------------------------------------------------------------------
# Durations and sizes


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0),
    ("30", 30.0), ("1.5h", 5400.0), (" 2 s ", 2.0), ("10MS", 0.01), (".5s", 0.5), ("0", 0.0),
    (45, 45.0), (0.25, 0.25),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", [
    "", "s", "1y", "1e3", "-1s", "1.2.3s", "1 h 30 m", "1h30m", "nan", "inf", "½s",
    -1, float("nan"), float("inf"), True, None, [1],
])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text, size", [
    ("512B", 512), ("64KiB", 65536), ("1MiB", 1 << 20), ("1GiB", 1 << 30), ("2TiB", 2 << 40),
    ("4096", 4096), (" 8 kib ", 8192), (0, 0), (123, 123),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "KiB", "1.5MiB", "1KB", "1MB", "1k", "-1", "1e3", -1, 1.0, True, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**9), unit=st.sampled_from(sorted(DURATION_UNITS)))
def test_duration_units_property(n, unit):
    assert parse_duration(f"{n}{unit}") == n * DURATION_UNITS[unit]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted(SIZE_UNITS)))
def test_size_units_property(n, unit):
    assert parse_size(f"{n}{unit}") == n * SIZE_UNITS[unit]
    assert parse_size(f"{n}{unit.lower()}") == n * SIZE_UNITS[unit]


@settings(max_examples=300, deadline=None)
@given(var=st.sampled_from(sorted(ENV_OF.values()) + ["TILLWIRE_SECRET", "TILLWIRE_ADMIN_TOKENS"]),
       text=st.text(max_size=20))
def test_any_env_text_gives_a_config_or_a_config_error(var, text):
    try:
        cfg = load_config(env={var: text})
    except ConfigError as exc:
        assert exc.key  # always names something
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(port=st.integers(-10, 70000))
def test_port_range_property(port):
    if 0 <= port <= 65535 and port != 7071:
        assert load_config(env={"TILLWIRE_SERVER_PORT": str(port)}).server.port == port
    else:
        with pytest.raises(ConfigError) as info:
            load_config(env={"TILLWIRE_SERVER_PORT": str(port)})
        assert info.value.key == "server.port"


# --------------------------------------------------------------------------
# Secrets


def test_require_secret():
    with pytest.raises(ConfigError) as info:
        load_config(env={}).require_secret()
    assert info.value.key == "auth.secret"
    assert "TILLWIRE_SECRET" in str(info.value)
    assert load_config(env={"TILLWIRE_SECRET": "k"}).require_secret() == "k"


def test_to_dict_masks_secrets():
    cfg = load_config(
        env={"TILLWIRE_SECRET": "hunter2", "TILLWIRE_ADMIN_TOKEN": "adm1n",
             "TILLWIRE_REDIS_URL": "redis://user:pa55@redis:6379/0"},
    )
    masked = cfg.to_dict()
    assert masked["auth"]["secret"] == "***"
    assert masked["admin"]["tokens"] == [{"name": "env", "token": "***", "tenants": ["*"]}]
    assert masked["redis"]["url"] == "redis://user:***@redis:6379/0"
    text = orjson.dumps(masked).decode()
    assert "hunter2" not in text and "adm1n" not in text and "pa55" not in text

    plain = cfg.to_dict(mask_secrets=False)
    assert plain["auth"]["secret"] == "hunter2"
    assert plain["admin"]["tokens"][0]["token"] == "adm1n"
    assert plain["redis"]["url"] == "redis://user:pa55@redis:6379/0"
    # masking never mutates the config
    assert cfg.auth.secret == "hunter2"


def test_to_dict_leaves_empty_secret_and_plain_url():
    d = load_config(env={"TILLWIRE_REDIS_URL": "redis://redis:6379/0"}).to_dict()
    assert d["auth"]["secret"] == ""
    assert d["redis"]["url"] == "redis://redis:6379/0"
    assert d["lanes"]["weights"] == [8, 4, 1]


def test_direct_construction_is_not_validated():
    # load_config validates; tests may build what they need (port 0 = ephemeral).
    cfg = dataclasses.replace(Config(), server=ServerConfig(port=0), auth=AuthConfig(secret="x"))
    assert cfg.server.port == 0 and cfg.require_secret() == "x"


# --------------------------------------------------------------------------
# The CLI: `tillwire config`


@pytest.fixture
def clean_env(monkeypatch):
    """The process environment without any TILLWIRE_* variable."""
    for name in list(os.environ):
        if name.startswith("TILLWIRE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLWIRE_")}
    env.update(extra)
    return env


def test_cli_config_print_masks_secrets_subprocess(tmp_path):
    path = toml_file(tmp_path, FULL_FILE)
    proc = subprocess.run(
        [sys.executable, "-m", "tillwire", "config", "--print", "--config", path],
        env=subprocess_env(TILLWIRE_ADMIN_TOKEN="env-adm1n"),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    printed = orjson.loads(proc.stdout)
    assert printed["auth"]["secret"] == "***"
    assert [t["token"] for t in printed["admin"]["tokens"]] == ["***", "***", "***"]
    for secret in ("file-secret", "ops-token", "acme-token", "env-adm1n"):
        assert secret not in proc.stdout
    assert printed["server"]["port"] == 9000
    assert printed == load_config(path, env={"TILLWIRE_ADMIN_TOKEN": "x"}).to_dict()


def test_cli_config_print_uses_tillwire_config(clean_env, tmp_path, capsys):
    clean_env.setenv("TILLWIRE_CONFIG", toml_file(tmp_path, "[server]\nport = 9999\n"))
    assert cli.main(["config", "--print"]) == 0
    assert orjson.loads(capsys.readouterr().out)["server"]["port"] == 9999


def test_cli_config_keys_lists_every_key(clean_env, capsys):
    assert cli.main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    for key, env, _default, doc in describe_keys():
        line = next(line for line in out.splitlines() if line.startswith(key + " "))
        assert env in line and doc in line
    for name in NON_CONFIG_ENV:
        assert name in out


def test_cli_config_error_exit_code(clean_env, capsys):
    clean_env.setenv("TILLWIRE_SERVER_PORT", "x")
    assert cli.main(["config", "--print"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("tillwire: config error: server.port (TILLWIRE_SERVER_PORT): "
                           "must be an integer 0-65535, got 'x'")


def test_cli_usage_errors(clean_env, capsys):
    assert cli.main([]) == 2
    assert cli.main(["config"]) == 2  # --print or --keys is required
    assert cli.main(["config", "--print", "--keys"]) == 2
    assert cli.main(["bogus"]) == 2
    assert cli.main(["--version"]) == 0
    assert "tillwire" in capsys.readouterr().out


def test_cli_serve_builds_overrides(clean_env, monkeypatch, capsys):
    import types

    seen = []
    fake = types.ModuleType("tillwire.server.main")
    fake.serve = lambda cfg: seen.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "tillwire.server.main", fake)
    clean_env.setenv("TILLWIRE_SECRET", "s")
    clean_env.setenv("TILLWIRE_SERVER_PORT", "9001")
    rc = cli.main(["serve", "--host", "0.0.0.0", "--port", "9002", "--data-dir", "/tmp/tw",
                   "--admin-port", "0", "--log-level", "debug"])
    assert rc == 0
    (cfg,) = seen
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == 9002  # flag beats env
    assert cfg.server.data_dir == "/tmp/tw" and cfg.admin.port == 0
    assert cfg.log.level == "debug"

    # --redis makes the node a member of a fleet: the store is Redis too.
    assert cli.main(["serve", "--redis", "redis://r:6379/0", "--workers", "3"]) == 0
    cfg = seen[-1]
    assert cfg.redis.url == "redis://r:6379/0" and cfg.store.backend == "redis"
    assert cfg.server.workers == 3
    # More than one worker without Redis is refused, naming the key.
    assert cli.main(["serve", "--workers", "2"]) == 2
    assert "server.workers" in capsys.readouterr().err and len(seen) == 2

    assert cli.main(["serve", "--port", "nope"]) == 2
    assert "server.port" in capsys.readouterr().err


def test_cli_serve_requires_secret(clean_env, monkeypatch, capsys):
    import types

    fake = types.ModuleType("tillwire.server.main")
    fake.serve = lambda cfg: pytest.fail("serve must not start without a secret")
    monkeypatch.setitem(sys.modules, "tillwire.server.main", fake)
    assert cli.main(["serve"]) == 2
    assert "auth.secret" in capsys.readouterr().err
