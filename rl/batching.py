"""How one iteration's samples become optimizer steps, trainer ranks and micro-batches (the driver plans).

The PMD loss is a mean of per-sample terms once each sample carries its advantage (`rl.loss`), so
nothing forces a micro-batch to hold whole prompt groups: with long chains of thought, k responses of
32K tokens do not fit one backward pass. The plan:

- optimizer steps (`mini_batches`): the iteration's prompt groups, shuffled with a seed of the
  iteration (a resumed run plans the same steps), dealt round-robin to the steps;
- ranks: inside a step, samples longest first, each to the rank holding the fewest tokens so far
  (balanced by tokens, not by count: the slowest rank sets the pace);
- micro-batches: inside a rank, first-fit decreasing into bins of `max_tokens_per_micro_batch`
  prompt + response tokens (0: one micro-batch; a longer sample gets a micro-batch of its own). Every
  rank gets the same number of micro-batches (ZeRO-2/3 reduce during each backward): the short ones
  are padded with empty micro-batches, which the trainer runs as a zero loss.

Each step's loss is the mean of its samples' terms over *all* ranks: a rank's share is the sum of its
terms x world size / samples in the step (DeepSpeed then averages the gradients over the ranks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class StepPlan:
    """One optimizer step of one rank: indices into that rank's samples, by micro-batch."""

    micro_batches: list[list[int]]
    step_samples: int  # samples of the step over all ranks: the mean's denominator


def plan_update(lengths: list[int], groups: list[int], *, mini_batches: int, num_ranks: int,
                max_tokens_per_micro_batch: int, seed: int) -> tuple[list[list[int]], list[list[StepPlan]]]:
    """Assign samples to ranks, steps and micro-batches.

    Args:
        lengths: prompt + response tokens of each sample.
        groups: the prompt group of each sample (a step takes whole groups).
        mini_batches: optimizer steps wanted; fewer when there are fewer groups.
        num_ranks: trainer ranks.
        max_tokens_per_micro_batch: token budget of one micro-batch on one rank (0: no limit).
        seed: shuffles the groups over the steps.

    Returns:
        (samples of each rank: global indices, in the order the rank receives them;
         each rank's steps: `StepPlan`s whose indices point into that rank's list).

    Example:
        >>> shards, plans = plan_update([10, 30, 20, 40], [0, 0, 1, 1], mini_batches=1, num_ranks=2,
        ...                             max_tokens_per_micro_batch=40, seed=0)
        >>> shards  # 40 and 10 tokens on rank 0, 30 and 20 on rank 1
        [[3, 0], [1, 2]]
        >>> [p.micro_batches for p in plans[0]], [p.micro_batches for p in plans[1]]
        ([[[0], [1]]], [[[0], [1]]])
    """
    if len(lengths) != len(groups):
        raise ValueError(f"{len(lengths)} lengths for {len(groups)} group ids")
    if mini_batches < 1 or num_ranks < 1 or max_tokens_per_micro_batch < 0:
        raise ValueError("mini_batches and num_ranks must be >= 1, max_tokens_per_micro_batch >= 0")
    order = sorted(set(groups))
    random.Random(seed).shuffle(order)
    steps = min(mini_batches, len(order))
    shards: list[list[int]] = [[] for _ in range(num_ranks)]
    plans: list[list[StepPlan]] = [[] for _ in range(num_ranks)]
    for step in range(steps):
        chosen = set(order[step::steps])
        members = [i for i in range(len(lengths)) if groups[i] in chosen]
        per_rank = balance_by_tokens(members, lengths, num_ranks)
        micro = [pack_micro_batches(rank_members, lengths, max_tokens_per_micro_batch) for rank_members in per_rank]
        count = max(len(m) for m in micro)
        for rank in range(num_ranks):
            local = []
            for batch in micro[rank] + [[]] * (count - len(micro[rank])):
                local.append(list(range(len(shards[rank]), len(shards[rank]) + len(batch))))
                shards[rank].extend(batch)
            plans[rank].append(StepPlan(local, len(members)))
    return shards, plans


def balance_by_tokens(members: list[int], lengths: list[int], num_ranks: int) -> list[list[int]]:
    """`members` over `num_ranks`, longest first to the rank with the fewest tokens (ties: lowest rank)."""
    loads = [0] * num_ranks
    out: list[list[int]] = [[] for _ in range(num_ranks)]
    for i in sorted(members, key=lambda i: (-lengths[i], i)):
        rank = min(range(num_ranks), key=lambda r: (loads[r], r))
        out[rank].append(i)
        loads[rank] += lengths[i]
    return out


def pack_micro_batches(members: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing of `members` into micro-batches of at most `budget` tokens (0: one batch)."""
    if not members:
        return []
    if budget == 0:
        return [list(members)]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(members, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins
