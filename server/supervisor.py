"""``tillwire serve --workers N``: a node of N worker processes.

The supervisor forks N workers before any event loop exists; each is a
whole server (``main.run``) over the fleet's Redis, binding the terminal
port and the admin port with SO_REUSEPORT so the kernel spreads new
connections over them.  The supervisor itself holds no socket, no Redis
connection and no thread: it only starts, watches and stops its workers.

* A worker that cannot start (exits with an error status within
  ``STEADY`` seconds of the node's start: the port taken, Redis
  unreachable) stops the node with status 1: its cause is the one line it
  logged.  (One killed by a signal is started again, as below.)
* A worker that exits while the node is not stopping (a crash, kill -9,
  an admin drain of that worker) is started again under the same name:
  at once if it had run for a while, else after a delay that doubles up to
  ``RESTART_MAX`` (a worker that cannot start does not spin).  Its
  terminals reconnect meanwhile to the other workers and nodes: their
  P0/P1 messages wait in the store.
* SIGTERM or SIGINT drains the workers one at a time (each sends its
  terminals GOAWAY with jittered delays and waits for their acks, as a
  single server does), so a rolling restart moves terminals to the
  workers still running and to other nodes without loss.  A second signal
  stops the remaining workers together and ends the running drain.
* Each worker writes its own audit file (``audit.w<index>.log`` beside
  the configured one): no two processes rotate one file.

The exit status is 0 when every worker drained and exited 0, else 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

from .config import Config, audit_log_path

log = logging.getLogger("tillwire.supervisor")

POLL = 0.1                   # seconds between looks at the workers
RESTART_MIN = 0.5            # seconds before restarting a worker that died
RESTART_MAX = 30.0           # longest wait before restarting a worker that keeps dying
STEADY = 10.0                # a worker that ran this long restarts after RESTART_MIN again
STOP_TIMEOUT = 60.0          # longest wait for one draining worker before SIGKILL
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the
    supervisor) dies (prctl PR_SET_PDEATHSIG); a no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)     # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_config(cfg: Config, index: int) -> Config:
    """Worker ``index``'s configuration: its own audit file."""
    base, ext = os.path.splitext(audit_log_path(cfg))
    return dataclasses.replace(cfg, log=dataclasses.replace(
        cfg.log, audit_path=f"{base}.w{index}{ext or '.log'}"))


class Supervisor:
    """Starts, restarts and stops the workers of one node."""

    def __init__(self, cfg: Config, node_id: str, worker_main) -> None:
        """``worker_main(cfg, index, node_id) -> int`` runs in each forked
        worker and returns its exit status."""
        self.cfg = cfg
        self.node_id = node_id
        self.worker_main = worker_main
        self.count = cfg.server.workers
        self.pid = os.getpid()
        self.pids: dict[int, int] = {}           # pid -> worker index
        self.started: dict[int, float] = {}      # index -> when its process started
        self.delay: dict[int, float] = {}        # index -> its next restart delay
        self.due: dict[int, float] = {}          # index -> when it is to be started again
        self.signals: list[str] = []
        self.failed = False
        self.first = set(range(self.count))      # workers not yet past their first start

    # -- processes --------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        # The worker starts with SIGTERM and SIGINT blocked: one sent while it
        # starts stays pending until its event loop handles them (main.run
        # unblocks them then) rather than killing it half-started.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        finally:
            if os.getpid() == self.pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if pid == 0:                             # the worker
            status = 1
            try:
                # Its own process group: a Ctrl-C at the terminal reaches the
                # supervisor only, which drains the workers one at a time; and
                # it ends if the supervisor dies (SIGKILL) rather than serve on.
                os.setpgid(0, 0)
                _die_with_parent()
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                status = self.worker_main(worker_config(self.cfg, index), index, self.node_id)
            except BaseException:
                logging.getLogger("tillwire.server").exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status if isinstance(status, int) else 1)
        self.pids[pid] = index
        self.started[index] = time.monotonic()
        log.info("worker %d started pid=%d node=%s", index, pid, self.node_id)

    def _reap(self) -> list[tuple[int, int]]:
        """(index, status) of the workers that exited since the last look."""
        gone = []
        while self.pids:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if index is not None:
                gone.append((index, os.waitstatus_to_exitcode(raw)))
        return gone

    # -- the run ----------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("node=%s starting %d workers on port %s (redis prefix %s)", self.node_id,
                 self.count, self.cfg.server.port, self.cfg.redis.prefix)
        for index in range(self.count):
            self._spawn(index)
        while not self.signals:
            for index, status in self._reap():
                self._died(index, status)
            now = time.monotonic()
            for index in [i for i in self.first if now - self.started.get(i, now) >= STEADY]:
                self.first.discard(index)
            for index, when in list(self.due.items()):
                if when <= now and not self.signals:
                    del self.due[index]
                    self._spawn(index)
            time.sleep(POLL)
        self._stop()
        return 1 if self.failed else 0

    def _died(self, index: int, status: int) -> None:
        ran = time.monotonic() - self.started.get(index, 0.0)
        if index in self.first and status > 0 and ran < STEADY:
            # It could not start (its one-line cause is logged above): the
            # node does not run short of a worker, it stops and says so.
            log.error("worker %d could not start (status %d); stopping the node", index, status)
            self.failed = True
            self.signals.append("start failure")
            return
        self.first.discard(index)
        delay = RESTART_MIN if ran >= STEADY else min(
            RESTART_MAX, max(RESTART_MIN, 2 * self.delay.get(index, RESTART_MIN / 2)))
        self.delay[index] = delay
        self.due[index] = time.monotonic() + delay
        how = f"signal {-status}" if status < 0 else f"status {status}"
        log.warning("worker %d exited (%s) after %.1f s; starting it again in %g s",
                    index, how, ran, delay)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.signals.append(name)
        if len(self.signals) > 1:
            log.warning("%s again: stopping every worker now", name)
            for pid in list(self.pids):
                self._kill(pid, signal.SIGTERM)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _stop(self) -> None:
        """Drain the workers one at a time (all at once after a second signal)."""
        log.info("node=%s draining %d workers one at a time on %s", self.node_id,
                 len(self.pids), self.signals[0])
        self.due.clear()
        for pid, index in sorted(self.pids.items(), key=lambda item: item[1]):
            if pid not in self.pids:
                continue
            self._kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid in self.pids:
                for gone, status in self._reap():
                    self._stopped(gone, status)
                if pid in self.pids and time.monotonic() > deadline:
                    log.error("worker %d did not stop in %g s: killing it", index, STOP_TIMEOUT)
                    self._kill(pid, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(POLL)
        log.info("node=%s stopped", self.node_id)

    def _stopped(self, index: int, status: int) -> None:
        if status != 0:
            self.failed = True
        log.info("worker %d stopped (status %d)", index, status)


def serve_workers(cfg: Config, node_id: str, worker_main) -> int:
    """Run the node's workers until a signal; returns the exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    return Supervisor(cfg, node_id, worker_main).run()
