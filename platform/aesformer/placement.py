"""Will a job's pools fit the cluster? Checked before any model loads.

A job describes each pool as a :class:`PoolAsk`: how many actors, what one
actor's bundle holds (CPU, GPU, custom resources such as ``node_b`` that pin
it to a node) and what must sit on one node (a bundle always does; a
``STRICT_PACK`` group does as a whole). :func:`plan` places the pools, in
the order given, on the nodes the cluster has (first fit, the way Ray's
placement groups do) and either returns the node of every bundle or raises
:class:`PlacementError` whose message is a table: pool | asks | cluster has.
A pool that does not fit would otherwise wait for resources that never come.

``strategy="auto"`` (the learner group's default) means STRICT_PACK when one
node can hold the whole group and PACK otherwise. :func:`shrink_cpus` scales
CPU asks down to the cluster's CPUs, for profiles whose actors are mostly
idle (the tiny one on a 2-core laptop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from aesformer.config import ConfigError

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD", "auto")
_EPS = 1e-6


class PlacementError(ConfigError):
    """The pools cannot all be placed on this cluster; the message holds the
    table. A ConfigError: a job ends with it on stderr and exit status 2."""


@dataclass
class PoolAsk:
    name: str
    count: int
    bundle: dict  # one actor's resources: {"CPU": 2, "GPU": 1, "node_b": 1}
    strategy: str = "PACK"
    memory_note: str = ""  # what each actor needs in GPU memory, for the plan table

    def __post_init__(self) -> None:
        self.bundle = {k: float(v) for k, v in self.bundle.items() if v}
        if self.strategy not in STRATEGIES:
            raise ValueError(f"pool '{self.name}': placement strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got '{self.strategy}'")

    def total(self) -> dict:
        return {k: v * self.count for k, v in self.bundle.items()}


@dataclass
class Node:
    name: str
    resources: dict
    free: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = dict(self.resources)

    def fits(self, bundle: dict) -> bool:
        return all(self.free.get(k, 0.0) + _EPS >= v for k, v in bundle.items())

    def take(self, bundle: dict) -> None:
        for k, v in bundle.items():
            self.free[k] = self.free.get(k, 0.0) - v


def cluster_nodes(ray_module=None) -> list[Node]:
    """The alive nodes of the connected Ray cluster and their resources
    (the ``node:<ip>`` markers left out)."""
    if ray_module is None:
        import ray as ray_module
    nodes = []
    for n in ray_module.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        custom = sorted(k for k in res if k not in ("CPU", "GPU") and not k.startswith("accelerator_type"))
        label = "head" if "node:__internal_head__" in n.get("Resources", {}) else (",".join(custom) or n["NodeID"][:8])
        nodes.append(Node(label, res))
    return nodes


def _fmt(bundle: dict) -> str:
    def num(v: float) -> str:
        return str(int(v)) if abs(v - round(v)) < _EPS else f"{v:.2f}".rstrip("0")

    order = sorted(bundle, key=lambda k: (k not in ("GPU", "CPU"), k != "GPU", k))
    return ", ".join(f"{k} {num(bundle[k])}" for k in order) or "nothing"


def _cluster_has(ask: PoolAsk, nodes: list[Node]) -> str:
    parts = []
    for k in sorted(ask.bundle, key=lambda k: (k not in ("GPU", "CPU"), k != "GPU", k)):
        total = sum(n.resources.get(k, 0.0) for n in nodes)
        largest = max((n.resources.get(k, 0.0) for n in nodes), default=0.0)
        parts.append(f"{k} {_fmt({k: total}).split(' ', 1)[1] if total else 0} "
                     f"(largest node {_fmt({k: largest}).split(' ', 1)[1] if largest else 0})")
    return "; ".join(parts)


def _asks_text(ask: PoolAsk, strategy: Optional[str] = None) -> str:
    s = strategy or ask.strategy
    where = {"STRICT_PACK": ", all on one node", "STRICT_SPREAD": ", each on its own node"}.get(s, "")
    return f"{ask.count} x {{{_fmt(ask.bundle)}}}{where}"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows])


def _place_group(ask: PoolAsk, nodes: list[Node], strategy: str) -> Optional[list[int]]:
    """Node index of each bundle, or None; ``nodes`` are updated only on success."""
    if strategy == "STRICT_PACK":
        whole = ask.total()
        # best fit: the node left with the least of what the group asks most of
        fitting = [i for i, n in enumerate(nodes) if n.fits(whole)]
        if not fitting:
            return None
        key = max(whole, key=whole.get) if whole else "CPU"
        i = min(fitting, key=lambda j: nodes[j].free.get(key, 0.0) - whole.get(key, 0.0))
        nodes[i].take(whole)
        return [i] * ask.count
    free = [dict(n.free) for n in nodes]
    trial = [Node(n.name, n.resources) for n in nodes]
    for t, f in zip(trial, free):
        t.free = f
    where: list[int] = []
    used: set[int] = set()
    for _ in range(ask.count):
        if strategy in ("SPREAD", "STRICT_SPREAD"):
            order = sorted(range(len(trial)), key=lambda j: (j in used, j))
            if strategy == "STRICT_SPREAD":
                order = [j for j in order if j not in used]
        else:  # PACK: fill the nodes already used first
            order = sorted(range(len(trial)), key=lambda j: (j not in used, j))
        i = next((j for j in order if trial[j].fits(ask.bundle)), None)
        if i is None:
            return None
        trial[i].take(ask.bundle)
        where.append(i)
        used.add(i)
    for n, t in zip(nodes, trial):
        n.free = t.free
    return where


def plan(asks: list[PoolAsk], nodes: list[Node]) -> dict:
    """Place every pool, in order; returns {pool: {"strategy", "nodes": [node name per bundle]}}.

    Raises :class:`PlacementError` with the table when any pool does not fit.
    """
    nodes = [Node(n.name, n.resources) for n in nodes]
    placed: dict = {}
    failed: list[str] = []
    for ask in asks:
        strategy = ask.strategy
        if strategy == "auto":
            strategy = "STRICT_PACK" if any(n.fits(ask.total()) for n in nodes) else "PACK"
        where = _place_group(ask, nodes, strategy)
        if where is None:
            failed.append(ask.name)
            placed[ask.name] = {"strategy": strategy, "nodes": None}
        else:
            placed[ask.name] = {"strategy": strategy, "nodes": [nodes[i].name for i in where]}
    if failed:
        rows = []
        for ask in asks:
            p = placed[ask.name]
            rows.append((ask.name, _asks_text(ask, p["strategy"]), _cluster_has(ask, nodes),
                         "no" if p["nodes"] is None else "yes"))
        totals: dict = {}
        for ask in asks:
            for k, v in ask.total().items():
                totals[k] = totals.get(k, 0.0) + v
        have = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in totals}
        rows.append(("all pools", _fmt(totals), _fmt(have), "no" if any(totals[k] > have[k] + _EPS for k in totals)
                     else "yes"))
        node_list = "; ".join(f"{n.name}: {_fmt({k: v for k, v in n.resources.items() if k in totals})}"
                              for n in nodes)
        raise PlacementError(
            f"the pools do not fit this cluster ({', '.join(failed)} cannot be placed; pools are placed "
            f"in the order listed)\n{table(rows, ('pool', 'asks', 'cluster has', 'placed'))}\n"
            f"nodes: {node_list}\nlower the pools' sizes or resources, or add nodes")
    return placed


def plan_table(asks: list[PoolAsk], placed: dict) -> str:
    rows = []
    for ask in asks:
        p = placed[ask.name]
        counts: dict = {}
        for n in p["nodes"]:
            counts[n] = counts.get(n, 0) + 1
        rows.append((ask.name, _asks_text(ask, p["strategy"]), ", ".join(f"{c} on {n}" for n, c in counts.items()),
                     ask.memory_note))
    return table(rows, ("pool", "asks", "placed", "memory per actor"))


def shrink_cpus(asks: list[PoolAsk], nodes: list[Node]) -> float:
    """The factor (<= 1, two decimals, rounded down) by which every pool's
    CPU ask shrinks so that their sum fits the cluster's CPUs; 1.0 when it
    already fits. The asks are updated in place."""
    need = sum(a.total().get("CPU", 0.0) for a in asks)
    have = sum(n.resources.get("CPU", 0.0) for n in nodes)
    if need <= have + _EPS or need == 0:
        return 1.0
    factor = math.floor(have / need * 100) / 100
    if factor <= 0:
        raise PlacementError(f"the cluster has {have:g} CPUs: too few to shrink the pools' {need:g} CPUs into")
    for a in asks:
        if "CPU" in a.bundle:
            a.bundle["CPU"] = math.floor(a.bundle["CPU"] * factor * 100) / 100 or 0.01
    return factor


def check_pools(ray_module, asks: list[PoolAsk], job: str) -> dict:
    """Before any model loads: the pools ``asks`` (actor pools that run at
    the same time) placed on the connected cluster's nodes, the plan logged;
    :class:`PlacementError` with the table when they do not fit."""
    import logging

    placed = plan(asks, cluster_nodes(ray_module))
    logging.getLogger(job).info("pools on the cluster:\n%s", plan_table(asks, placed))
    return placed
