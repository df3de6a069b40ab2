"""Two DeepSpeed ranks (ZeRO-2, gloo) as Ray actors take the same PMD update as one rank with one
micro-batch per step: per-sample advantages, token-balanced ranks and budgeted micro-batches (padded
to equal counts) change how the work is cut, not the step."""

import pytest
import torch

pytestmark = pytest.mark.integration


def _samples(tokenizer):
    from rl.loss import advantages
    from rl.trainer import Sample
    from thinkrl.chat import prompt_ids

    texts = ["<think>3+4=7</think>\\boxed{7}", "<think>3+4=8</think>\\boxed{8}", "<think>7</think>\\boxed{7}",
             "<think>" + "3+4 is 7, check: 7-4=3. " * 6 + "</think>\\boxed{7}"]  # one long response
    samples, groups, rewards = [], [], []
    for g, question in enumerate(["3+4=?", "9-2=?", "1+1=?"]):
        prompt = prompt_ids(tokenizer, question)
        for j, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            samples.append(Sample(prompt, ids, 0.0, []))
            groups.append(g)
            rewards.append(float((j + g) % 2))
    adv = advantages(torch.tensor(rewards), torch.tensor(groups), tau=0.1).tolist()
    for s, a in zip(samples, adv, strict=True):
        s.advantage = a
    return samples, groups


def test_two_ranks_with_a_token_budget_take_the_one_rank_step(ray_local, tiny_dense):
    import ray

    from rl.batching import plan_update
    from rl.trainer import PMDSettings, PMDWorker
    from thinkrl.cluster import trainer_group
    from thinkrl.models import load_tokenizer
    from thinkrl.train_engine import DistConfig, OptimConfig

    samples, groups = _samples(load_tokenizer(tiny_dense))
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    results = {}
    for ranks, zero, budget in ((1, 1, 0), (2, 2, 100)):  # 100: ~2 short samples, a long one alone
        trainers = trainer_group(PMDWorker, ranks, lambda r, a, p, n=ranks, z=zero: (
            str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(r, n, a, p, z), 0))
        shards, plans = plan_update(lengths, groups, mini_batches=2, num_ranks=ranks,
                                    max_tokens_per_micro_batch=budget, seed=1)
        stats = ray.get([t.update.remote([samples[i] for i in shard], plan, PMDSettings(tau=0.1))
                         for t, shard, plan in zip(trainers, shards, plans, strict=True)])
        after = ray.get([trainers[0].probe_logprobs.remote(s.prompt_ids + s.response_ids, len(s.prompt_ids))
                         for s in samples])
        results[ranks] = (stats, after, plans)
        for t in trainers:
            ray.kill(t)
    (one, one_after, one_plans), (two, two_after, two_plans) = results[1], results[2]
    assert [len(p.micro_batches) for p in one_plans[0]] == [1, 1]
    micro = [[[i for i in m] for m in p.micro_batches] for p in two_plans[0] + two_plans[1]]
    assert max(len(m) for p in micro for m in p) < 4  # no micro-batch holds a whole group of 4
    assert any(m == [] for p in micro for m in p)  # a rank was padded to the other's count
    # the ranks' mean loss and the global gradient norm are the one-rank step's
    assert (two[0]["loss"] + two[1]["loss"]) / 2 == pytest.approx(one[0]["loss"], rel=1e-4)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-3)
    for a, b in zip(two_after, one_after, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
