"""The README stays true: its two commands, every config key, the CI entry point."""

from __future__ import annotations

import pathlib

from tillwire.server.config import NON_CONFIG_ENV, describe_keys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    head = README.split("\n## ", 1)[0]
    assert "make run" in head and "make test" in head


def test_every_config_key_and_variable_is_documented():
    for key, env, _default, _desc in describe_keys():
        assert f"`{key}`" in README, f"README does not document {key}"
        assert f"`{env}`" in README, f"README does not list {env}"
    for var in NON_CONFIG_ENV:
        assert f"`{var}`" in README, f"README does not list {var}"
    assert "`TILLWIRE_SECRET`" in README or "alias TILLWIRE_SECRET" in README


def test_ci_runs_make_test_and_nothing_else():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert "make test" in commands
    assert not any("pytest" in c or "pip " in c for c in commands)
