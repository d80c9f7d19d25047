"""A Ray node provider for a multi-node cluster on this one machine: `ray up deploy/clusters/local.yaml`.

    provider:
      type: external
      module: moemesh.cluster.local.provider.LocalNodeProvider
      cluster_dir: /tmp/moemesh-<uid>/<cluster_name>    # optional; this is the default

Ray's cluster launcher drives it exactly as it drives a cloud: `ray up` asks the provider for a head "machine" and runs
the YAML's setup and start commands on it through the provider's command runner; the autoscaler (Ray's own, running
in the head's monitor process) asks for worker "machines" by node type and runs the worker commands on them; `ray
down` runs `ray stop` on the head and terminates every node. Here a "machine" is an entry in the cluster directory's
state file plus a directory (`cluster.py` beside this module has the layout), and the command runner runs commands in a
local shell instead of over SSH:

- Every command runs in a new session, recorded for its node, with MOEMESH_LOCAL_CLUSTER / MOEMESH_LOCAL_NODE set, in
  the node's home directory, with the node's variables: MOEMESH_NODE_DIR (use it as Ray's `--temp-dir`),
  MOEMESH_NODE_HOME, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (the cluster's own token), RAY_ADDRESS once the head
  runs. The launching process's RAY_* variables are dropped, as a remote machine would not have them.
- `ray stop` on a node (the wrapper first on its PATH) stops only that node's processes; terminating a node does the
  same and deletes its directory. Nothing is ever stopped by name, and no other Ray cluster on the machine is touched.
- Resources and labels of the node type reach `ray start` as Ray's updater passes them (RAY_OVERRIDE_RESOURCES /
  RAY_OVERRIDE_LABELS). A node whose type names no `moemesh.io/node:<name>` resource gets `moemesh.io/node:<node
  id>` (e.g. `moemesh.io/node:worker-3`), so every node carries exactly one pin resource for cluster/serve/pinning.py.
- File mounts and rsync are local copies: a remote path under `~` lands under the node's home (so the head's start
  command reads `$MOEMESH_NODE_HOME/ray_bootstrap_config.yaml`), an absolute remote path is copied to as is (and
  skipped when it is the source itself).

Limits: one machine, so "nodes" share its CPUs, memory and devices (node types should declare small logical
resources); no docker; `timeout` and `port_forward` of `run` are ignored (everything is local); `ray attach` gets a
shell without job control (eval `python -m moemesh.cluster.local.cluster env CONFIG` in your own shell instead);
all nodes have the machine's IP, so only autoscaler v2 (the default of `ray up` since Ray 2.50) can tell them
apart: it matches nodes by RAY_CLOUD_INSTANCE_ID, v1 matched by IP.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from ray.autoscaler._private.subprocess_output_util import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND

from moemesh.cluster.local.cluster import ENV_CLUSTER, ENV_NODE, LocalCluster, cluster_dir
from moemesh.cluster.serve.pinning import NODE_RESOURCE_PREFIX

RESOURCES_ENV = "RAY_OVERRIDE_RESOURCES"   # ray._private.ray_constants.RESOURCES_ENVIRONMENT_VARIABLE
_DEFAULTS = {"cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
             "rsync_filter": [], "file_mounts": {}, "initialization_commands": [], "setup_commands": [],
             "head_setup_commands": [], "worker_setup_commands": []}


class LocalNodeProvider(NodeProvider):
    """Nodes are entries of the cluster's state file; see the module docstring."""

    def __init__(self, provider_config: dict, cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self.cluster = LocalCluster(cluster_dir(cluster_name, provider_config))
        from ray._private.services import get_node_ip_address

        self._ip = get_node_ip_address()

    @staticmethod
    def fillout_available_node_types_resources(cluster_config: dict) -> dict:
        """The launcher's only hook before it validates: fill the fields it fills from a built-in provider's defaults
        but not for an external one (validation fails without `cluster_synced_files`)."""
        for key, value in _DEFAULTS.items():
            cluster_config.setdefault(key, value)
        return cluster_config

    @staticmethod
    def bootstrap_config(cluster_config: dict) -> dict:
        cluster_dir(cluster_config["cluster_name"], cluster_config["provider"])   # fail early on a bad name/dir
        if (cluster_config.get("docker") or {}).get("container_name"):
            raise ValueError("docker: the local provider runs no containers; remove the `docker` section")
        return cluster_config

    # ---- nodes ----------------------------------------------------------------------------------------------------
    def non_terminated_nodes(self, tag_filters: dict) -> list[str]:
        return [node_id for node_id, node in self.cluster.nodes().items()
                if all(node["tags"].get(k) == v for k, v in tag_filters.items())]

    def is_running(self, node_id: str) -> bool:
        return node_id in self.cluster.nodes()

    def is_terminated(self, node_id: str) -> bool:
        return node_id not in self.cluster.nodes()

    def node_tags(self, node_id: str) -> dict:
        return dict(self.cluster.nodes().get(node_id, {}).get("tags", {}))   # {} once terminated

    def external_ip(self, node_id: str) -> str:
        return self._ip

    def internal_ip(self, node_id: str) -> str:
        return self._ip

    def set_node_tags(self, node_id: str, tags: dict) -> None:
        self.cluster.set_tags(node_id, tags)

    def create_node(self, node_config: dict, tags: dict, count: int) -> None:
        prefix = "head" if tags.get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD else "worker"
        self.cluster.ensure()
        self.cluster.add_nodes(prefix, tags, count)

    def terminate_node(self, node_id: str) -> None:
        self.cluster.remove_nodes([node_id])

    def terminate_nodes(self, node_ids: list[str]) -> None:
        self.cluster.remove_nodes(list(node_ids))

    def cleanup_cluster_resources(self) -> None:
        """Called by `ray down` once no node is left: delete the cluster directory (state, token, wrapper)."""
        if not self.cluster.nodes():
            shutil.rmtree(self.cluster.path, ignore_errors=True)

    def prepare_for_head_node(self, cluster_config: dict) -> dict:
        """The config the head's autoscaler gets: worker file mounts come from the head's copies (under its home)."""
        heads = self.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
        if heads:
            runner = LocalCommandRunner(self, heads[0], "")
            cluster_config["file_mounts"] = {remote: str(runner.remote_path(remote))
                                             for remote in cluster_config.get("file_mounts", {})}
        return cluster_config

    def get_command_runner(self, log_prefix, node_id, auth_config, cluster_name, process_runner, use_internal_ip,
                           docker_config=None) -> LocalCommandRunner:
        if docker_config and docker_config.get("container_name"):
            raise ValueError("docker: the local provider runs no containers")
        self.cluster.ensure()
        return LocalCommandRunner(self, node_id, log_prefix)


class LocalCommandRunner(CommandRunnerInterface):
    """Runs a node's commands in a local shell (see the module docstring for the environment they get)."""

    def __init__(self, provider: LocalNodeProvider, node_id: str, log_prefix: str):
        self.cluster = provider.cluster
        self.node_id = node_id
        self.log_prefix = log_prefix
        self.home = self.cluster.node_home(node_id)

    def remote_path(self, path: str) -> Path:
        """Where a path on the node is here: `~` is the node's home."""
        if path == "~" or path.startswith("~/"):
            return self.home / path[2:]
        return Path(path)

    def env(self, extra: dict | None = None) -> dict[str, str]:
        env = self.cluster.client_env()
        env.update({
            "PATH": f"{self.cluster.bin_dir}{os.pathsep}{env.get('PATH', '')}",     # the `ray stop` wrapper first
            ENV_CLUSTER: str(self.cluster.path),
            ENV_NODE: self.node_id,
            "MOEMESH_NODE_DIR": str(self.cluster.node_dir(self.node_id)),
            "MOEMESH_NODE_HOME": str(self.home),
        })
        for key, value in (extra or {}).items():
            env[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if RESOURCES_ENV in env:       # the node type's resources, given to `ray start`: add the node's pin
            resources = json.loads(env[RESOURCES_ENV])
            if not any(r.startswith(NODE_RESOURCE_PREFIX) for r in resources):
                resources[NODE_RESOURCE_PREFIX + self.node_id] = 1
            env[RESOURCES_ENV] = json.dumps(resources, separators=(",", ":"))
        return env

    def run(self, cmd=None, timeout=120, exit_on_fail=False, port_forward=None, with_output=False,
            environment_variables=None, run_env="auto", ssh_options_override_ssh_key="", shutdown_after_run=False):
        if cmd == "uptime":     # the updater's "is SSH up yet" probe: this machine is up (and may lack procps)
            return b"" if with_output else ""
        cmd = cmd or "exec bash"
        if shutdown_after_run:
            cmd = f"{cmd}; ray stop"           # "shutting the machine down": stop this node's processes
        self.home.mkdir(parents=True, exist_ok=True)
        interactive = not with_output and all(f is not None and f.isatty() for f in (sys.stdin, sys.stdout))
        # Output goes through files, never pipes: a daemon the command starts would hold a pipe open forever.
        out_path, err_path = _scratch(self.home), _scratch(self.home)
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(["bash", "-c", cmd], cwd=self.home, env=self.env(environment_variables),
                                        start_new_session=True, stdin=None if interactive else subprocess.DEVNULL,
                                        stdout=None if interactive else out, stderr=None if interactive else err)
            self.cluster.record_session(self.node_id, proc.pid)
            output = _follow(proc, out_path, err_path, echo_out=not with_output)
        finally:
            out_path.unlink(missing_ok=True)
            err_path.unlink(missing_ok=True)
        if proc.returncode != 0:
            if exit_on_fail:
                raise click.ClickException(f"Command failed on {self.node_id}:\n\n  {cmd}\n")
            raise ProcessRunnerError("Command failed", "ssh_command_failed", code=proc.returncode, command=cmd)
        return output if with_output else ""

    def run_rsync_up(self, source: str, target: str, options: dict | None = None) -> None:
        _copy(Path(os.path.expanduser(source)), self.remote_path(target), (options or {}).get("rsync_exclude"))

    def run_rsync_down(self, source: str, target: str, options: dict | None = None) -> None:
        _copy(self.remote_path(source), Path(os.path.expanduser(target)), (options or {}).get("rsync_exclude"))

    def remote_shell_command_str(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items() if k.startswith(("RAY_", "MOEMESH_")))
        return f"cd {shlex.quote(str(self.home))} && env {env} bash\n"


def _follow(proc: subprocess.Popen, out_path: Path, err_path: Path, echo_out: bool) -> bytes:
    """Wait for `proc`, copying its output files to ours as they grow; returns all of its stdout.
    Ctrl-C is passed on to the command (it runs in its own session, so the terminal does not reach it)."""
    captured = bytearray()
    with open(out_path, "rb") as out, open(err_path, "rb") as err:
        while True:
            try:
                done = proc.wait(timeout=0.2) is not None
            except subprocess.TimeoutExpired:
                done = False
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGINT)
                continue
            chunk = out.read()
            captured += chunk
            if echo_out:
                _echo(sys.stdout, chunk)
            _echo(sys.stderr, err.read())
            if done:
                return bytes(captured)


def _scratch(folder: Path) -> Path:
    fd, path = tempfile.mkstemp(prefix=".out.", dir=folder)
    os.close(fd)
    return Path(path)


def _echo(stream, chunk: bytes) -> None:
    if chunk and stream is not None:
        raw = getattr(stream, "buffer", None)       # the monitor's stdout may be a text-only stream
        raw.write(chunk) if raw is not None else stream.write(chunk.decode(errors="replace"))
        stream.flush()


def _copy(source: Path, target: Path, exclude: list[str] | None) -> None:
    """rsync's job, locally: a directory's contents into `target`, a file to `target` (into it if it is a dir)."""
    if source.resolve() == target.resolve():
        return
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns(*exclude) if exclude else None)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / source.name if target.is_dir() else target)
