"""`moemesh status`: what an operator asks first about a running deployment, read from a live cluster.

`collect(app)` (Ray connected) gathers, each part on its own so that one unavailable source does not hide the rest:
- the application and its deployments with their replicas by state, and the node each replica runs on;
- with an expert controller: the expert map version, the replica actors (and where they run), the hottest experts with
  their rates and holders, the last decisions with their reasons, each changed expert's tokens/s per holder and
  dispatch latency before and after the change (does it help?), the replica actors still pending;
- Ray's autoscaler: nodes being launched and pending resource demands.
`render(status)` turns it into text; `--json` prints `collect`'s dict.
"""

from __future__ import annotations

import json

from moemesh.cluster.names import EXPERT_CONTROLLER, REPLICA_NAMESPACE, replica_actor_name

CALL_TIMEOUT_S = 30.0
HOTTEST = 10  # experts shown by rate
DECISIONS = 10  # last decisions shown


def collect(app: str) -> dict:
    """The status of Serve application `app` on the Ray cluster this process is connected to."""
    status: dict = {"app": app, "deployments": {}, "controller": None, "replica_actors": [], "autoscaler": None,
                    "errors": []}
    nodes = _node_names()
    placements = _actor_placements(status, nodes)
    _serve_part(status, app, placements)
    if EXPERT_CONTROLLER in status["deployments"]:
        _controller_part(status, app, placements)
    _autoscaler_part(status)
    return status


def _node_names() -> dict[str, str]:
    """node id -> a readable name: its moemesh pin (`moemesh.io/node:NAME`) or node-type marker, else its address."""
    import ray

    out = {}
    for node in ray.nodes():
        resources = node.get("Resources", {})
        pin = next((k.split(":", 1)[1] for k in resources if k.startswith("moemesh.io/node:")), None)
        out[node["NodeID"]] = pin or node.get("NodeManagerAddress", node["NodeID"][:8])
    return out


def _actor_placements(status: dict, nodes: dict[str, str]) -> dict[str, list[dict]]:
    """class name or actor name -> [{node, state}] of live actors (Ray's state API; empty if it is unavailable)."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "!=", "DEAD")], limit=10_000, timeout=int(CALL_TIMEOUT_S),
                             detail=True, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - the rest of the status is still worth printing
        status["errors"].append(f"actor placement unavailable: {e!r}")
        return {}
    out: dict[str, list[dict]] = {}
    for a in actors:
        where = {"node": nodes.get(a.node_id, a.node_id or "(not placed)"), "state": a.state}
        out.setdefault(a.class_name, []).append(where)
        if a.ray_namespace == REPLICA_NAMESPACE and a.name:
            out.setdefault(a.name, []).append(where)
    return out


def _serve_part(status: dict, app: str, placements: dict[str, list[dict]]) -> None:
    from ray import serve

    try:
        applications = serve.status().applications
    except Exception as e:  # noqa: BLE001
        status["errors"].append(f"Serve status unavailable: {e!r}")
        return
    if app not in applications:
        status["errors"].append(f"no application {app!r} (running: {sorted(applications) or 'none'})")
        return
    a = applications[app]
    status["app_status"] = str(a.status.value if hasattr(a.status, "value") else a.status)
    for name, dep in sorted(a.deployments.items()):
        status["deployments"][name] = {
            "status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
            "replicas": {str(s.value if hasattr(s, "value") else s): n for s, n in dep.replica_states.items()},
            "nodes": sorted(p["node"] for p in placements.get(f"ServeReplica:{app}:{name}", [])),
        }


def _controller_part(status: dict, app: str, placements: dict[str, list[dict]]) -> None:
    from ray import serve

    try:
        state = serve.get_deployment_handle(EXPERT_CONTROLLER, app_name=app).state.remote().result(
            timeout_s=CALL_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        status["errors"].append(f"expert controller unavailable: {e!r}")
        return
    holders = state.get("holders", {})
    status["controller"] = {
        "map_version": state["version"],
        "pending_replicas": state.get("pending", 0),
        "hottest": [{"expert": k, "tokens_per_s": r, "holders": holders.get(k, 1)}
                    for k, r in list(state.get("rates", {}).items())[:HOTTEST]],
        "decisions": [{k: d[k] for k in ("time", "action", "layer", "expert", "holders_from", "holders_to", "reason",
                                         "cause") if k in d} for d in state.get("decisions", [])[-DECISIONS:]],
        "effects": state.get("effects", [])[-DECISIONS:],
    }
    status["replica_actors"] = [
        {"name": name, "experts": {str(layer): es for layer, es in experts.items()},
         "nodes": sorted(p["node"] for p in placements.get(replica_actor_name(app, name), []))}
        for name, experts in sorted(state.get("replicas", {}).items())]


def _autoscaler_part(status: dict) -> None:
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        cs = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=int(CALL_TIMEOUT_S))
        status["autoscaler"] = {"active_nodes": len(cs.active_nodes) + len(cs.idle_nodes),
                                "pending_launches": sum(getattr(p, "count", 1) for p in cs.pending_launches),
                                "pending_nodes": len(cs.pending_nodes),
                                "resource_demands": len(cs.resource_demands)}
    except Exception as e:  # noqa: BLE001
        status["errors"].append(f"autoscaler status unavailable: {e!r}")


def render(status: dict) -> str:
    """The status as a few sections of plain text."""
    lines = [f"application {status['app']}: {status.get('app_status', 'not running')}"]
    for name, dep in status["deployments"].items():
        replicas = ", ".join(f"{n} {s}" for s, n in sorted(dep["replicas"].items())) or "no replicas"
        where = f" on {', '.join(dep['nodes'])}" if dep["nodes"] else ""
        lines.append(f"  {name:<24} {dep['status']:<10} {replicas}{where}")
    ctl = status["controller"]
    if ctl is None:
        lines.append("expert controller: none (experts.autoscaling is not set)"
                     if EXPERT_CONTROLLER not in status["deployments"] else "expert controller: unavailable")
    else:
        lines.append(f"expert map v{ctl['map_version']}, {len(status['replica_actors'])} replica actor(s), "
                     f"{ctl['pending_replicas']} pending")
        for actor in status["replica_actors"]:
            experts = "; ".join(f"layer {layer}: {es}" for layer, es in actor["experts"].items())
            lines.append(f"  {actor['name']} on {', '.join(actor['nodes']) or '(not placed yet)'}: {experts}")
        if ctl["hottest"]:
            lines.append("hottest experts (layer/expert: tok/s, holders):")
            lines += [f"  {h['expert']}: {h['tokens_per_s']:.1f} tok/s, {h['holders']} holder(s)"
                      for h in ctl["hottest"]]
        if ctl["decisions"]:
            lines.append("last decisions:")
            lines += [f"  layer {d['layer']} expert {d['expert']} {d['action']} {d['holders_from']} -> "
                      f"{d['holders_to']} [{d.get('cause', '')}]: {d['reason']}" for d in ctl["decisions"]]
        if ctl.get("effects"):
            lines.append("does it help? per changed expert, before -> after (after: once a window has passed):")
            lines += [f"  layer {e['layer']} expert {e['expert']} {e['action']} {e['holders_before']} -> "
                      f"{e['holders_after']}: {_pair(e, 'tokens_per_holder', '{:.1f}', 1)} tok/s per holder, "
                      f"dispatch {_pair(e, 'latency', '{:.1f}', 1e3, '_s')} ms" for e in ctl["effects"]]
    auto = status["autoscaler"]
    if auto is not None:
        lines.append(f"nodes: {auto['active_nodes']} up, {auto['pending_launches']} launching, "
                     f"{auto['pending_nodes']} pending; {auto['resource_demands']} pending resource demand(s)")
    lines += [f"({e})" for e in status["errors"]]
    return "\n".join(lines)


def _pair(effect: dict, name: str, fmt: str, scale: float, unit: str = "") -> str:
    values = [effect.get(f"{name}_{phase}{unit}") for phase in ("before", "after")]
    return " -> ".join("?" if v is None else fmt.format(v * scale) for v in values)


def as_json(status: dict) -> str:
    return json.dumps(status, indent=2, sort_keys=True, default=str)
