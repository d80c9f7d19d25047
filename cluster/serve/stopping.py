"""How `moemesh serve` stops: bounded, whatever the signal and whatever state Ray is in, and leaving no process behind.

A stop can arrive as Ctrl-C in a terminal (SIGINT to the foreground process group), `kill PID`, SIGTERM to the whole
process group or cgroup (systemd's default `KillMode=control-group`, supervisors, `kill -- -PGID`: Ray's own
processes get it at the same moment and may already be dead), SIGHUP when the terminal goes away, or after Ray is gone
altogether (`ray down` first). Every path runs the same sequence, each step bounded:

1. remove the application (`serve.delete`: Serve drains in-flight requests), at most `drain_s`, and only while Ray's
   GCS still answers: a dead GCS ends the wait at once instead of hanging in Ray's client;
2. disconnect from Ray (`ray.shutdown`: for a local Ray this also stops the processes `ray.init` started), at most
   `RAY_SHUTDOWN_S`;
3. end every process this one started, directly or not (`ProcessTree`): SIGTERM, `KILL_GRACE_S`, then SIGKILL;
4. exit at once (`os._exit`, so no atexit hook can wait on a dead Ray again) with 128 + the signal's number.

A second signal during the sequence skips to step 3 with SIGKILL. Attached to an existing cluster (`--address`),
the process has started nothing of Ray's, so step 3 finds nothing and the cluster is left alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

DRAIN_S = 10.0  # default bound on step 1 (`moemesh serve --drain-timeout`)
RAY_SHUTDOWN_S = 5.0
KILL_GRACE_S = 3.0
POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by the first stop signal (a KeyboardInterrupt, so library code treats it as Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ForceStop(BaseException):
    """Raised in the main thread by a second stop signal while stopping: skip to killing what is left."""


class ProcessTree:
    """The processes this one started, directly or through others.

    On Linux the process makes itself a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`) when this is created, before
    Ray starts anything: a process whose parent dies (the raylet's agents and workers when the raylet is killed) is
    re-parented to this one instead of to init, so it is still found here and can still be ended. Elsewhere the tree is
    read with `ps` and an orphan can escape it.
    """

    def __init__(self):
        self.pid = os.getpid()
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            except (OSError, AttributeError):
                pass  # no prctl: orphans reparent to init and escape the tree, as elsewhere

    def descendants(self) -> list[int]:
        """PIDs of every live descendant (zombies included: they are reaped by `end_all`)."""
        children: dict[int, list[int]] = {}
        for pid, ppid in _parent_pids():
            children.setdefault(ppid, []).append(pid)
        found, todo = [], [self.pid]
        while todo:
            for child in children.get(todo.pop(), ()):
                found.append(child)
                todo.append(child)
        return found

    def end_all(self, grace_s: float = KILL_GRACE_S) -> list[int]:
        """SIGTERM every descendant, wait up to `grace_s` for them to go, SIGKILL the rest (processes started
        meanwhile included), reap what is ours to reap. Returns the PIDs that were signalled."""
        signalled = set(self._signal_all(signal.SIGTERM if grace_s > 0 else signal.SIGKILL))
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._live():
            self._reap()
            time.sleep(POLL_S)
        for _ in range(3):  # a dying parent may start or orphan one more process: repeat until nothing is left
            live = self._live()
            if not live:
                break
            signalled.update(self._signal_all(signal.SIGKILL))
            time.sleep(POLL_S)
            self._reap()
        self._reap()
        return sorted(signalled)

    def _signal_all(self, sig: int) -> list[int]:
        sent = []
        for pid in self.descendants():
            try:
                os.kill(pid, sig)
                sent.append(pid)
            except ProcessLookupError:
                pass
        return sent

    def _live(self) -> list[int]:
        return [pid for pid in self.descendants() if _state(pid) not in ("Z", "X", None)]

    @staticmethod
    def _reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


def _parent_pids() -> list[tuple[int, int]]:
    proc = Path("/proc")
    if proc.is_dir():
        pairs = []
        for entry in proc.iterdir():
            if entry.name.isdigit():
                stat = _read_stat(int(entry.name))
                if stat is not None:
                    pairs.append((int(entry.name), int(stat[1])))
        return pairs
    import subprocess

    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False).stdout
    return [(int(a), int(b)) for a, b in (line.split() for line in out.splitlines() if line.strip())]


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _state(pid: int) -> str | None:
    stat = _read_stat(pid)
    if stat is not None:
        return stat[0]
    try:
        os.kill(pid, 0)
        return "?"
    except ProcessLookupError:
        return None


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP handlers for the main thread: the first raises `StopRequested`, any later one
    (while `stopping`) raises `ForceStop`."""

    def __init__(self):
        self.signum: int | None = None
        self.stopping = False

    def install(self) -> StopSignals:
        """(Re)install the handlers; call again after `ray.init`, which sets its own SIGTERM handler."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.stopping:
            raise ForceStop()
        self.signum = signum
        raise StopRequested(signum)

    def exit_status(self) -> int:
        """128 + the signal that stopped us (130 for Ctrl-C, 143 for SIGTERM), the shells' convention."""
        return 128 + (self.signum or signal.SIGINT)


def gcs_reachable(timeout_s: float = 0.5) -> bool:
    """Whether the GCS of the Ray this process is connected to accepts a TCP connection (False when not connected)."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except Exception:  # noqa: BLE001 - any failure to reach it means "not reachable"
        return False


def _bounded(call: Callable[[], object], limit_s: float, keep_waiting: Callable[[], bool] = lambda: True) -> bool:
    """Run `call` in a daemon thread; wait until it returns, `limit_s` passes or `keep_waiting()` turns False.
    Returns whether it finished. The main thread stays responsive to signals meanwhile."""
    done = threading.Event()

    def run():
        try:
            call()
        except Exception:  # noqa: BLE001 - Ray errors while stopping are expected when Ray is going away
            pass
        finally:
            done.set()

    threading.Thread(target=run, name="moemesh-stop", daemon=True).start()
    deadline = time.monotonic() + limit_s
    while not done.wait(POLL_S):
        if time.monotonic() >= deadline or not keep_waiting():
            return False
    return True


def say(text: str) -> None:
    """One line on stderr; never fails (the reader, e.g. `| tee`, may be gone already)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def stop_serving(signals: StopSignals, tree: ProcessTree, app_name: str, drain_s: float = DRAIN_S) -> int:
    """Run the stop sequence of the module docstring (also after a failed start-up, `signals.signum` unset); returns
    the exit status for `exit_now`."""
    signals.stopping = True
    try:
        import ray
        from ray import serve

        if ray.is_initialized() and gcs_reachable():
            if signals.signum is not None:
                say(f"moemesh: stopping: draining requests (at most {drain_s:g} s; Ctrl-C again to stop now)")
            if not _bounded(lambda: serve.delete(app_name), drain_s, gcs_reachable):
                say("moemesh: Ray did not finish removing the application in time; stopping anyway")
            if gcs_reachable():  # a dead GCS can hang ray.shutdown's disconnect: step 3 ends its processes instead
                _bounded(ray.shutdown, RAY_SHUTDOWN_S)
        elif ray.is_initialized():
            say("moemesh: stopping: Ray is gone, nothing to drain")
        left = tree.end_all(KILL_GRACE_S)
    except ForceStop:
        for sig in STOP_SIGNALS:  # a third signal must not interrupt the kill itself
            signal.signal(sig, signal.SIG_IGN)
        say("moemesh: stopping now")
        left = tree.end_all(0)
    if left:
        say(f"moemesh: ended {len(left)} leftover process(es)")
    return signals.exit_status()


def exit_now(status: int) -> None:
    """Flush what can be flushed and leave without atexit hooks (Ray's would wait on a Ray that may be gone)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
