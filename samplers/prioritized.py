"""Prioritized sampling (Kimi k1.5): draw prompt i with probability proportional to max(1 - s_i, floor).

s_i is prompt i's running success rate over its rollouts (a reward > 0 is a success), smoothed toward a
prior: s_i = (S_i + m * prior) / (C_i + m), where S_i and C_i are the (decayed) successes and rollouts
observed so far and m = `prior_weight` pseudo-rollouts. A prompt never observed has s_i = prior. With
`decay` d < 1, an observation a iterations old counts d**a: old verdicts fade, so the estimate of a
prompt that was solved long ago drifts back to the prior and the prompt returns to the batches. The floor
keeps even a solved prompt's probability above zero.

Trade-offs, stated:
- Draws are independent (with replacement): frequencies are then exactly proportional to the weights,
  which is what the statistical test checks; the price is that a prompt can appear twice in one batch
  when a few prompts hold most of the weight (each copy gets its own k rollouts and its own update).
- Weights are recomputed over the whole pool for every batch, O(N) per iteration: ~10 ms for 3,000
  prompts on a busy 2-core CPU, seconds for a million in pure Python (a sum tree would make it O(log N) at the cost of clarity).
- The state holds the statistics of observed prompts only (sparse), so `state.json` grows with what the
  run has seen, not with the dataset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from samplers.metrics import batch_metrics, check_observation, is_success


class PrioritizedSampler:
    """Prompts drawn with probability proportional to max(1 - s_i, floor). See `samplers.base.Sampler`.

    `draw(n, pool)` draws from a subset of the prompts only (the curriculum's current level uses it);
    `next(n)` draws from all of them. If every weight in the pool is 0 (floor 0 and all solved) the draw
    falls back to uniform over the pool.

    Example:
        >>> s = PrioritizedSampler(3, seed=0, floor=0.0, prior_weight=0.0)
        >>> s.observe([0, 1], [[1.0, 1.0], [0.0, 0.0]])     # prompt 0 solved, prompt 1 failed
        >>> [s.success_rate(i) for i in range(3)]          # prompt 2 unseen: the prior
        [1.0, 0.0, 0.5]
        >>> 0 in s.next(50)
        False
    """

    kind = "prioritized"

    def __init__(self, num_prompts: int, seed: int = 0, floor: float = 0.05, prior: float = 0.5,
                 prior_weight: float = 1.0, decay: float = 1.0, levels: list[int] | None = None) -> None:
        if num_prompts < 1:
            raise ValueError("PrioritizedSampler needs at least one prompt")
        if not (0.0 <= floor <= 1.0 and 0.0 <= prior <= 1.0 and prior_weight >= 0.0 and 0.0 < decay <= 1.0):
            raise ValueError(f"PrioritizedSampler: need floor, prior in [0, 1], prior_weight >= 0, decay in (0, 1]; "
                             f"got floor={floor}, prior={prior}, prior_weight={prior_weight}, decay={decay}")
        self.num_prompts, self.seed, self.levels = num_prompts, seed, levels
        self.floor, self.prior, self.prior_weight, self.decay = floor, prior, prior_weight, decay
        self.step = 0  # observe calls so far: the clock of the decay
        self.draws = 0  # draw calls so far: each draw has its own seeded generator
        self._stats: dict[int, tuple[float, float, int]] = {}  # i -> (successes, rollouts, step of last update)
        self._last: dict[str, float] = {}

    def success_rate(self, i: int) -> float:
        """The current estimate s_i (the prior for a prompt never observed)."""
        stats = self._stats.get(i)
        if stats is None:
            return self.prior
        successes, rollouts, updated = stats
        fade = self.decay ** (self.step - updated)
        denominator = rollouts * fade + self.prior_weight
        return (successes * fade + self.prior_weight * self.prior) / denominator if denominator > 0 else self.prior

    def weight(self, i: int) -> float:
        """Unnormalised sampling weight max(1 - s_i, floor)."""
        return max(1.0 - self.success_rate(i), self.floor)

    def draw(self, n: int, pool: Sequence[int]) -> list[int]:
        """`n` independent draws from `pool`, each with probability proportional to the prompt's weight."""
        if not pool:
            raise ValueError("PrioritizedSampler.draw: empty pool")
        rng = random.Random(f"{self.seed}-prioritized-{self.draws}")
        self.draws += 1
        weights = [self.weight(i) for i in pool]
        if sum(weights) <= 0.0:
            weights = None  # floor 0 and everything solved: uniform
        return rng.choices(list(pool), weights=weights, k=n)

    def next(self, n: int) -> list[int]:
        return self.draw(n, range(self.num_prompts))

    def observe(self, indices: list[int], rewards: list[list[float]]) -> None:
        check_observation(indices, rewards, self.num_prompts)
        self.step += 1
        for i, group in zip(indices, rewards, strict=True):
            if not group:
                continue
            successes, rollouts, updated = self._stats.get(i, (0.0, 0.0, self.step))
            fade = self.decay ** (self.step - updated)
            self._stats[i] = (successes * fade + sum(is_success(r) for r in group), rollouts * fade + len(group),
                              self.step)
        self._last = {**batch_metrics(indices, rewards, self.levels), **self.estimate_metrics()}

    def estimate_metrics(self) -> dict[str, float]:
        """How the estimates look: prompts seen, their mean s_i, how many sit at the floor, and the
        effective number of prompts the weights spread over ((sum w)^2 / sum w^2)."""
        weights = [self.weight(i) for i in range(self.num_prompts)]
        seen = [self.success_rate(i) for i in self._stats]
        total, squares = sum(weights), sum(w * w for w in weights)
        return {
            "sampler/prioritized/seen_prompts": float(len(seen)),
            "sampler/prioritized/mean_success_estimate": sum(seen) / len(seen) if seen else self.prior,
            "sampler/prioritized/prompts_at_floor": float(sum(w <= self.floor for w in weights)),
            "sampler/prioritized/effective_prompts": total * total / squares if squares > 0 else 0.0,
        }

    def state_dict(self) -> dict:
        return {
            "kind": self.kind, "num_prompts": self.num_prompts, "seed": self.seed, "step": self.step,
            "draws": self.draws,
            "stats": [[i, s, c, t] for i, (s, c, t) in sorted(self._stats.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"sampler state is of kind {state.get('kind')!r}, this sampler is {self.kind!r}")
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, dataset has {self.num_prompts}")
        self.seed, self.step, self.draws = state["seed"], state["step"], state["draws"]
        self._stats = {int(i): (float(s), float(c), int(t)) for i, s, c, t in state["stats"]}

    def metrics(self) -> dict[str, float]:
        return dict(self._last)
