"""The README stays true: its two commands, its first five minutes and its
ten-line till run as written (``readme_run.py``), every config key, the CI
entry point."""

from __future__ import annotations

import pathlib

import pytest

from readme_run import Session, blocks
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


FLOWS = ("server", "shell", "window till", "window staff", "transcript", "shell", "transcript",
         "transcript", "window app", "window agent", "transcript", "file till.py",
         "window till8", "transcript", "shell", "transcript", "shell", "shell answers", "shell", "shell answers")


def test_the_marked_blocks_are_the_flows_of_the_readme():
    marked = [f"{what} {name}".strip() for _, what, name, _ in blocks(README)]
    assert tuple(marked) == FLOWS, f"README.md's readme-test blocks changed: {marked}"
    five = README.index("## The first five minutes")
    till = README.index("## A till in ten lines")
    lines = [line for line, *_ in blocks(README)]
    offsets = [len("\n".join(README.splitlines()[:n])) for n in lines]
    assert all(five < o for o in offsets)
    assert any(o > till for o in offsets), "the ten-line till is not run"


@pytest.mark.timeout(240)
def test_the_first_five_minutes_and_the_till_run_as_written(tmp_path):
    session = Session(tmp_path)
    try:
        done = session.run(README)
    finally:
        session.close()
    assert tuple(done) == FLOWS
    # What the flows left behind is what a user would find.
    assert (tmp_path / "data" / "dev-secret").stat().st_size > 0
    assert (tmp_path / "till.json").exists(), "the ten-line till kept no resume state"
