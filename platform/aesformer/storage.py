"""Is a folder shared by every node of the cluster?

On a cluster each node has its own disk: a file the learner writes on a GPU
node is not on the head where the driver runs. :func:`check_shared` proves a
job's ``output`` is visible everywhere by writing a probe file from the
driver and asking a task pinned to every alive node whether it sees it; a
folder some node does not see fails before any work, naming the nodes and
what to use instead.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional

from aesformer.config import ConfigError


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: dict) -> str:
    res = node.get("Resources", {})
    if "node:__internal_head__" in res:
        return "head"
    custom = sorted(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith(("node:", "accelerator_type")))
    return ",".join(custom) or node["NodeID"][:8]


def on_every_node(ray, fn, *args, timeout: float = 120.0) -> dict[str, object]:
    """Run ``fn(*args)`` once on every alive node (a task pinned to it, no CPU);
    returns {node label: result}."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    nodes = _alive_nodes(ray)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
            for n in nodes]
    return dict(zip((node_label(n) for n in nodes), ray.get(refs, timeout=timeout)))


def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared(folder: str, ray, key: str = "output") -> None:
    """Raise ConfigError unless every alive node sees ``folder`` (a local
    path). One node: nothing to check."""
    if len(_alive_nodes(ray)) < 2:
        return
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".shared-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("probe")
    try:
        seen = on_every_node(ray, _sees, str(probe))
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(name for name, ok in seen.items() if not ok)
    if blind:
        raise ConfigError(
            f"{key}='{folder}' is on this node's disk only: node(s) {', '.join(blind)} of this {len(seen)}-node "
            f"cluster do not see it, so checkpoints and results written there would be lost or unreadable. "
            f"Use a folder every node mounts (a shared filesystem) for {key}.")


def is_local_path(uri: Optional[str]) -> bool:
    return uri is None or "://" not in str(uri) or str(uri).startswith("file://")


def check_across_nodes(cfg, ray, paths: tuple[str, ...] = ("output",)) -> int:
    """What a job checks before any work on a cluster of several nodes: the
    tracking store is not a file on the driver's disk, and each of ``paths``
    (config keys naming folders) is a folder every node sees. Returns the
    number of alive nodes."""
    from aesformer.tracking import check_tracking_across_nodes

    nodes = len(_alive_nodes(ray))
    check_tracking_across_nodes(cfg, nodes)
    for key in paths:
        value = getattr(cfg, key, None)
        if value and is_local_path(value):
            check_shared(str(value), ray, key)
    return nodes
