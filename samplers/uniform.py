"""Uniform sampling without replacement within an epoch, reshuffled (seeded) every epoch."""

from __future__ import annotations

import random


class UniformSampler:
    """Every prompt once per epoch, in a seeded random order. See `samplers.base.Sampler`."""

    def __init__(self, num_prompts: int, seed: int = 0) -> None:
        if num_prompts < 1:
            raise ValueError("UniformSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)
        self._last: dict[str, float] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[int]:
        out = []
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
        groups = [r for r in rewards if r]
        self._last = {
            "sampler/epoch": float(self.epoch),
            "sampler/all_correct_groups": float(sum(min(r) == 1.0 for r in groups)),
            "sampler/all_wrong_groups": float(sum(max(r) == 0.0 for r in groups)),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(f"sampler state is for {state['num_prompts']} prompts, dataset has {self.num_prompts}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
        self._order = self._epoch_order(self.epoch)

    def metrics(self) -> dict[str, float]:
        return dict(self._last)
