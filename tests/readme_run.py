"""Run README.md's marked blocks as a user would (tests/test_readme.py).

A block the README wants run is a fenced block right after an HTML comment
``<!-- readme-test: WHAT [NAME] -->``:

* ``server``: the block is ``make run``; it is run from a scratch
  directory that holds the repository's ``.venv`` (``make -o`` keeps make
  from rebuilding it there), so its ``data/`` is the scratch directory's;
* ``shell``: bash runs the block in the scratch directory (``set -e``, and
  the variables it sets stay set for the blocks after it, as in one shell);
  ``shell answers``: and what it prints is what its ``# {...}`` comment
  lines (and their ``#  ...`` continuations) say, ``…`` matching any text;
* ``window NAME``: bash starts the block as a long-running program (a
  terminal window), its stdin and stdout kept for transcripts;
* ``file NAME``: the block is saved as that file;
* ``transcript``: lines ``NAME > text`` are typed into window NAME, lines
  ``NAME | text`` must be printed by it (in any order after what it printed
  for earlier lines; ``…`` matches any text, ``<word>`` an id, remembered
  and typed where a later line says ``<word>``).

Everything runs in a network namespace of its own where the system allows
one (``unshare``), so the README's ports (7070 and 7071) are free whatever
else runs on the machine; elsewhere on the machine's loopback, which then
needs those ports free.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!-- readme-test: (\w+)(?: (\S+))? -->\Z")
PORTS = (7070, 7071)
WAIT = 30.0            # seconds a transcript line may take to appear

# Brings the namespace's loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP),
# then holds the namespace until killed.
_HOLD = ("import fcntl, signal, socket, struct\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH', b'lo', 0)))[1]\n"
         "fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', flags | 1))\n"
         "print('up', flush=True)\n"
         "signal.pause()\n")


def blocks(text: str) -> list[tuple[int, str, str, str]]:
    """``(line, what, name, content)`` of every marked block, in order."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = MARK.fullmatch(line.strip())
        if not match:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        assert fence.startswith("```"), f"README.md:{i + 1}: a readme-test mark must precede a ``` block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        found.append((i + 1, match.group(1), match.group(2) or "", "\n".join(lines[i + 2:end])))
    return found


class Window:
    """A long-running program of the README, its output read by a thread."""

    def __init__(self, name: str, proc: subprocess.Popen) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.used: set[int] = set()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self.changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.changed.notify_all()

    def type(self, text: str) -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, pattern: re.Pattern, shown: str) -> re.Match:
        """The first line not matched before that matches ``pattern``."""
        deadline = time.monotonic() + WAIT
        with self.changed:
            while True:
                for i, line in enumerate(self.lines):
                    match = pattern.fullmatch(line) if i not in self.used else None
                    if match:
                        self.used.add(i)
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    printed = "\n    ".join(self.lines) or "(nothing)"
                    raise AssertionError(f"window {self.name}: no line like\n    {shown}\n"
                                         f"  it printed:\n    {printed}")
                self.changed.wait(min(left, 0.5))


def line_pattern(text: str) -> re.Pattern:
    """A transcript line as a regular expression: ``…`` any text, ``<word>`` an id."""
    parts = re.split(r"(…|<[a-z]+>)", text.strip())
    out = []
    for part in parts:
        if part == "…":
            out.append(".*?")
        elif re.fullmatch(r"<[a-z]+>", part):
            name = part[1:-1]
            group = f"(?P={name})" if name in out_names(out) else f"(?P<{name}>[^\\s\"',]+)"
            out.append(group)
        else:
            out.append(re.escape(part))
    return re.compile(r"\s*" + "".join(out) + r"\s*")


def answer_lines(content: str) -> list[str]:
    """The answers a shell block's comments show: ``# {...`` lines and their
    ``#  ...`` continuations (other comments are prose)."""
    lines, going = [], False
    for text in content.splitlines():
        going = text.startswith("# {") or (going and text.startswith("#  "))
        if going:
            lines.append(text[1:].strip())
    return lines


def out_names(parts: list[str]) -> set[str]:
    return set(re.findall(r"\(\?P<([a-z]+)>", "".join(parts)))


class Session:
    """The README's blocks run one after another, as a user would."""

    def __init__(self, scratch: pathlib.Path) -> None:
        self.scratch = scratch
        (scratch / ".venv").symlink_to(ROOT / ".venv")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("TILLWIRE_") and k not in ("PYTEST_CURRENT_TEST",)}
        # Output as a terminal shows it: line by line.
        self.env["PYTHONUNBUFFERED"] = "1"
        self.values: dict[str, str] = {}
        self.windows: dict[str, Window] = {}
        self.procs: list[subprocess.Popen] = []
        self.prefix: list[str] = []
        self.holder = None
        self.isolated = self._namespace()

    # -- the network namespace -----------------------------------------------------------

    def _namespace(self) -> bool:
        """Enter a network namespace of our own if the system allows it."""
        try:
            holder = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--net", str(ROOT / ".venv/bin/python"),
                 "-c", _HOLD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError:
            return self._host_ports()
        if holder.stdout.readline().strip() != b"up":
            holder.kill()
            holder.wait()
            return self._host_ports()
        self.holder = holder
        self.prefix = ["nsenter", "-t", str(holder.pid), "--user", "--net",
                       "--preserve-credentials", "--"]
        return True

    @staticmethod
    def _host_ports() -> bool:
        for port in PORTS:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise AssertionError(
                        f"the README's flows need 127.0.0.1:{port} ({exc}), and this system gives "
                        "no network namespace of their own (unshare --user --net): free the port"
                    ) from None
        return False

    # -- blocks ---------------------------------------------------------------------------

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(self.prefix + argv, cwd=self.scratch, env=self.env,
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def server(self, content: str) -> None:
        assert content.strip() == "make run", f"the server block is {content!r}, not make run"
        proc = self.start(["make", "-s", "-f", str(ROOT / "Makefile"), "-o", ".venv/.installed",
                           "run"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
        window = self.windows["server"] = Window("server", proc)
        window.expect(line_pattern("…admin API listening…port=7071…"), "admin API listening")

    def shell(self, content: str, line: int, answers: bool = False) -> None:
        dump = self.scratch / ".readme-env"
        script = f"set -ea\n{content}\nenv -0 > {shlex.quote(str(dump))}\n"
        proc = self.start(["bash", "-c", script], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (
            f"README.md:{line}: the block failed (exit {proc.returncode}):\n{content}\n"
            f"stdout: {out.decode()}\nstderr: {err.decode()}")
        self.env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
        if answers:
            said = "".join(answer_lines(content))
            assert said.startswith("{"), f"README.md:{line}: no '# {{...}}' answer to check"
            printed = "".join(out.decode().split())
            assert line_pattern(said).fullmatch(printed), (
                f"README.md:{line}: the block printed\n  {printed}\nthe README says\n  {said}")

    def window(self, name: str, content: str) -> None:
        proc = self.start(["bash", "-c", content], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.windows[name] = Window(name, proc)

    def file(self, name: str, content: str) -> None:
        (self.scratch / name).write_text(content + "\n")

    def transcript(self, content: str, line: int) -> None:
        for offset, text in enumerate(content.splitlines(), start=1):
            match = re.fullmatch(r"(\w+)\s+([>|])\s?(.*)", text)
            assert match, f"README.md:{line + offset}: not 'NAME > typed' or 'NAME | printed': {text!r}"
            name, what, rest = match.groups()
            assert name in self.windows, f"README.md:{line + offset}: no window {name!r}"
            window = self.windows[name]
            if what == ">":
                window.type(re.sub(r"<([a-z]+)>", lambda m: self.values[m.group(1)], rest))
            else:
                found = window.expect(line_pattern(rest), rest)
                self.values.update(found.groupdict())

    def run(self, text: str) -> list[str]:
        """Run every marked block of ``text``; returns what was run (for the test)."""
        done = []
        for line, what, name, content in blocks(text):
            if what == "server":
                self.server(content)
            elif what == "shell":
                assert name in ("", "answers"), f"README.md:{line}: shell {name!r}"
                self.shell(content, line, answers=name == "answers")
            elif what == "window":
                self.window(name, content)
            elif what == "file":
                self.file(name, content)
            elif what == "transcript":
                self.transcript(content, line)
            else:
                raise AssertionError(f"README.md:{line}: unknown readme-test block {what!r}")
            done.append(f"{what} {name}".strip())
        return done

    def close(self) -> None:
        """Stop the windows, then the server (SIGTERM: it drains), then the namespace."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()
