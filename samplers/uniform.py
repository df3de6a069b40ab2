"""Uniform sampling without replacement within an epoch, reshuffled (seeded) every epoch.

Each epoch's order is a pure function of (seed, epoch), so the state is two integers and a resumed run
draws exactly the batches the uninterrupted one would have. A batch that crosses an epoch boundary takes
the rest of one epoch and the start of the next (so a prompt can appear twice in it only when the batch
is larger than the dataset).
"""

from __future__ import annotations

import random

from samplers.metrics import batch_metrics, check_observation


class UniformSampler:
    """Every prompt once per epoch, in a seeded random order. See `samplers.base.Sampler`.

    `levels` (optional, one difficulty level per prompt) only feeds the `sampler/batch_share/...`
    metrics.

    Example:
        >>> s = UniformSampler(4, seed=0)
        >>> sorted(s.next(4)) == [0, 1, 2, 3]
        True
    """

    kind = "uniform"

    def __init__(self, num_prompts: int, seed: int | str = 0, levels: list[int] | None = None) -> None:
        if num_prompts < 1:
            raise ValueError("UniformSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.levels = levels
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)
        self._last: dict[str, float] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), self.num_prompts - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
        return out

    def observe(self, indices: list[int], rewards: list[list[float]]) -> None:
        check_observation(indices, rewards, self.num_prompts)
        self._last = {"sampler/epoch": float(self.epoch), **batch_metrics(indices, rewards, self.levels)}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epoch": self.epoch, "position": self.position,
                "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"sampler state is of kind {state['kind']!r}, this sampler is {self.kind!r}")
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, dataset has {self.num_prompts}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order = self._epoch_order(self.epoch)

    def metrics(self) -> dict[str, float]:
        return dict(self._last)
