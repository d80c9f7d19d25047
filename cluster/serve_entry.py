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

from moemesh.cluster.config import DeploymentConfig
from moemesh.cluster.serve.app import build_app


def app_builder(args: dict) -> Application:
    """Serve's application builder: `args` (see the module docstring; parsed by `DeploymentConfig.from_serve_args`,
    whose errors name the field and the value) -> the moemesh application. Binds deployments only; it neither starts
    nor connects to Ray."""
    return build_app(DeploymentConfig.from_serve_args(args))
