"""Stopping `moemesh serve`, however the stop arrives, with a real server (its own local Ray, or attached to a
cluster): it stops within a bounded time, exits 128 + the signal, and leaves no process behind.

Each server runs in a new session (and process group), as under a terminal or a supervisor; "leftovers" are processes
of that session, or descendants seen while it served, that are still alive (same PID and start time) after it exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest
from moemesh.cluster.serve.stopping import KILL_GRACE_S, RAY_SHUTDOWN_S

START_TIMEOUT_S = 300.0
DRAIN_S = 5.0
# The bound a stop must meet: the drain, Ray's shutdown and the kill grace (cluster/serve/stopping.py), plus slack
# of Python on a loaded 2-core machine. A hang (the bug this guards against) never ends.
STOP_BOUND_S = DRAIN_S + RAY_SHUTDOWN_S + KILL_GRACE_S + 15.0
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ..., [19] = start time


def _alive(pid: int, start: str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[19] == start and stat[0] not in ("Z", "X")


def _processes() -> dict[int, list[str]]:
    return {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}


def _family(root: int, session: int | None = None) -> dict[int, str]:
    """{pid: start time} of `root`'s descendants and of the processes of `session`."""
    procs = _processes()
    family = {pid for pid, s in procs.items() if int(s[3]) == session}
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid, s in procs.items():
            if int(s[1]) == parent and pid not in family | {root}:
                family.add(pid)
                todo.append(pid)
        family.add(parent)
    return {pid: procs[pid][19] for pid in family if pid in procs}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # the session's token is set by tests/conftest.py; a local Ray started here uses it
    return env


class Server:
    """`moemesh serve` on the built-in deployment of `model_dir`, in a new session, its output to a log file (through
    `tee` when `piped`) or to a pseudo-terminal (`terminal`)."""

    def __init__(self, tmp_path: Path, model_dir: Path, *extra: str, piped: bool = False, terminal: bool = False):
        self.port = _free_port()
        self.log = tmp_path / "serve.log"
        config = tmp_path / "serve.yaml"
        config.write_text(f"model: {model_dir}\ningress: {{model_name: tiny}}\nexperts: {{shards: 1}}\n"
                          "engram: {shards: 1}\n")  # the fewest processes: four replicas
        cmd = [sys.executable, "-m", "moemesh.cluster.cli", "serve", str(config), "--port", str(self.port),
               "--drain-timeout", str(DRAIN_S), *extra]
        self.shell = self.master = None
        self._output = bytearray()
        if terminal:
            self.master, slave = pty.openpty()

            def controlling_terminal():  # after setsid: the pty becomes our terminal, we its foreground group
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)

            self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=_env(),
                                         start_new_session=True, preexec_fn=controlling_terminal)
            os.close(slave)
            threading.Thread(target=self._read_terminal, daemon=True).start()
        elif piped:  # as a shell runs `moemesh serve ... | tee serve.log`: both in one process group
            self.shell = subprocess.Popen(["bash", "-c", '"$@" | tee "$LOG" >/dev/null; exit ${PIPESTATUS[0]}', "sh",
                                           *cmd], stdin=subprocess.DEVNULL, env={**_env(), "LOG": str(self.log)},
                                          start_new_session=True)
            self.proc = _Child(self.shell.pid, "moemesh.cluster.cli")
        else:
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             env=_env(), start_new_session=True)
        self.family: dict[int, str] = {}
        self.session: int | None = None

    def _read_terminal(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._output += chunk

    def output(self) -> str:
        if self.master is not None:
            return self._output.decode(errors="replace")
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "moemesh is serving" not in self.output():
            assert self.proc.poll() is None, f"moemesh serve exited {self.proc.returncode}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving after {START_TIMEOUT_S} s:\n{self.output()[-4000:]}"
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{self.port}/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "The expert", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        self.session = os.getsid(self.proc.pid)
        self.family = _family(self.proc.pid, self.session)
        assert any("raylet" in _cmdline(p) for p in self.family) or "--address" in self.proc.args

    def wait_exit(self) -> tuple[int, float]:
        started = time.monotonic()
        try:
            code = self.proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"moemesh serve still running {STOP_BOUND_S} s after the stop:\n{self.output()[-4000:]}")
        return code, time.monotonic() - started

    def leftovers(self, settle_s: float = 5.0) -> list[str]:
        """What is still alive of the server's session and its descendants (waits up to `settle_s` for processes
        already dying, e.g. SIGKILLed a moment ago)."""
        family = {**self.family, **_family(self.proc.pid, self.session)}
        family.pop(self.proc.pid, None)
        if self.shell is not None:
            family.pop(self.shell.pid, None)
        deadline = time.monotonic() + settle_s
        while True:
            alive = [f"{pid} {_cmdline(pid)[:150]}" for pid, start in family.items() if _alive(pid, start)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def kill(self) -> None:
        """Clean-up after a failed test: SIGKILL everything of the server's that is left."""
        family = {**self.family, **_family(self.proc.pid, self.session)}
        for pid, start in family.items():
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.master is not None:
            os.close(self.master)


class _Child:
    """The Popen-like face of a process started by a shell: its PID and exit status (read from the shell)."""

    def __init__(self, shell_pid: int, marker: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while True:
            found = [p for p in _family(shell_pid, shell_pid) if p != shell_pid and marker in _cmdline(p)]
            if found:
                self.pid = min(found)
                break
            assert time.monotonic() < deadline, f"no {marker} under the shell"
            time.sleep(0.05)
        self.shell_pid, self.args, self.returncode = shell_pid, ["moemesh", "serve"], None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.shell_pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("moemesh serve", timeout)
            time.sleep(0.05)
        return self.returncode


@pytest.fixture
def server(tmp_path, tiny_model_dir, ray_cluster):
    """Starts servers; the session's cluster (`ray_cluster`) runs beside them as a bystander Ray on this machine: a
    server without --address must start its own Ray and never join it, and no stop may touch it."""
    import ray

    started: list[Server] = []

    def start(*extra: str, **kw) -> Server:
        s = Server(tmp_path, tiny_model_dir, *extra, **kw)
        started.append(s)
        s.wait_ready()
        return s

    yield start
    for s in started:
        s.kill()
    assert all(node["Alive"] for node in ray.nodes()), "a stop touched the bystander cluster"


def test_sigterm_to_the_whole_process_group_stops_everything(server):
    """What systemd's KillMode=control-group, supervisors and `kill -- -PGID` send: Ray's processes get the SIGTERM
    at the same moment as the server."""
    s = server()
    os.killpg(os.getpgid(s.proc.pid), signal.SIGTERM)
    code, took = s.wait_exit()
    assert code == 128 + signal.SIGTERM, s.output()[-3000:]
    assert s.leftovers() == [], s.output()[-3000:]
    print(f"stopped in {took:.1f} s")


def test_stop_when_ray_is_already_gone(server):
    """The local Ray's GCS dies first (as when `ray down` ran before the server was stopped): SIGTERM still stops
    within the bound and nothing of the local Ray is left."""
    s = server()
    (gcs,) = [pid for pid in s.family if "gcs_server" in _cmdline(pid)]
    os.kill(gcs, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(gcs, s.family[gcs]) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(s.proc.pid, signal.SIGTERM)
    code, took = s.wait_exit()
    assert code == 128 + signal.SIGTERM, s.output()[-3000:]
    assert s.leftovers() == [], s.output()[-3000:]
    print(f"stopped in {took:.1f} s")


def test_ctrl_c_with_the_output_piped_to_tee(server):
    """`moemesh serve | tee serve.log` and Ctrl-C: the terminal sends SIGINT to the whole foreground group, tee
    included, so the server loses its stdout while stopping."""
    s = server(piped=True)
    os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)
    code, took = s.wait_exit()
    assert code == 128 + signal.SIGINT
    assert s.leftovers() == [], s.output()[-3000:]
    print(f"stopped in {took:.1f} s")


def test_second_ctrl_c_in_a_terminal_stops_at_once(server):
    """In a real (pseudo-)terminal: the first Ctrl-C starts draining, the second kills what is left at once."""
    s = server(terminal=True)
    os.write(s.master, b"\x03")
    deadline = time.monotonic() + 60
    while "stopping" not in s.output():
        assert time.monotonic() < deadline and s.proc.poll() is None, s.output()[-3000:]
        time.sleep(0.05)
    os.write(s.master, b"\x03")
    code, took = s.wait_exit()
    assert code == 128 + signal.SIGINT, s.output()[-3000:]
    assert "stopping now" in s.output() or took < 2.0, s.output()[-3000:]
    assert s.leftovers() == [], s.output()[-3000:]
    print(f"stopped in {took:.1f} s after the second Ctrl-C")


_HEAD = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6})
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes our stdin
cluster.shutdown()
"""

_APPS = """
import sys
import ray
from ray import serve
ray.init(address=sys.argv[1], namespace="moemesh-tests-probe")
print(sorted(serve.status().applications), flush=True)
"""


def test_attached_server_removes_its_app_and_leaves_the_cluster(server, tmp_path):
    """`moemesh serve --address`: a stop removes the application (drained) and leaves the cluster running."""
    head = subprocess.Popen([sys.executable, "-c", _HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=_env(), text=True)
    try:
        address = head.stdout.readline().strip()
        assert address, "the cluster did not start"
        s = server("--address", address)
        assert [pid for pid in s.family if "raylet" in _cmdline(pid) and pid != s.proc.pid] == []
        os.kill(s.proc.pid, signal.SIGTERM)
        code, _ = s.wait_exit()
        assert code == 128 + signal.SIGTERM, s.output()[-3000:]
        assert s.leftovers() == []
        apps = subprocess.run([sys.executable, "-c", _APPS, address], capture_output=True, text=True, env=_env(),
                              timeout=120)
        assert apps.returncode == 0, apps.stderr[-3000:]  # the cluster is still there ...
        assert "moemesh" not in apps.stdout.strip().splitlines()[-1]  # ... without our application
    finally:
        head.stdin.close()
        head.wait(timeout=120)
