"""A pool of reward worker processes with hard, per-call timeouts.

Each worker is a spawned process fed through a pipe. A call that runs past `timeout_s` gets its worker
killed (SIGKILL: nothing inside the call can catch or ignore it) and replaced, and scores 0 with
reason "timeout"; a call that raises scores 0 with the exception as its reason. Neither costs more than
that one sample's reward. Spawned (not forked) processes, so the pool is safe to create from threads,
Ray actors and processes that hold a torch or vLLM runtime.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from rewards.types import RewardResult


def _worker_main(conn: Connection) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, fn, args = message
        try:
            result = fn(*args)
            if not isinstance(result, RewardResult):
                result = RewardResult(float("nan"), f"reward returned {type(result).__name__}, not RewardResult")
        except Exception as e:  # any failure of user code costs this sample only
            tail = traceback.format_exception_only(type(e), e)[-1].strip()
            result = RewardResult(0.0, f"error: {tail}")
        conn.send((index, result))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class RewardPool:
    """Score calls `fn(*args)` in `num_workers` processes, each call limited to `timeout_s` seconds.

    `fn` must be a picklable module-level function returning a `RewardResult`. Use as a context manager,
    or call `close()`.

    Example:
        >>> from rewards.math import math_reward
        >>> with RewardPool(num_workers=2, timeout_s=10) as pool:
        ...     pool.map(math_reward, [("\\\\boxed{4}", "4"), ("\\\\boxed{5}", "4")])
        [RewardResult(score=1.0, reason='correct'), RewardResult(score=0.0, reason='wrong')]
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx) for _ in range(num_workers)]
        self.timeout_s = timeout_s
        self.timeouts = 0
        self.errors = 0

    def map(self, fn: Callable[..., RewardResult], arg_tuples: Sequence[tuple[Any, ...]]) -> list[RewardResult]:
        """Results of `fn(*args)` for each args tuple, in order; failures become score-0 results."""
        results: list[RewardResult | None] = [None] * len(arg_tuples)
        pending = deque(range(len(arg_tuples)))
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.task is None and pending:
                    w.task = pending.popleft()
                    w.deadline = time.monotonic() + self.timeout_s
                    w.conn.send((w.task, fn, tuple(arg_tuples[w.task])))
            busy = [w for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in busy:
                if w.conn in ready:
                    try:
                        index, result = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory, os._exit)
                        index, result = w.task, RewardResult(0.0, "error: reward worker died")
                        self._replace(w)
                    if result.reason.startswith("error"):
                        self.errors += 1
                    results[index] = result
                    w.task = None
                elif time.monotonic() >= w.deadline:
                    results[w.task] = RewardResult(0.0, f"timeout after {self.timeout_s:g}s")
                    self.timeouts += 1
                    self._replace(w)
        return results  # type: ignore[return-value]

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        fresh = _Worker(self._ctx)
        worker.conn, worker.process = fresh.conn, fresh.process
        worker.task = None

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.process.join(timeout=2)
            if w.process.is_alive():
                w.process.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
