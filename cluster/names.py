"""Names defined once: the Serve application, its deployments, the controller's replica actors, and Ray namespaces.

Every module that builds, addresses, pins or reports a role by name takes the name from here (the builders in
cluster/serve/, the planner's pins in cluster/serve/pinning.py, the controller's worker ports, metrics labels).
"""

APP_NAME = "moemesh"  # the Serve application `moemesh serve` deploys (and removes when it stops)
RAY_NAMESPACE = "moemesh"  # the Ray namespace `moemesh serve` joins or starts
INGRESS = "ingress"
EXPERT_CONTROLLER = "expert-controller"
ATTENTION_POOL = "attention-pool"  # the deployment of the attention pool's replicas (autoscaled by Serve)
REPLICA_NAMESPACE = "moemesh-replicas"  # Ray namespace of the controller's replica actors
COLLECTIVE_KV_NAMESPACE = "moemesh-collective"  # Ray KV keys `{group id}/{rank}`: which members have started once


def expert_shard(i: int) -> str:
    """Base expert shard `i` (a Serve deployment of one replica)."""
    return f"expert-shard-{i}"


def engram_shard(shard: int, replica: int) -> str:
    """Replica `replica` of Engram shard `shard`."""
    return f"engram-shard-{shard}-{replica}"


def attention_worker(rank: int) -> str:
    """The fixed attention worker of data-parallel rank `rank`."""
    return f"attention-worker-{rank}"


def replica_actor_name(app_name: str, replica: str) -> str:
    """The Ray actor name of the controller's replica `replica` of application `app_name`
    (`ray.get_actor(name, REPLICA_NAMESPACE)`; shown by `ray list actors`)."""
    return f"{app_name}/{replica}"
