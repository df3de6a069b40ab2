"""Reward workers on every node of a Ray cluster: `RewardPool`s inside Ray actors ("reward hosts").

A `RewardSet` takes any pool with `run(fn, arg_tuples, on_outcome)` and `close()`. `ClusterRewardPool`
offers that over `hosts` Ray actors placed where the recipe's resources say (spread over the nodes as far
as they go); each host runs an ordinary `RewardPool` of `workers_per_host` processes, so the hard per-call
timeout, the SIGKILL of a call that overruns and the replacement of a dead worker are the same code as on
one machine. The driver hands out chunks of calls to idle hosts and collects them as they finish.

What the cluster adds, and what it costs: a host that dies (its node lost, OOM) fails the calls of the
chunk it held with "error: reward host died" (each counted as one failed sample, like a dead worker) and
a new host takes its place; a chunk that does not come back within its calls' time limits plus the
start-up allowance is treated the same way. Calls travel pickled through Ray (a few hundred bytes
each): worth it when scoring is heavy (code tests, a model-based verifier), not for `math` on a 2-core
machine. A reward plugin must be importable on every node (the job's working directory travels with
it; a pip-installed plugin must be installed on every node).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from rewards.pool import _LOAD_ALLOWANCE_S, Outcome, RewardPool


class _RewardHost:
    """One node's share of the reward workers (a Ray actor)."""

    def __init__(self, num_workers: int, timeout_s: float, preload: tuple[str, ...]) -> None:
        self.pool = RewardPool(num_workers, timeout_s, preload=preload)

    def run_chunk(self, fn: Callable[..., Any], arg_tuples: list[tuple[Any, ...]]) -> list[Outcome]:
        return self.pool.run(fn, arg_tuples)

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def close(self) -> None:
        self.pool.close()


class ClusterRewardPool:
    """`hosts` Ray actors of `workers_per_host` reward processes each (see the module docstring).

    `resources`: custom Ray resources each host reserves (the label of the nodes it may run on);
    `cpus_per_host`: logical CPUs each reserves. Needs a connected Ray (`ray.init`).
    """

    def __init__(self, hosts: int, workers_per_host: int, timeout_s: float, preload: Sequence[str] = (),
                 resources: dict[str, float] | None = None, cpus_per_host: float = 0.0,
                 env_vars: dict[str, str] | None = None) -> None:
        if hosts < 1:
            raise ValueError(f"hosts must be >= 1, got {hosts}")
        self.timeout_s, self.workers_per_host = timeout_s, workers_per_host
        self._preload = tuple(preload)
        self._options: dict[str, Any] = {"num_cpus": cpus_per_host, "scheduling_strategy": "SPREAD",
                                         "runtime_env": {"env_vars": dict(env_vars or {})}}
        if resources:
            self._options["resources"] = dict(resources)
        self._hosts = [self._start() for _ in range(hosts)]
        self.host_restarts = 0
        self.timeouts = self.errors = 0

    def _start(self):
        import ray

        return ray.remote(_RewardHost).options(**self._options).remote(self.workers_per_host, self.timeout_s,
                                                                       self._preload)

    def nodes(self) -> list[str]:
        """The address of each host's node."""
        import ray

        return ray.get([h.node.remote() for h in self._hosts])

    def run(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]],
            on_outcome: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """`RewardPool.run` over the hosts: the `Outcome` of each call in input order; `on_outcome(index,
        outcome)` as chunks finish (if it raises, outstanding chunks are cancelled and it propagates)."""
        import ray

        outcomes: list[Outcome | None] = [None] * len(arg_tuples)
        size = max(1, self.workers_per_host * 2)
        pending = deque(list(range(lo, min(lo + size, len(arg_tuples)))) for lo in range(0, len(arg_tuples), size))
        running: dict[Any, tuple[int, list[int], float]] = {}  # ref -> (host index, call indices, deadline)
        idle = deque(range(len(self._hosts)))
        try:
            while pending or running:
                while pending and idle:
                    h, chunk = idle.popleft(), pending.popleft()
                    ref = self._hosts[h].run_chunk.remote(fn, [tuple(arg_tuples[i]) for i in chunk])
                    # every call may take its limit, one after another per worker, after the start-up allowance
                    rounds = -(-len(chunk) // self.workers_per_host)
                    running[ref] = (h, chunk, time.monotonic() + _LOAD_ALLOWANCE_S + rounds * self.timeout_s + 30)
                wait_s = max(0.0, min(d for _, _, d in running.values()) - time.monotonic())
                done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
                finished = done or [r for r, (_, _, d) in running.items() if time.monotonic() >= d]
                for ref in finished:
                    h, chunk, _ = running.pop(ref)
                    try:
                        results = ray.get(ref, timeout=0) if ref in done else None
                    except ray.exceptions.RayActorError:
                        results = None
                    except ray.exceptions.RayError as e:  # e.g. the reward's module is missing on that node
                        first = str(e).strip().splitlines()[-1][:300]
                        self.errors += len(chunk)
                        results = [Outcome(error=f"error: reward host failed: {first}")] * len(chunk)
                    if results is None:  # the host died or stopped answering: its calls fail, a new one starts
                        ray.kill(self._hosts[h])
                        self._hosts[h] = self._start()
                        self.host_restarts += 1
                        self.errors += len(chunk)
                        results = [Outcome(error="error: reward host died")] * len(chunk)
                    idle.append(h)
                    for i, outcome in zip(chunk, results, strict=True):
                        self.timeouts += outcome.timed_out
                        outcomes[i] = outcome
                        if on_outcome is not None:
                            on_outcome(i, outcome)
        except BaseException:  # the caller stops early: hosts still busy are replaced, not waited for
            for h, _, _ in running.values():
                ray.kill(self._hosts[h])
                self._hosts[h] = self._start()
            raise
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        try:
            ray.get([h.close.remote() for h in self._hosts], timeout=30)
        except Exception:  # a host that is gone has nothing to close
            pass
        for h in self._hosts:
            ray.kill(h)

    def __enter__(self) -> ClusterRewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
