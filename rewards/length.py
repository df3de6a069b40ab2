"""The Kimi k1.5 length penalty: a group reward that favours the shorter responses of a prompt.

For the k responses of one prompt, with lengths len_j in tokens:

    lambda_j = 0.5 - (len_j - min_len) / (max_len - min_len)
    len_reward_j = lambda_j if response j is correct else min(0, lambda_j)
    len_reward_j = 0 for all j when max_len == min_len

so the shortest correct response gets +0.5, the longest -0.5, and an incorrect response is only ever
penalised (never rewarded for being short). Its weight and warmup (off for the first W iterations, then
constant) are the reward spec's `weight` and `warmup_iterations`; k1.5 turns it on after a warmup because
it slows early training. Correctness is the set's correctness verdict (`RewardInput.correct`, filled in
by `RewardSet` from the `math` reward by default); lengths are `RewardInput.num_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence

from rewards.types import RewardInput, RewardResult


def length_penalty(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """The k1.5 length reward of each response of one group (see the module docstring).

    Example:
        >>> length_penalty([10, 20, 30], [True, True, False])
        [0.5, 0.0, -0.5]
        >>> length_penalty([7, 7], [True, False])
        [0.0, 0.0]
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness verdicts")
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    rewards = []
    for length, ok in zip(lengths, correct, strict=True):
        lam = 0.5 - (length - low) / (high - low)
        rewards.append(lam if ok else min(0.0, lam))
    return rewards


class LengthPenalty:
    """The `length` reward (group form): `length_penalty` over a prompt's responses. No options."""

    reward_kind = "group"
    score_range = (-0.5, 0.5)

    def __call__(self, samples: list[RewardInput]) -> list[RewardResult]:
        values = length_penalty([s.num_tokens for s in samples], [bool(s.correct) for s in samples])
        return [RewardResult(v, f"{s.num_tokens} tokens") for v, s in zip(values, samples, strict=True)]
