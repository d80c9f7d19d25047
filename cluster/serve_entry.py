"""The import path a Ray Serve config file names: `moemesh.cluster.serve_entry:app_builder`.

`serve deploy deploy/serve/serve-app.yaml` and KubeRay's `RayService` (its `serveConfigV2`) build applications from
an import path plus an `args` mapping. Serve calls `app_builder(args)` inside the cluster (in a task started by the
Serve controller, with the application's `runtime_env`), so everything `args` names must exist there: the model
directory, a config file, and the environment variables `ingress.api_keys_env` / `grpc_token_env` name (set them in
the application's `runtime_env.env_vars`).

`args` is either a deployment config inline (the same fields as a `moemesh serve CONFIG.yaml` file):

    args: {model: /models/DeepSeek-V4-Flash, attention: {replicas: 8}, experts: {shards: 16}}

or the path of such a file on the cluster's nodes, and nothing else:

    args: {config: /etc/moemesh/deployment.yaml}

Serve's own config decides the HTTP address (`http_options.host` / `.port`); `ingress.host` and `ingress.port` are
only read by `moemesh serve`.
"""

from __future__ import annotations

from ray.serve import Application

from moemesh.cluster.app import build_app
from moemesh.cluster.config import ConfigFileError, DeploymentConfig

CONFIG_KEY = "config"  # args key holding a config file path (DeploymentConfig has no field of that name)


def config_from_args(args: dict | None) -> DeploymentConfig:
    """The `DeploymentConfig` a Serve `args` mapping describes (inline fields, or `{config: PATH}`); errors name the
    field and the value (`ConfigFileError`)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigFileError(f"serve args: expected a mapping, got {type(args).__name__}")
    if CONFIG_KEY not in args:
        return DeploymentConfig.from_dict(args, source="serve args")
    others = sorted(k for k in args if k != CONFIG_KEY)
    if others:
        raise ConfigFileError(f"serve args: `{CONFIG_KEY}` (a file) excludes inline fields; got also {others}")
    path = args[CONFIG_KEY]
    if not isinstance(path, str) or not path:
        raise ConfigFileError(f"serve args.{CONFIG_KEY}: expected the path of a deployment config file, got {path!r}")
    return DeploymentConfig.from_yaml(path)


def app_builder(args: dict) -> Application:
    """Serve's application builder: `args` (see the module docstring) -> the moemesh application. Binds deployments
    only; it neither starts nor connects to Ray."""
    return build_app(config_from_args(args))
