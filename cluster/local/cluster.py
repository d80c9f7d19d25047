"""One local Ray cluster's bookkeeping on disk: where its nodes live, which processes are theirs, how to stop them.

Plain files and /proc, no Ray: `provider.py` (the node provider `ray up` uses) builds on it, and
`python -m moemesh.cluster.local.cluster` is its command line (see `main`).

Layout of a cluster directory (default `/tmp/moemesh-<uid>/<cluster_name>`, or `provider.cluster_dir`):

    state.json   {"next_id": n, "nodes": {node id: {"tags": {...}, "sessions": [sid, ...]}}}; every reader and
                 writer holds an exclusive lock on `state.lock` (`ray up`, `ray down` and the autoscaler's monitor
                 are different processes and all edit it)
    auth_token   the cluster's own Ray token (mode 0600); node commands get RAY_AUTH_TOKEN_PATH pointing here
    bin/ray      a `ray` wrapper first on the PATH of node commands: `ray stop` stops this node only (plain
                 `ray stop` kills every Ray process on the machine, other clusters' too); anything else runs Ray
    <node id>/   the node's Ray `--temp-dir` (its sessions and logs); `<node id>/home/` is its `~` for file mounts
                 and the working directory of its commands

Which processes are a node's: every command the runner runs for a node starts a new session (setsid) whose id is
recorded in `sessions`; Ray's daemons, workers and dashboard children never leave the session they were started in.
As a second net, every such command also carries MOEMESH_LOCAL_CLUSTER=<dir> and MOEMESH_LOCAL_NODE=<node id> in its
environment, which children inherit. Stopping sends SIGTERM, then SIGKILL after a grace period, only to processes of
this user found that way, never by name. A recorded session id could in principle be reused by an unrelated new
session once all its processes are gone; sessions are pruned whenever the state is touched, so that window is tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

ENV_CLUSTER = "MOEMESH_LOCAL_CLUSTER"   # cluster directory, in the environment of every node command
ENV_NODE = "MOEMESH_LOCAL_NODE"         # node id, likewise
ROOT = Path("/tmp") / f"moemesh-{os.getuid()}"   # fixed (not $TMPDIR): `ray down` from another shell must find it
MAX_NODE_DIR = 43   # Ray's socket paths `<temp dir>/session_<date>_<pid>/sockets/plasma_store` must fit in 107 bytes
KIND_TAG = "ray-node-type"   # ray.autoscaler.tags.TAG_RAY_NODE_KIND (its values: "head", "worker")
STOP_GRACE_S = 15.0  # as `ray stop` (16 s): a third for the raylet, the rest, the GCS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_WRAPPER = """#!/bin/sh
# Written by moemesh.cluster.local.cluster. On this local cluster's nodes `ray stop` stops only the node it runs
# on: plain `ray stop` kills every Ray process on the machine, other clusters' too.
if [ "$1" = "stop" ]; then
  exec {python} -m moemesh.cluster.local.cluster stop-node "${env_cluster}" "${env_node}"
fi
exec {ray} "$@"
"""


def cluster_dir(cluster_name: str, provider_config: dict) -> Path:
    """The directory of cluster `cluster_name`: `provider_config["cluster_dir"]` (absolute) if set, else
    /tmp/moemesh-<uid>/<cluster_name>."""
    if not _NAME.match(cluster_name or ""):
        raise ValueError(f"cluster_name: {cluster_name!r} must be letters, digits, '.', '_' or '-' (it names a "
                         "directory)")
    path = Path(provider_config.get("cluster_dir") or ROOT / cluster_name).expanduser()
    if not path.is_absolute():      # `ray up`, the head's monitor and `ray down` run in different directories
        raise ValueError(f"provider.cluster_dir: {str(path)!r} must be an absolute path")
    if len(str(path)) + len("/worker-999") > MAX_NODE_DIR:
        raise ValueError(f"provider.cluster_dir: {str(path)!r} is too long ({len(str(path))} chars; at most "
                         f"{MAX_NODE_DIR - len('/worker-999')}) for Ray's socket paths under it; use a shorter "
                         "cluster_name or set provider.cluster_dir")
    return path


class LocalCluster:
    """The files and processes of one local cluster (see the module docstring for the layout)."""

    _lock = threading.Lock()   # flock is per open file; this serialises the threads of one process (the monitor's)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.token_path = self.path / "auth_token"
        self.bin_dir = self.path / "bin"

    def node_dir(self, node_id: str) -> Path:
        return self.path / node_id

    def node_home(self, node_id: str) -> Path:
        return self.path / node_id / "home"

    # ---- setup ----------------------------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the directory, the token (once) and the `ray` wrapper."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        if not self.token_path.exists():
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        ray = Path(sys.executable).with_name("ray")
        ray = str(ray) if ray.exists() else shutil.which("ray")
        if ray is None:
            raise RuntimeError("no `ray` executable next to this Python or on PATH")
        text = _WRAPPER.format(python=shlex.quote(sys.executable), ray=shlex.quote(ray), env_cluster=ENV_CLUSTER,
                               env_node=ENV_NODE)
        tmp = self.bin_dir / f".ray.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, self.bin_dir / "ray")    # atomic: another process may be running the wrapper right now

    # ---- state ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def state(self):
        """The state dict, locked; changes made inside the block are saved."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path / "state.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            file = self.path / "state.json"
            data = json.loads(file.read_text()) if file.exists() else {"next_id": 1, "nodes": {}}
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) != before:
                tmp = file.with_suffix(".tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, file)

    def nodes(self) -> dict[str, dict]:
        if not (self.path / "state.json").exists():
            return {}
        with self.state() as s:
            return s["nodes"]

    def add_nodes(self, prefix: str, tags: dict, count: int) -> list[str]:
        """Register `count` new nodes `<prefix>-<n>` with `tags`; make their directories."""
        ids = []
        with self.state() as s:
            for _ in range(count):
                node_id = f"{prefix}-{s['next_id']}"
                s["next_id"] += 1
                s["nodes"][node_id] = {"tags": dict(tags), "sessions": []}
                self.node_home(node_id).mkdir(parents=True, exist_ok=True)
                ids.append(node_id)
        return ids

    def set_tags(self, node_id: str, tags: dict) -> None:
        with self.state() as s:
            if node_id in s["nodes"]:
                s["nodes"][node_id]["tags"].update(tags)

    def record_session(self, node_id: str, sid: int) -> None:
        """Remember that session `sid` runs on `node_id` (and forget the node's sessions with no process left)."""
        live = {sid for _, sid, _ in _processes()}
        with self.state() as s:
            node = s["nodes"].get(node_id)
            if node is not None:
                node["sessions"] = [x for x in node["sessions"] if x in live] + [sid]

    def remove_nodes(self, node_ids: list[str]) -> None:
        """Stop the nodes' processes (together: one grace period for all), forget the nodes and delete their
        directories (their disks, as a cloud VM's go)."""
        _stop(lambda: [p for node_id in node_ids for p in self.node_pids(node_id)], STOP_GRACE_S)
        with self.state() as s:
            for node_id in node_ids:
                s["nodes"].pop(node_id, None)
        for node_id in node_ids:
            shutil.rmtree(self.node_dir(node_id), ignore_errors=True)

    # ---- clients --------------------------------------------------------------------------------------------------
    def head_address(self) -> str | None:
        """The GCS address (`ip:port`) Ray wrote into the head node's temp dir, once the head has started."""
        for node_id, node in self.nodes().items():
            if node["tags"].get(KIND_TAG) == "head":
                file = self.node_dir(node_id) / "ray_current_cluster"
                if file.exists():
                    return file.read_text().strip() or None
        return None

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) without RAY_* variables, plus what a Ray client of this
        cluster needs: RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        address = self.head_address()
        if address:
            env["RAY_ADDRESS"] = address
        return env

    # ---- processes ------------------------------------------------------------------------------------------------
    def node_pids(self, node_id: str) -> list[tuple[int, int]]:
        """(pid, start time) of every process of this user that belongs to `node_id`, except the caller's own."""
        sessions = set(self.nodes().get(node_id, {}).get("sessions", []))
        marks = (f"{ENV_CLUSTER}={self.path}".encode(), f"{ENV_NODE}={node_id}".encode())
        return [(pid, start) for pid, sid, start in _processes(exclude_self=True)
                if sid in sessions or _environ_has(pid, marks)]

    def all_pids(self) -> list[tuple[int, int]]:
        """Every process of this cluster: of any recorded node, or marked with this cluster in its environment, or
        with this cluster's directory on its command line (what `kill` stops when the state file is gone)."""
        sessions = {sid for node in self.nodes().values() for sid in node.get("sessions", [])}
        mark = (f"{ENV_CLUSTER}={self.path}".encode(),)
        where = f"{self.path}/".encode()
        return [(pid, start) for pid, sid, start in _processes(exclude_self=True)
                if sid in sessions or _environ_has(pid, mark) or where in _read(f"/proc/{pid}/cmdline")]

    def stop_node(self, node_id: str, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM the node's processes, SIGKILL what is left after `grace_s`; returns how many there were."""
        return _stop(lambda: self.node_pids(node_id), grace_s)

    def kill(self, grace_s: float = STOP_GRACE_S) -> int:
        """Stop every process of the cluster (`all_pids`): the way out when `ray down` cannot run."""
        return _stop(self.all_pids, grace_s)


# ---- /proc ---------------------------------------------------------------------------------------------------------
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _processes(exclude_self: bool = False) -> list[tuple[int, int, int]]:
    """(pid, session id, start time) of this user's live processes; with `exclude_self`, not this process, its
    ancestors or its session (a `ray stop` run on a node must not stop itself or the shell that runs it)."""
    uid = os.getuid()
    skip = set()
    if exclude_self:
        pid = os.getpid()
        while pid > 1:
            skip.add(pid)
            st = _stat(pid)
            pid = st[1] if st else 1
    own_sid = os.getsid(0)
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            sid = os.getsid(pid)
        except OSError:
            continue
        st = _stat(pid)
        if st is None or st[0] == "Z" or (exclude_self and sid == own_sid):
            continue
        out.append((pid, sid, st[2]))
    return out


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc/<pid>/stat; None when the process is gone."""
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()      # after "pid (comm) "; comm may hold spaces
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _environ_has(pid: int, marks: tuple[bytes, ...]) -> bool:
    env = set(_read(f"/proc/{pid}/environ").split(b"\0"))
    return all(m in env for m in marks)


def _stop(find, grace_s: float) -> int:
    """SIGTERM what `find()` returns, SIGKILL what is left after `grace_s`, in Ray's own order (as `ray stop`): the
    raylet first (its agents fate-share with it), then everything else, the GCS last."""
    found = find()
    for bucket in (0, 1, 2):
        procs = [p for p in found if _order(p[0]) == bucket]
        _signal(procs, signal.SIGTERM)
        deadline = time.monotonic() + grace_s / 3
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.1)
        _signal(procs, signal.SIGKILL)
    for _ in range(3):      # a dying raylet may still have started a worker
        left = [p for p in find() if _alive(p)]
        if not left:
            break
        _signal(left, signal.SIGKILL)
        time.sleep(0.5)
    return len(found)


def _order(pid: int) -> int:
    program = os.path.basename(_read(f"/proc/{pid}/cmdline").split(b"\0")[0])
    return {b"raylet": 0, b"gcs_server": 2}.get(program, 1)


def _alive(p: tuple[int, int]) -> bool:
    st = _stat(p[0])
    return st is not None and st[2] == p[1] and st[0] != "Z"


def _signal(procs: list[tuple[int, int]], sig: int) -> None:
    for p in procs:
        if _alive(p):      # the same process we found, not a new one that reused its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(p[0], sig)


# ---- command line --------------------------------------------------------------------------------------------------
def _from_config(path: str) -> LocalCluster:
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    return LocalCluster(cluster_dir(config.get("cluster_name", ""), config.get("provider") or {}))


def main(argv: list[str] | None = None) -> int:
    """`env CONFIG`: print `export` lines for a Ray client of the cluster (`eval "$(... env CONFIG)"`);
    `kill CONFIG`: stop every process of the cluster; `stop-node DIR NODE`: what `ray stop` runs on a node."""
    p = argparse.ArgumentParser(prog="python -m moemesh.cluster.local.cluster", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env").add_argument("config")
    sub.add_parser("kill").add_argument("config")
    stop = sub.add_parser("stop-node")
    stop.add_argument("dir")
    stop.add_argument("node")
    args = p.parse_args(argv)
    if args.cmd == "stop-node":
        if not args.dir or not args.node:
            print("stop-node: no cluster directory or node id (run it from a node command)", file=sys.stderr)
            return 2
        n = LocalCluster(Path(args.dir)).stop_node(args.node)
        print(f"Stopped {n} process(es) of node {args.node}.")
        return 0
    cluster = _from_config(args.config)
    if args.cmd == "kill":
        print(f"Stopped {cluster.kill()} process(es) of {cluster.path}.")
        return 0
    env = cluster.client_env(base={})
    if "RAY_ADDRESS" not in env:
        print(f"{cluster.path}: no running head node", file=sys.stderr)
        return 1
    print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
