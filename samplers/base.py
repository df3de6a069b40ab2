"""The sampler protocol: which prompts each RL iteration trains on."""

from __future__ import annotations

from typing import Protocol


class Sampler(Protocol):
    """Produces batches of prompt indices and learns from their rewards.

    Contract: `next(n)` returns `n` indices into the dataset; `observe(indices, rewards)` receives, for
    each index of the last batch, the rewards of its k rollouts; `state_dict()` is JSON-serialisable and
    `load_state_dict(state)` restores the exact sequence of future batches.
    """

    def next(self, n: int) -> list[int]: ...

    def observe(self, indices: list[int], rewards: list[list[float]]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def metrics(self) -> dict[str, float]: ...
