"""Pools of Ray actors on a placement group, that outlive the death of one.

A pool reserves one bundle per actor (CPUs, GPUs) in a placement group and
starts one actor per bundle. Work is submitted as keyed calls; when an actor
dies, :meth:`ResilientPool.results` starts a replacement on the same bundle, runs
the pool's ``on_start`` hook on it (e.g. push the current weights), and
resubmits every call the dead actor had not finished. The caller sees each
key's result exactly once.

When a node is lost, Ray places the pool's bundles that were on it again on
the nodes that survive (when they have room); a replacement waits for its
bundle at most ``ready_timeout`` seconds and then fails naming the pool.
Every replacement is recorded in :attr:`ResilientPool.events`.
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)


def _actor_failures():
    import ray.exceptions as rex

    kinds = [rex.RayActorError]
    for name in ("ActorUnavailableError", "ActorDiedError"):
        if hasattr(rex, name):
            kinds.append(getattr(rex, name))
    return tuple(kinds)


def _result_lost():
    import ray.exceptions as rex

    return tuple(getattr(rex, name) for name in ("ObjectLostError", "OwnerDiedError") if hasattr(rex, name))


def run_tag(job: str) -> str:
    """A short unique prefix for the actor names of one run."""
    return f"{job}-{uuid.uuid4().hex[:8]}"


class ResilientPool:
    """``size`` actors of ``actor_cls`` (a ``ray.remote`` class), one per bundle.

    ``bundle`` is e.g. ``{"CPU": 1, "GPU": 2}``; ``strategy`` the placement
    group strategy (PACK: fill nodes; STRICT_PACK: one node, for a
    DeepSpeed group sharing NCCL on one host). ``args_for(index)`` gives the
    constructor arguments of actor ``index``.
    """

    def __init__(self, name: str, actor_cls: Any, size: int, bundle: dict, args_for: Callable[[int], tuple],
                 *, strategy: str = "PACK", on_start: Optional[Callable[[Any], None]] = None,
                 max_restarts: int = 3, ready_timeout: float = 600.0, env: Optional[dict] = None,
                 call_timeout: Optional[float] = None):
        import ray
        from ray.util.placement_group import placement_group

        if size < 1:
            raise ValueError(f"pool '{name}' needs at least one actor, got {size}")
        self.name, self.actor_cls, self.size = name, actor_cls, size
        self.bundle = {k: float(v) for k, v in bundle.items() if v}
        self.bundle.setdefault("CPU", 0.001)  # an empty bundle is not allowed
        self.args_for, self.on_start, self.max_restarts = args_for, on_start, max_restarts
        self.env = env
        self.call_timeout = call_timeout
        self.ready_timeout = ready_timeout
        self.restarts = 0
        self.events: list[dict] = []  # one per replacement: actor index, reason, node it was on, seconds
        self.pg = placement_group([dict(self.bundle) for _ in range(size)], strategy=strategy, name=f"{name}-pg")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout)
        except Exception as e:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(f"pool '{name}': the cluster cannot place {size} x {self.bundle} within "
                               f"{ready_timeout:.0f}s ({type(e).__name__}); lower the pool's size or resources") from None
        self._generation = [0] * size
        self._where: list = [None] * size  # the node of each bundle, as last seen
        self.nodes()
        self.actors = [self._start(i) for i in range(size)]
        self._pending: dict[Any, tuple] = {}  # ref -> (key, index, generation, method, args, attempts)
        self._next = itertools.cycle(range(size))

    # -- actors ----------------------------------------------------------------------
    def _start(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict = dict(
            name=f"{self.name}-{index}.{self._generation[index]}",
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index),
            max_restarts=0, max_task_retries=0,
        )
        if self.env:
            options["runtime_env"] = {"env_vars": dict(self.env)}
        actor = self.actor_cls.options(**options).remote(*self.args_for(index))
        return actor

    def restart(self, index: int, reason: str = "") -> Any:
        """Replace actor ``index`` (dead or not) and run ``on_start`` on the new one.

        The replacement goes on the actor's bundle; when its node was lost,
        that waits until Ray has placed the bundle again on a surviving node
        (at most ``ready_timeout`` seconds)."""
        import ray

        self.restarts += 1
        if self.restarts > self.max_restarts * self.size:
            raise RuntimeError(f"pool '{self.name}': {self.restarts} actor restarts, more than allowed "
                               f"({self.max_restarts} per actor); last failure: {reason}")
        t0 = time.monotonic()
        was_on = self._where[index]  # Ray may have placed the bundle elsewhere already
        log.warning("pool '%s': actor %d died (%s); starting a replacement", self.name, index, reason[:300])
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:
            pass
        for attempt in range(3):
            # a node that just went away may still hold the bundle: a replacement
            # started there dies with it, and the next one goes where Ray placed it again
            self._generation[index] += 1
            self.wait_placed()
            self.actors[index] = self._start(index)
            try:
                self.get(self.actors[index].__ray_ready__.remote(), f"starting actor {index}")
                if self.on_start is not None:
                    self.on_start(self.actors[index])
                break
            except _actor_failures() as e:
                if attempt == 2 or self._answers(self.actors[index]):
                    raise  # out of tries, or another actor failed (one that on_start called)
                log.warning("pool '%s': the replacement of actor %d died too (%s); starting another", self.name,
                            index, type(e).__name__)
                time.sleep(2.0)
        now_on = (self.nodes(remember=False) or [None] * self.size)[index]
        self._where[index] = now_on or self._where[index]
        self.events.append({"pool": self.name, "actor": index, "reason": reason[:300], "was_on": was_on,
                            "now_on": now_on, "seconds": round(time.monotonic() - t0, 1)})
        log.warning("pool '%s': actor %d replaced on %s (was on %s)", self.name, index, now_on, was_on)
        return self.actors[index]

    @staticmethod
    def _answers(actor: Any, timeout: float = 30.0) -> bool:
        import ray

        try:
            ray.get(actor.__ray_ready__.remote(), timeout=timeout)
            return True
        except Exception:
            return False

    def wait_placed(self, timeout: Optional[float] = None) -> None:
        """Until every bundle of the pool is placed (after a node loss Ray
        places the lost ones again where there is room); fails naming the pool."""
        import ray

        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        state = None
        while True:
            try:
                state = ray.util.placement_group_table(self.pg).get("state")
            except Exception:
                state = None
            if state == "CREATED":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pool '{self.name}': its {self.size} x {self.bundle} could not be placed "
                                   f"again within {timeout:.0f}s (placement group {state}); the surviving nodes "
                                   "lack room for it")
            time.sleep(0.5)

    def nodes(self, remember: bool = True) -> Optional[list]:
        """The node (its label: custom resources, or ``head``) of each bundle,
        or None when unknown; ``remember``: as each actor's last known node."""
        import ray

        from aesformer.storage import node_label

        try:
            table = ray.util.placement_group_table(self.pg)
            labels = {n["NodeID"]: node_label(n) for n in ray.nodes() if n.get("Alive")}
        except Exception:
            return None
        where = table.get("bundles_to_node_id") or {}
        found = [labels.get(where.get(i), None) for i in range(self.size)]
        if remember:
            self._where = [f or w for f, w in zip(found, self._where)]
        return found

    def forget(self) -> None:
        """Drop every pending call (their results are no longer wanted)."""
        self._pending.clear()

    def call_all(self, method: str, *args: Any) -> list:
        """The same call on every actor; returns their ObjectRefs."""
        return [getattr(a, method).remote(*args) for a in self.actors]

    def get(self, refs: Any, what: str, timeout: Optional[float] = None) -> Any:
        """``ray.get`` with the pool's call timeout; a call that hangs fails
        naming the pool. Of several calls, the first that fails raises at
        once: when one rank of a group dies, the others wait in a collective
        that never completes."""
        import ray

        timeout = self.call_timeout if timeout is None else timeout
        many = isinstance(refs, list)
        pending = list(refs) if many else [refs]
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise TimeoutError(f"pool '{self.name}': {what} did not finish within {timeout:.0f}s")
            ray.get(ready[0])  # raises when that call failed
        values = ray.get(refs)
        return values

    def get_all(self, method: str, *args: Any, timeout: Optional[float] = None) -> list:
        """The same call on every actor, waited for (with the pool's call timeout)."""
        return self.get(self.call_all(method, *args), method, timeout)

    # -- keyed work with retries ---------------------------------------------------------
    def submit(self, key: Any, method: str, *args: Any, index: Optional[int] = None, _attempts: int = 0) -> None:
        i = next(self._next) if index is None else index % self.size
        ref = getattr(self.actors[i], method).remote(*args)
        self._pending[ref] = (key, i, self._generation[i], method, args, _attempts)

    @property
    def generations(self) -> list[int]:
        """How many times each actor was replaced (tells a replacement apart)."""
        return list(self._generation)

    @property
    def busy(self) -> int:
        return len(self._pending)

    def pending_refs(self) -> list:
        return list(self._pending)

    def handle(self, ref: Any) -> Optional[tuple[Any, Any]]:
        """Settle one finished call: (key, result), or None when its actor
        died and the call was resubmitted to a replacement."""
        import ray

        key, index, generation, method, args, attempts = self._pending.pop(ref)
        try:
            value = ray.get(ref)
        except _actor_failures() as e:
            if attempts >= self.max_restarts:
                raise
            # restart once per death: the dead actor's other calls find it replaced
            if self._generation[index] == generation:
                self.restart(index, f"{type(e).__name__}: {e}")
            self.submit(key, method, *args, index=index, _attempts=attempts + 1)
            return None
        except _result_lost() as e:
            # the result was stored on a node that is gone: compute it again
            if attempts >= self.max_restarts:
                raise
            log.warning("pool '%s': a result of actor %d was lost with its node (%s); calling again",
                        self.name, index, type(e).__name__)
            self.submit(key, method, *args, index=index, _attempts=attempts + 1)
            return None
        return key, value

    def results(self, timeout: Optional[float] = None) -> Iterator[tuple[Any, Any]]:
        """(key, result) for every submitted call, in completion order.

        A call whose actor died is resubmitted to its replacement (up to
        ``max_restarts`` times per call); other errors propagate.
        """
        for _, key, value in as_completed([self], self.call_timeout if timeout is None else timeout):
            yield key, value

    def map(self, method: str, items: list[tuple], timeout: Optional[float] = None) -> list:
        """Run ``method(*args)`` for each args tuple across the pool; results in order."""
        for i, args in enumerate(items):
            self.submit(i, method, *args)
        out: list = [None] * len(items)
        for key, value in self.results(timeout):
            out[key] = value
        return out

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:
            pass


def as_completed(pools: list[ResilientPool], timeout: Optional[float] = None) -> Iterator[tuple[ResilientPool, Any, Any]]:
    """(pool, key, result) for the calls of several pools as they finish,
    until none is pending (calls submitted meanwhile included)."""
    import ray

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        owner = {ref: pool for pool in pools for ref in pool.pending_refs()}
        if not owner:
            return
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(owner), num_returns=1, timeout=left)
        if not ready:
            names = ", ".join(sorted({p.name for p in owner.values()}))
            raise TimeoutError(f"{len(owner)} calls of pools {names} unfinished after {timeout}s")
        pool = owner[ready[0]]
        settled = pool.handle(ready[0])
        if settled is not None:
            yield pool, settled[0], settled[1]
