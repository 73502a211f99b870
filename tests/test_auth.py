"""Terminal access tokens (server/auth.py) and the `tillwire token` command.

The tests build signatures and payloads with ``hmac``/``base64`` directly
(not through the module) so the format is checked against its description,
not against itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tillwire.core.codes import Code
from tillwire.core.errors import AuthError
from tillwire.server.auth import ROLES, Claims, issue_token, verify_token

SECRET = "correct horse battery staple"
NOW = 1_700_000_000.0
DAY = 86400


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_raw(payload: bytes, secret: str = SECRET) -> str:
    """A token for arbitrary payload bytes, correctly signed."""
    signed = "tw1." + b64(payload)
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return signed + "." + b64(mac)


def claims_obj(**changes) -> dict:
    obj = {"ten": "acme", "sto": "s1", "reg": "north", "tid": "till-7", "rol": ["pos", "staff"],
           "mem": "", "iat": int(NOW), "exp": int(NOW) + DAY}
    obj.update(changes)
    return obj


def make(**kwargs) -> str:
    args = {"tenant": "acme", "store": "s1", "terminal": "till-7", "roles": ["pos"], "now": NOW}
    args.update(kwargs)
    return issue_token(SECRET, **args)


def rejects(token, code=Code.AUTH_FAILED, **kwargs) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, token, **({"now": NOW} | kwargs))
    assert info.value.code == code
    return info.value


# --------------------------------------------------------------------------
# Round trip and format


def test_round_trip_all_claims():
    token = issue_token(SECRET, tenant="acme", store="s-042", region="north.eu", terminal="kiosk_3",
                        roles=["kiosk", "customer"], member="M-1001", ttl=3600, now=NOW)
    claims = verify_token(SECRET, token, now=NOW + 10)
    assert claims == Claims(tenant="acme", store="s-042", region="north.eu", terminal="kiosk_3",
                            roles=("kiosk", "customer"), member="M-1001",
                            issued_at=int(NOW), expires_at=int(NOW) + 3600)
    assert claims.address == "terminal:acme/kiosk_3"


def test_optional_fields_default_empty():
    claims = verify_token(SECRET, make(), now=NOW)
    assert claims.region == "" and claims.member == ""
    assert claims.expires_at - claims.issued_at == DAY  # default ttl


def test_format_matches_the_description():
    token = make(roles=["pos", "staff"], region="north", ttl=60)
    prefix, payload_b64, sig_b64 = token.split(".")
    assert prefix == "tw1"
    assert "=" not in token
    payload = unb64(payload_b64)
    assert orjson.loads(payload) == {"ten": "acme", "sto": "s1", "reg": "north", "tid": "till-7",
                                     "rol": ["pos", "staff"], "mem": "", "iat": int(NOW), "exp": int(NOW) + 60}
    expected = hmac.new(SECRET.encode(), f"tw1.{payload_b64}".encode(), hashlib.sha256).digest()
    assert unb64(sig_b64) == expected
    # a token signed by hand with the documented recipe verifies
    assert verify_token(SECRET, sign_raw(orjson.dumps(claims_obj())), now=NOW).terminal == "till-7"


def test_roles_keep_order_and_drop_repeats():
    assert verify_token(SECRET, make(roles=["staff", "pos", "staff"]), now=NOW).roles == ("staff", "pos")
    assert verify_token(SECRET, make(roles=iter(["manager"])), now=NOW).roles == ("manager",)
    assert verify_token(SECRET, make(roles=list(ROLES)), now=NOW).roles == ROLES


def test_times_round_outwards():
    token = make(now=1000.7, ttl=0.2)
    claims = verify_token(SECRET, token, now=1000.7, leeway=0)
    assert claims.issued_at == 1000 and claims.expires_at == 1001  # at least ttl, whole seconds


def test_utf8_secret():
    token = make()
    token2 = issue_token("sécret-✓", tenant="acme", store="s1", terminal="t", roles=["pos"], now=NOW)
    assert verify_token("sécret-✓", token2, now=NOW).terminal == "t"
    with pytest.raises(AuthError):
        verify_token("sécret-✓", token, now=NOW)


# --------------------------------------------------------------------------
# Signatures


def test_wrong_secret():
    rejects(issue_token("other", tenant="acme", store="s1", terminal="t", roles=["pos"], now=NOW))


def test_tampered_payload():
    token = make(roles=["pos"])
    _, payload_b64, sig_b64 = token.split(".")
    forged = orjson.dumps(claims_obj(rol=["manager"]))
    rejects(f"tw1.{b64(forged)}.{sig_b64}")
    # every single-character change of the payload segment is caught
    for i in range(len(payload_b64)):
        swapped = "A" if payload_b64[i] != "A" else "B"
        rejects(f"tw1.{payload_b64[:i]}{swapped}{payload_b64[i + 1:]}.{sig_b64}")


def test_tampered_signature():
    token = make()
    head, sig_b64 = token.rsplit(".", 1)
    for i in range(len(sig_b64)):
        swapped = "A" if sig_b64[i] != "A" else "B"
        rejects(f"{head}.{sig_b64[:i]}{swapped}{sig_b64[i + 1:]}")
    rejects(head + "." + sig_b64[:-4])                 # truncated
    rejects(head + "." + b64(unb64(sig_b64)[:16]))     # a shorter MAC
    rejects(head + ".")                                # no signature


def test_non_canonical_base64_is_refused():
    token = make()
    head, sig_b64 = token.rsplit(".", 1)
    # 32 bytes -> 43 chars whose last one carries 2 unused bits: flip one of them
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig_b64[-1])
    twin = sig_b64[:-1] + alphabet[last ^ 1]
    assert unb64(twin) == unb64(sig_b64)  # same bytes, another spelling
    rejects(f"{head}.{twin}")
    rejects(f"{head}.{sig_b64}=")  # padding


# --------------------------------------------------------------------------
# Expiry and clock skew


def test_expiry_with_leeway():
    token = make(ttl=3600)
    exp = int(NOW) + 3600
    assert verify_token(SECRET, token, now=exp + 300, leeway=300).terminal == "till-7"
    err = rejects(token, Code.TOKEN_EXPIRED, now=exp + 300.5, leeway=300)
    assert "expired" in str(err)
    # default leeway is 300 s
    assert verify_token(SECRET, token, now=exp + 299).terminal == "till-7"
    rejects(token, Code.TOKEN_EXPIRED, now=exp + 301)


def test_expiry_without_leeway():
    token = make(ttl=3600)
    exp = int(NOW) + 3600
    assert verify_token(SECRET, token, now=exp, leeway=0).expires_at == exp
    rejects(token, Code.TOKEN_EXPIRED, now=exp + 0.001, leeway=0)


def test_issued_in_the_future():
    token = make(now=NOW + 1000)
    iat = int(NOW) + 1000
    assert verify_token(SECRET, token, now=iat - 300, leeway=300).issued_at == iat
    rejects(token, Code.AUTH_FAILED, now=iat - 301, leeway=300)
    rejects(token, Code.AUTH_FAILED, now=iat - 0.5, leeway=0)


def test_verify_uses_the_clock_by_default():
    token = issue_token(SECRET, tenant="acme", store="s1", terminal="t", roles=["pos"], ttl=60)
    assert verify_token(SECRET, token).terminal == "t"
    old = make(now=1000.0, ttl=60)
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, old)
    assert info.value.code == Code.TOKEN_EXPIRED


# --------------------------------------------------------------------------
# Malformed tokens


@pytest.mark.parametrize("token", [
    None, b"tw1.abc.def", 42, ["tw1."], "", "tw1", "tw1.", "tw1..", "tw2.abc.def", "TW1.abc.def",
    "tw1.abc", "tw1.a.b.c", "tw1.abc.de!", "tw1.ab+c.def", "tw1.ab/c.def", "tw1.a.def",
    " tw1.abc.def", "tw1.abc.def\n", "tw1.é.def",
])
def test_malformed_tokens(token):
    rejects(token)


def test_overlong_token():
    token = make()
    rejects(token + "A" * 3000)
    rejects("tw1." + "A" * 5000 + "." + "A" * 43)


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[]",
    b'"tw1"',
    b"{}",
    orjson.dumps({**claims_obj(), "adm": True}),                    # an unknown claim
    orjson.dumps({k: v for k, v in claims_obj().items() if k != "mem"}),  # a missing claim
    orjson.dumps(claims_obj(ten="")),
    orjson.dumps(claims_obj(ten="ac me")),
    orjson.dumps(claims_obj(sto="x" * 65)),
    orjson.dumps(claims_obj(tid=7)),
    orjson.dumps(claims_obj(reg=None)),
    orjson.dumps(claims_obj(mem="a/b")),
    orjson.dumps(claims_obj(rol=[])),
    orjson.dumps(claims_obj(rol="pos")),
    orjson.dumps(claims_obj(rol=["root"])),
    orjson.dumps(claims_obj(rol=["pos", "pos"])),
    orjson.dumps(claims_obj(rol=[["pos"]])),
    orjson.dumps(claims_obj(iat=True)),
    orjson.dumps(claims_obj(iat=1.5)),
    orjson.dumps(claims_obj(exp="never")),
    orjson.dumps(claims_obj(iat=-1)),
    orjson.dumps(claims_obj(exp=2**60)),
    orjson.dumps(claims_obj(iat=int(NOW), exp=int(NOW) - 1)),
    b'{"ten":"acme","ten":"acme"}',
    "\ufeff".encode() + orjson.dumps(claims_obj()),
])
def test_signed_but_malformed_claims(payload):
    rejects(sign_raw(payload))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_strings_only_raise_auth_error(text):
    try:
        verify_token(SECRET, text, now=NOW)
    except AuthError as exc:
        assert exc.code in (Code.AUTH_FAILED, Code.TOKEN_EXPIRED)
    else:  # pragma: no cover - would need a forged HMAC
        pytest.fail(f"accepted {text!r}")


_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.+/"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=_B64_CHARS, max_size=120), st.text(alphabet=_B64_CHARS, max_size=60))
def test_token_shaped_strings_only_raise_auth_error(payload, signature):
    with pytest.raises(AuthError) as info:
        verify_token(SECRET, f"tw1.{payload}.{signature}", now=NOW)
    assert info.value.code == Code.AUTH_FAILED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_signed_arbitrary_payloads_only_raise_auth_error(payload):
    # Even with a valid signature (a leaked secret, a buggy issuer), a payload
    # that is not exactly the documented object is AUTH_FAILED, never a crash.
    try:
        verify_token(SECRET, sign_raw(payload), now=NOW)
    except AuthError as exc:
        assert exc.code in (Code.AUTH_FAILED, Code.TOKEN_EXPIRED)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 10_000), char=st.characters(codec="utf-8"))
def test_any_one_character_change_is_rejected(index, char):
    token = make(roles=["pos", "service"], member="m1")
    i = index % len(token)
    mutated = token[:i] + char + token[i + 1:]
    if mutated == token:
        assert verify_token(SECRET, mutated, now=NOW).member == "m1"
    else:
        rejects(mutated)


@settings(max_examples=100, deadline=None)
@given(
    tenant=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    terminal=st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    member=st.from_regex(r"[A-Za-z0-9._-]{0,64}", fullmatch=True),
    roles=st.lists(st.sampled_from(ROLES), min_size=1, max_size=7, unique=True),
    ttl=st.floats(0.001, 10 * 365 * DAY),
    now=st.floats(0, 4e9),
)
def test_round_trip_property(tenant, terminal, member, roles, ttl, now):
    token = issue_token(SECRET, tenant=tenant, store="s", terminal=terminal, roles=roles,
                        member=member, ttl=ttl, now=now)
    claims = verify_token(SECRET, token, now=now, leeway=0)
    assert (claims.tenant, claims.terminal, claims.member) == (tenant, terminal, member)
    assert claims.roles == tuple(roles)
    assert claims.issued_at <= now <= now + ttl <= claims.expires_at


# --------------------------------------------------------------------------
# issue_token arguments


@pytest.mark.parametrize("changes, field", [
    ({"tenant": ""}, "tenant"),
    ({"tenant": "a b"}, "tenant"),
    ({"tenant": "x" * 65}, "tenant"),
    ({"store": "s/1"}, "store"),
    ({"terminal": ""}, "terminal"),
    ({"terminal": 7}, "terminal"),
    ({"region": "nörth"}, "region"),
    ({"member": "m:1"}, "member"),
    ({"roles": []}, "roles"),
    ({"roles": "pos"}, "roles"),
    ({"roles": ["pos", "admin"]}, "roles"),
    ({"ttl": 0}, "ttl"),
    ({"ttl": -5}, "ttl"),
    ({"ttl": float("inf")}, "ttl"),
    ({"ttl": float("nan")}, "ttl"),
    ({"ttl": "1d"}, "ttl"),
    ({"ttl": 1e300}, "ttl"),
    ({"now": -1}, "now"),
])
def test_issue_token_validates_arguments(changes, field):
    with pytest.raises(ValueError) as info:
        make(**changes)
    assert str(info.value).startswith(f"{field}: ")


def test_empty_secret_and_bad_leeway_are_caller_errors():
    with pytest.raises(ValueError):
        issue_token("", tenant="acme", store="s1", terminal="t", roles=["pos"])
    with pytest.raises(ValueError):
        verify_token("", make())
    with pytest.raises(ValueError):
        verify_token(SECRET, make(), leeway=-1)


# --------------------------------------------------------------------------
# `tillwire token` as a real process


def tillwire_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLWIRE_")}
    env.update(extra)
    return env


def run_tillwire(command: list[str], args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command + args, env=tillwire_env(**env), capture_output=True, text=True, timeout=60)


SCRIPT = Path(sys.executable).parent / "tillwire"
TOKEN_ARGS = ["token", "--tenant", "acme", "--store", "s1", "--region", "north", "--terminal", "till-9",
              "--role", "pos", "--role", "staff", "--ttl", "1h"]


def test_console_script_is_installed():
    assert SCRIPT.exists(), f"{SCRIPT} is missing: run `pip install --no-build-isolation -e .`"


@pytest.mark.parametrize("command", [[str(SCRIPT)], [sys.executable, "-m", "tillwire"]],
                         ids=["console-script", "python-m"])
def test_cli_token_subprocess(command):
    proc = run_tillwire(command, TOKEN_ARGS, TILLWIRE_SECRET=SECRET)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip().splitlines()[-1]
    claims = verify_token(SECRET, token)
    assert claims.address == "terminal:acme/till-9"
    assert (claims.store, claims.region, claims.roles) == ("s1", "north", ("pos", "staff"))
    assert claims.expires_at - claims.issued_at in (3600, 3601)
    assert "terminal:acme/till-9" in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_cli_token_secret_from_config_file(tmp_path):
    path = tmp_path / "tw.toml"
    path.write_text('[auth]\nsecret = "file-secret"\ndefault_ttl = "2h"\n')
    base = ["token", "--tenant", "acme", "--store", "s1", "--terminal", "t1", "--role", "backend"]
    proc = run_tillwire([sys.executable, "-m", "tillwire"], base + ["--config", str(path)])
    assert proc.returncode == 0, proc.stderr
    claims = verify_token("file-secret", proc.stdout.splitlines()[-1])
    assert claims.expires_at - claims.issued_at in (7200, 7201)  # auth.default_ttl
    # TILLWIRE_CONFIG is the default of --config
    proc = run_tillwire([sys.executable, "-m", "tillwire"], base, TILLWIRE_CONFIG=str(path))
    assert proc.returncode == 0, proc.stderr
    assert verify_token("file-secret", proc.stdout.splitlines()[-1]).roles == ("backend",)


def test_cli_token_without_secret_exits_2():
    proc = run_tillwire([sys.executable, "-m", "tillwire"], TOKEN_ARGS)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "tillwire: config error: auth.secret" in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--tenant", "ac me", "--store", "s1", "--terminal", "t", "--role", "pos"], "tenant"),
    (["--tenant", "acme", "--store", "s1", "--terminal", "t", "--role", "root"], "--role"),
    (["--tenant", "acme", "--store", "s1", "--terminal", "t", "--role", "pos", "--ttl", "0"], "--ttl"),
    (["--tenant", "acme", "--store", "s1", "--terminal", "t", "--role", "pos", "--ttl", "soon"], "--ttl"),
    (["--tenant", "acme", "--store", "s1", "--terminal", "t"], "--role"),
])
def test_cli_token_bad_arguments(monkeypatch, capsys, args, needle):
    from tillwire.server import cli

    for name in list(os.environ):
        if name.startswith("TILLWIRE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TILLWIRE_SECRET", SECRET)
    assert cli.main(["token", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in captured.err
