"""The driver's update plan (rl.batching): whole groups per step, token-balanced ranks, budgeted micro-batches."""

import random

import pytest

from rl.batching import StepPlan, pack_micro_batches, plan_update


def _random_iteration(seed, groups=12, k=8):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(20, 200), rng.randint(500, 2000)]) for _ in range(groups * k)]
    return lengths, [i // k for i in range(groups * k)]


@pytest.mark.parametrize("ranks,budget,steps", [(1, 0, 4), (2, 1500, 4), (3, 2048, 2), (4, 600, 5)])
def test_plan_covers_every_sample_once_in_whole_group_steps(ranks, budget, steps):
    lengths, groups = _random_iteration(ranks + budget)
    shards, plans = plan_update(lengths, groups, mini_batches=steps, num_ranks=ranks,
                                max_tokens_per_micro_batch=budget, seed=7)
    assert sorted(i for shard in shards for i in shard) == list(range(len(lengths)))
    assert all(len(p) == steps for p in plans)
    for step in range(steps):
        members = [shards[r][i] for r in range(ranks) for micro in plans[r][step].micro_batches for i in micro]
        step_groups = {groups[i] for i in members}
        # whole groups: every sample of the step's groups is in the step
        assert sorted(members) == [i for i in range(len(lengths)) if groups[i] in step_groups]
        assert {plans[r][step].step_samples for r in range(ranks)} == {len(members)}
        # the same number of micro-batches on every rank (ZeRO-2/3 reduce in each backward)
        assert len({len(plans[r][step].micro_batches) for r in range(ranks)}) == 1
        for r in range(ranks):
            for micro in plans[r][step].micro_batches:
                tokens = sum(lengths[shards[r][i]] for i in micro)
                assert budget == 0 or tokens <= budget or len(micro) == 1
        loads = [sum(lengths[shards[r][i]] for micro in plans[r][step].micro_batches for i in micro)
                 for r in range(ranks)]
        # longest-first onto the least loaded rank: loads differ by at most the longest sample
        assert max(loads) - min(loads) <= max(lengths[i] for i in members)


def test_plan_is_a_function_of_the_seed_and_fewer_groups_mean_fewer_steps():
    lengths, groups = _random_iteration(0)
    a = plan_update(lengths, groups, mini_batches=4, num_ranks=2, max_tokens_per_micro_batch=1000, seed=3)
    b = plan_update(lengths, groups, mini_batches=4, num_ranks=2, max_tokens_per_micro_batch=1000, seed=3)
    c = plan_update(lengths, groups, mini_batches=4, num_ranks=2, max_tokens_per_micro_batch=1000, seed=4)
    assert a == b and a != c
    shards, plans = plan_update([10] * 6, [0, 0, 0, 1, 1, 1], mini_batches=5, num_ranks=1,
                                max_tokens_per_micro_batch=0, seed=0)
    assert len(plans[0]) == 2 and all(len(p.micro_batches) == 1 for p in plans[0])


def test_ranks_without_samples_get_padding_micro_batches():
    shards, plans = plan_update([50, 50], [0, 0], mini_batches=1, num_ranks=3, max_tokens_per_micro_batch=0, seed=0)
    assert [len(s) for s in shards] == [1, 1, 0]
    assert plans[2] == [StepPlan([[]], 2)]


def test_pack_micro_batches_first_fit_decreasing():
    lengths = [70, 20, 50, 30, 120, 10]
    assert pack_micro_batches(list(range(6)), lengths, 100) == [[4], [0, 3], [2, 1, 5]]
    assert pack_micro_batches([1, 2], lengths, 0) == [[1, 2]]
    assert pack_micro_batches([], lengths, 100) == []
    with pytest.raises(ValueError, match="group ids"):
        plan_update([1, 2], [0], mini_batches=1, num_ranks=1, max_tokens_per_micro_batch=0, seed=0)
