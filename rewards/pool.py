"""A pool of reward worker processes with hard, per-call timeouts.

Each worker is a spawned process fed through a pipe. A call that runs past `timeout_s` gets its worker
killed (SIGKILL: nothing inside the call can catch or ignore it) and replaced, and fails with reason
"timeout after <t>s"; a call that raises fails with the exception as its reason; a worker that dies (out
of memory, `os._exit`) fails its call with "reward worker died". None of these costs more than that one
call. Spawned (not forked) processes, so the pool is safe to create from threads, Ray actors and
processes that hold a torch or vLLM runtime. A call's clock starts only once its worker has started up
(importing the pool's `preload` modules) and has unpickled the call (importing the plugin's module and
the modules named in its `preload` attribute), so a slow import such as sympy's never counts against a
call's time limit (loading is bounded separately, by 120 s).

Trade-offs: one call per message keeps the timeout per call exact, at a pipe round trip (~0.1 ms) per
call; the pool is driven by the thread that calls `run`/`map` (one caller at a time), which is what lets
it work from any thread without an event loop or a helper thread of its own.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import pickle
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from rewards.types import RewardResult

_MAX_FAILED_STARTS = 3
_LOAD_ALLOWANCE_S = 120.0  # unpickling a call may import a plugin's modules; bounded, but not by timeout_s


@dataclass(frozen=True)
class Outcome:
    """What one call in the pool came to: its return value, or why it has none.

    error is None on success; otherwise "error: <exception>", "timeout after <t>s" or
    "error: reward worker died". timed_out tells a timeout apart from the other failures.
    """

    value: Any = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def _worker_main(conn: Connection, preload: tuple[str, ...]) -> None:
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception:  # the call that needs it will fail, with its own message
            pass
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        try:
            task = pickle.loads(message)  # imports the call's modules: not on the call's clock
        except BaseException as e:  # noqa: B036 - an unimportable plugin costs this call only
            conn.send(("loaded",))
            index = None
            reply = ("done", index, "error: cannot load the call: " + _describe(e), None)
            conn.send(reply)
            continue
        if task is None:
            return
        index, fn, args = task
        _import_declared(fn, *args)
        conn.send(("loaded",))
        try:
            reply = ("done", index, None, fn(*args))
        except BaseException as e:  # noqa: B036 - user code (even sys.exit) costs this call only
            reply = ("done", index, "error: " + _describe(e), None)
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable return value
            conn.send(("done", index, f"error: result cannot be sent back ({type(e).__name__}: {e})", None))


def _import_declared(*objects: Any) -> None:
    """Import the modules a reward declares in `preload` (e.g. math-verify): part of loading, not of the call."""
    for obj in objects:
        modules = getattr(obj, "preload", ())
        if isinstance(modules, tuple):
            for module in modules:
                if isinstance(module, str) and module not in sys.modules:
                    try:
                        importlib.import_module(module)
                    except Exception:
                        pass


def _describe(e: BaseException) -> str:
    return traceback.format_exception_only(type(e), e)[-1].strip()


class _Worker:
    def __init__(self, ctx, preload: tuple[str, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, preload), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        """SIGKILL; the caller reaps the process later (`join`), so a cut-off is not delayed by it."""
        self.process.kill()
        self.conn.close()


class RewardPool:
    """Run calls `fn(*args)` in `num_workers` processes, each call limited to `timeout_s` seconds.

    `fn` and its arguments must be picklable (module-level functions, instances of module-level classes)
    and must not rely on global state set up in the calling process: they run in another process.
    Use as a context manager, or call `close()`. One thread at a time may call `run`/`map`.

    Example:
        >>> from rewards.math import math_reward
        >>> with RewardPool(num_workers=2, timeout_s=10) as pool:
        ...     pool.map(math_reward, [("\\\\boxed{4}", "4"), ("\\\\boxed{5}", "4")])
        [RewardResult(score=1.0, reason='correct', scores={}, correct=True), \
RewardResult(score=0.0, reason='wrong', scores={}, correct=False)]
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, preload: Sequence[str] = ()) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._ctx = mp.get_context("spawn")
        self._preload = tuple(preload)
        self._workers = [_Worker(self._ctx, self._preload) for _ in range(num_workers)]
        self._failed_starts = 0
        self._dying: list = []  # killed workers not yet reaped
        self.timeout_s = timeout_s
        self.timeouts = 0
        self.errors = 0

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def run(self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]],
            on_outcome: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
        """The `Outcome` of `fn(*args)` for each args tuple, in input order.

        `on_outcome(index, outcome)` is called as each call finishes (in completion order); if it raises,
        the calls still running are killed and the exception propagates (how a caller stops early).
        """
        outcomes: list[Outcome | None] = [None] * len(arg_tuples)
        pending = deque(range(len(arg_tuples)))
        try:
            while pending or any(w.task is not None for w in self._workers):
                for w in self._workers:
                    if w.ready and w.task is None and pending:
                        w.task = pending.popleft()
                        w.deadline = time.monotonic() + max(self.timeout_s, _LOAD_ALLOWANCE_S)
                        w.conn.send((w.task, fn, tuple(arg_tuples[w.task])))
                busy = [w for w in self._workers if w.task is not None]
                wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy else None
                ready = wait([w.conn for w in self._workers if w.task is not None or not w.ready], wait_s)
                for i, w in enumerate(self._workers):
                    if w.conn in ready:
                        done = self._receive(i, w)
                    elif w.task is not None and time.monotonic() >= w.deadline:
                        done = (w.task, Outcome(error=f"timeout after {self.timeout_s:g}s", timed_out=True))
                        self.timeouts += 1
                        self._replace(i)
                    else:
                        continue
                    if done is not None:
                        index, outcome = done
                        outcomes[index] = outcome
                        if on_outcome is not None:
                            on_outcome(index, outcome)
        except BaseException:
            for i, w in enumerate(self._workers):
                if w.task is not None:
                    self._replace(i)
            raise
        return outcomes  # type: ignore[return-value]

    def map(self, fn: Callable[..., RewardResult], arg_tuples: Sequence[tuple[Any, ...]]) -> list[RewardResult]:
        """Results of `fn(*args)` for each args tuple, in order; `fn` returns a `RewardResult`.

        A call that fails, times out or returns anything else becomes `RewardResult(0.0, <reason>)`.
        """
        results = []
        for outcome in self.run(fn, arg_tuples):
            if not outcome.ok:
                results.append(RewardResult(0.0, outcome.error))
            elif isinstance(outcome.value, RewardResult):
                results.append(outcome.value)
            else:
                self.errors += 1
                results.append(RewardResult(0.0, f"error: reward returned {type(outcome.value).__name__}, "
                                                 "not RewardResult"))
        return results

    def _receive(self, i: int, w: _Worker) -> tuple[int, Outcome] | None:
        try:
            message = w.conn.recv()
        except (EOFError, OSError):  # the worker died: out of memory, os._exit, a crash at start-up
            task = w.task
            if task is None:
                self._failed_starts += 1
                if self._failed_starts >= _MAX_FAILED_STARTS:
                    raise RuntimeError(f"reward worker processes die while starting (preload "
                                       f"{list(self._preload)}); see their stderr") from None
            self._replace(i)
            if task is None:
                return None
            self.errors += 1
            return task, Outcome(error="error: reward worker died")
        if message[0] == "ready":
            w.ready, self._failed_starts = True, 0
            return None
        if message[0] == "loaded":  # the call's own clock starts now
            w.deadline = time.monotonic() + self.timeout_s
            return None
        _, index, error, value = message
        index = w.task if index is None else index
        w.task = None
        if error is not None:
            self.errors += 1
        return index, Outcome(value=value, error=error)

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._dying = [p for p in self._dying if p.exitcode is None]  # exitcode polls (reaps) the dead
        self._dying.append(self._workers[i].process)
        self._workers[i] = _Worker(self._ctx, self._preload)

    def close(self) -> None:
        """Stop the workers (politely, then by SIGKILL after 2 s)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self._workers:
            w.process.join(timeout=2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        for process in self._dying:
            process.join(timeout=5)
        self._dying = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
