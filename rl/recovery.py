"""Dead actors: a vLLM engine is restarted and its work redone; a dead trainer rank stops the run cleanly.

An engine holds no state the run cannot rebuild (the weights come from the trainer), so when one dies
(killed, out of memory, a segfault in a kernel) `with_engines` starts a new one in its place, pushes
the trainer's current weights into it, and runs the failed step again: the iteration's roll-out (with
the sampler put back where it was, so the same prompts are drawn), a weight sync, the probe or an
evaluation. Restarts are bounded (`rollout.max_engine_restarts` over the run) and counted in the metrics
(`faults/engine_restarts`). A trainer rank holds the optimizer state and its shard of the model, which
only a checkpoint brings back: its death ends the run with `ActorLost`, naming the rank, the cause and
the checkpoint a resubmission continues from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ActorLost(RuntimeError):
    """An actor the run cannot do without died (a trainer rank, or an engine past its restarts)."""


def cause_of(error: Exception) -> str:
    """The line of a Ray actor error that says why the actor died, shortened."""
    text = getattr(error, "error_msg", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    why = next((line for line in lines if "exit detail" in line.lower() or "killed" in line.lower()),
               lines[-1] if lines else type(error).__name__)
    return why[:300]


def dead_index(error: Exception, actors: list) -> int | None:
    """Which of `actors` (Ray handles) the actor error `error` is about; None if none of them."""
    dead = getattr(error, "actor_id", None)
    return next((i for i, a in enumerate(actors) if dead is not None and a._actor_id.hex() == dead), None)


@dataclass
class EngineRestarts:
    """Starts a replacement for a dead engine: `start(index)` returns the new handle, ready to serve the
    start-up weights; `push(engine)` loads the trainer's current weights into it."""

    start: Callable[[int], Any]
    push: Callable[[Any], None]
    limit: int
    log: Callable[[str], None] = print
    used: int = field(default=0)

    def run(self, engines: list, step: Callable[[], Any], what: str, before_retry: Callable[[], None] | None = None):
        """`step()`, redone after replacing each engine that dies during it (in `engines`, in place)."""
        import ray

        while True:
            try:
                return step()
            except ray.exceptions.RayActorError as error:
                index = dead_index(error, engines)
                if index is None:
                    raise
                if self.used >= self.limit:
                    raise ActorLost(f"vLLM engine {index} died during {what} ({cause_of(error)}), and the run has "
                                    f"used its {self.limit} engine restarts (rollout.max_engine_restarts)") from None
                self.used += 1
                self.log(f"[rl] vLLM engine {index} died during {what} ({cause_of(error)}); restarting it with the "
                         f"current weights (restart {self.used} of at most {self.limit}) and redoing the {what}")
                ray.kill(engines[index])  # a half-dead actor must not linger
                engines[index] = self.start(index)
                self.push(engines[index])
                if before_retry is not None:
                    before_retry()
