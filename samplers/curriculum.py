"""Curriculum sampling: train on the easiest difficulty level first, move to harder ones on a schedule.

Levels are the distinct difficulty values of the dataset, easiest (lowest) first; see
`samplers.difficulty` for where they come from. Each batch is drawn from the current level, plus an
optional `review_share` of it from the easier levels already passed (so they are not forgotten). The
last level is kept to the end of the run. Two schedules:

- `iterations`: level j holds for `iterations_per_level` iterations (observe calls), then the next one:
  iterations 1..P train on level 0, P+1..2P on level 1, and so on.
- `success`: stay on a level until the mean success rate of its own prompts over the last
  `success_window` iterations reaches `success_threshold` (a reward > 0 is a success); optionally move on
  anyway after `max_iterations_per_level`, so a level the model cannot learn does not stall the run.
  The window restarts at every move, so each level is held at least `success_window` iterations.

Inside a level, prompts are drawn by a *picker*: epoch-based uniform shuffling per level (kind
`curriculum`) or prioritized sampling restricted to the level (kind `curriculum+prioritized`; the
success statistics are kept for all prompts, so what was learnt on a level carries over when that level
is reviewed). Composition, not inheritance: the same `PrioritizedSampler` also runs alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from samplers.metrics import batch_metrics, check_observation, is_success
from samplers.prioritized import PrioritizedSampler
from samplers.uniform import UniformSampler


@dataclass(frozen=True)
class CurriculumSchedule:
    """When the curriculum moves to the next level (see the module docstring)."""

    mode: Literal["iterations", "success"] = "iterations"
    iterations_per_level: int = 10
    success_threshold: float = 0.7
    success_window: int = 3
    max_iterations_per_level: int | None = None


class CurriculumSampler:
    """Batches from the current difficulty level (easy to hard). See `samplers.base.Sampler`.

    Args:
        levels: one integer difficulty level per prompt (higher is harder).
        seed: seeds every draw; the same seed gives the same batches.
        schedule: when to move on.
        review_share: share of each batch drawn from the easier levels already passed (0 = none).
        prioritized: if given, draw inside a level by prioritized sampling (kind
            `curriculum+prioritized`); else uniform epochs per level (kind `curriculum`).

    Example:
        >>> s = CurriculumSampler([1, 1, 2, 2], seed=0, schedule=CurriculumSchedule(iterations_per_level=1))
        >>> sorted(s.next(2)), s.observe([0, 1], [[1.0], [0.0]]), sorted(s.next(2))
        ([0, 1], None, [2, 3])
    """

    def __init__(self, levels: list[int], seed: int = 0, schedule: CurriculumSchedule = CurriculumSchedule(),
                 review_share: float = 0.0, prioritized: PrioritizedSampler | None = None) -> None:
        if not levels:
            raise ValueError("CurriculumSampler needs at least one prompt")
        if not 0.0 <= review_share < 1.0:
            raise ValueError(f"review_share must be in [0, 1), got {review_share}")
        self.kind = "curriculum+prioritized" if prioritized is not None else "curriculum"
        self.levels, self.seed, self.schedule, self.review_share = levels, seed, schedule, review_share
        self.prioritized = prioritized
        self.level_values = sorted(set(levels))
        self.pools = {v: [i for i, level in enumerate(levels) if level == v] for v in self.level_values}
        self.level_index = 0
        self.iterations_on_level = 0
        self.window: list[float] = []  # success rate of the current level's prompts, per iteration
        self._uniform: dict[str, UniformSampler] = {}
        self._last: dict[str, float] = {}

    @property
    def level(self) -> int:
        """The current difficulty level (a value of `levels`)."""
        return self.level_values[self.level_index]

    def _pick(self, key: str, pool: list[int], n: int) -> list[int]:
        if n == 0:
            return []
        if self.prioritized is not None:
            return self.prioritized.draw(n, pool)
        if key not in self._uniform:
            self._uniform[key] = UniformSampler(len(pool), seed=f"{self.seed}-{key}")
        return [pool[p] for p in self._uniform[key].next(n)]

    def next(self, n: int) -> list[int]:
        review = round(self.review_share * n) if self.level_index > 0 else 0
        easier = [i for v in self.level_values[: self.level_index] for i in self.pools[v]]
        return (self._pick(f"level-{self.level}", self.pools[self.level], n - review)
                + self._pick(f"review-{self.level_index}", easier, review))

    def observe(self, indices: list[int], rewards: list[list[float]]) -> None:
        check_observation(indices, rewards, len(self.levels))
        if self.prioritized is not None:
            self.prioritized.observe(indices, rewards)
        current = [r for i, g in zip(indices, rewards, strict=True) if self.levels[i] == self.level for r in g]
        if current:
            self.window = (self.window + [sum(map(is_success, current)) / len(current)])[-self.schedule.success_window:]
        self.iterations_on_level += 1
        level_success = sum(self.window) / len(self.window) if self.window else 0.0
        self._last = {
            **batch_metrics(indices, rewards, self.levels),
            **(self.prioritized.estimate_metrics() if self.prioritized is not None else {}),
            "sampler/curriculum/level": float(self.level),
            "sampler/curriculum/level_index": float(self.level_index),
            "sampler/curriculum/iterations_on_level": float(self.iterations_on_level),
            "sampler/curriculum/level_success_rate": level_success,
        }
        if self._should_advance() and self.level_index < len(self.level_values) - 1:
            self.level_index += 1
            self.iterations_on_level = 0
            self.window = []

    def _should_advance(self) -> bool:
        s = self.schedule
        if s.mode == "iterations":
            return self.iterations_on_level >= s.iterations_per_level
        if s.max_iterations_per_level is not None and self.iterations_on_level >= s.max_iterations_per_level:
            return True
        return len(self.window) >= s.success_window and sum(self.window) / len(self.window) >= s.success_threshold

    def state_dict(self) -> dict:
        return {
            "kind": self.kind, "num_prompts": len(self.levels), "seed": self.seed, "level_values": self.level_values,
            "level_index": self.level_index, "iterations_on_level": self.iterations_on_level, "window": self.window,
            "uniform": {key: u.state_dict() for key, u in self._uniform.items()},
            "prioritized": self.prioritized.state_dict() if self.prioritized is not None else None,
            "schedule": asdict(self.schedule),  # for the record; the recipe's schedule is what runs
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is of kind {state.get('kind')!r}, this sampler is {self.kind!r}")
        if state["num_prompts"] != len(self.levels) or state["level_values"] != self.level_values:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts at levels {state['level_values']}, "
                             f"the dataset has {len(self.levels)} prompts at levels {self.level_values}")
        self.seed, self.level_index = state["seed"], state["level_index"]
        self.iterations_on_level, self.window = state["iterations_on_level"], list(state["window"])
        self._uniform = {}
        for key, sub in state["uniform"].items():
            pool_size = sub["num_prompts"]
            self._uniform[key] = UniformSampler(pool_size, seed=sub["seed"])
            self._uniform[key].load_state_dict(sub)
        if self.prioritized is not None:
            self.prioritized.load_state_dict(state["prioritized"])

    def metrics(self) -> dict[str, float]:
        return dict(self._last)
