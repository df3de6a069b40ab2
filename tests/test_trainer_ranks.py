"""Two DeepSpeed ranks (ZeRO-2 and ZeRO-3, gloo) as Ray actors take the same PMD and SFT updates as one
rank: per-sample advantages, token-balanced ranks and budgeted micro-batches (padded to equal counts)
change how the work is cut, not the step; under ZeRO-3 the weights a sync or an export gathers from the
partitions are the one-rank weights."""

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


def _full_weights(trainers):
    """Rank 0's gathered weights (every rank takes part in the ZeRO-3 gather)."""
    import ray

    def weights(actor):
        return actor.engine.full_state_dict(checkpoint_names=False)

    return ray.get([t.__ray_call__.remote(weights) for t in trainers])[0]


def test_two_ranks_zero2_and_zero3_take_the_one_rank_pmd_step(ray_local, tiny_dense):
    import ray

    from rl.batching import plan_update
    from rl.trainer import PMDSettings, PMDWorker
    from thinkrl.cluster import trainer_group
    from thinkrl.models import load_tokenizer
    from thinkrl.train_engine import DistConfig, OptimConfig

    samples, groups = _samples(load_tokenizer(tiny_dense))
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    results = {}
    for ranks, zero, budget in ((1, 1, 0), (2, 2, 100), (2, 3, 100)):  # 100: ~2 short samples, a long one alone
        trainers = trainer_group(PMDWorker, ranks, lambda r, a, p, n=ranks, z=zero: (
            str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(r, n, a, p, z), 0))
        shards, plans = plan_update(lengths, groups, mini_batches=2, num_ranks=ranks,
                                    max_tokens_per_micro_batch=budget, seed=1)
        stats = ray.get([t.update.remote([samples[i] for i in shard], plan, PMDSettings(tau=0.1))
                         for t, shard, plan in zip(trainers, shards, plans, strict=True)])
        # under ZeRO-3 a forward pass is a collective: every rank computes the probe
        after = [ray.get([t.probe_logprobs.remote(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for t in trainers])[0]
                 for s in samples]
        results[zero] = (stats, after, plans, _full_weights(trainers))
        for t in trainers:
            ray.kill(t)
    one, one_after, one_plans, one_weights = results[1]
    assert [len(p.micro_batches) for p in one_plans[0]] == [1, 1]
    for zero in (2, 3):
        two, two_after, two_plans, two_weights = results[zero]
        micro = [[[i for i in m] for m in p.micro_batches] for p in two_plans[0] + two_plans[1]]
        assert max(len(m) for p in micro for m in p) < 4  # no micro-batch holds a whole group of 4
        assert any(m == [] for p in micro for m in p)  # a rank was padded to the other's count
        # the ranks' mean loss and the global gradient norm are the one-rank step's
        assert (two[0]["loss"] + two[1]["loss"]) / 2 == pytest.approx(one[0]["loss"], rel=1e-4), zero
        assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-3), zero
        for a, b in zip(two_after, one_after, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
        assert two_weights.keys() == one_weights.keys()
        # Adam moves an element whose gradient is ~0 by up to lr whatever its size: the order of a sum alone
        # shifts a few such elements by ~1e-5 (2 of 49,152 by 2.3e-5 at lr 3e-3); 1e-4 is 3% of lr
        for name, tensor in two_weights.items():
            torch.testing.assert_close(tensor, one_weights[name], rtol=1e-4, atol=1e-4, msg=lambda m, z=zero, n=name: f"zero {z}: {n}: {m}")


def test_two_ranks_zero2_and_zero3_take_the_one_rank_sft_step(ray_local, tiny_dense):
    import ray

    from sft.worker import SFTWorker
    from thinkrl.chat import encode_conversation
    from thinkrl.cluster import trainer_group
    from thinkrl.models import load_tokenizer
    from thinkrl.tasks import arithmetic
    from thinkrl.train_engine import DistConfig, OptimConfig

    tokenizer = load_tokenizer(tiny_dense)
    rows = arithmetic.sft_conversations(arithmetic.make_rows(8, seed=3, max_ops=2), seed=3)
    batch = [encode_conversation(tokenizer, r["messages"]) for r in rows]
    results = {}
    for ranks, zero in ((1, 1), (2, 2), (2, 3)):
        workers = trainer_group(SFTWorker, ranks, lambda r, a, p, n=ranks, z=zero: (
            str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(r, n, a, p, z), 0, 1))
        per_rank = len(batch) // ranks
        tokens = SFTWorker.loss_tokens(batch)
        assert SFTWorker.loss_tokens(batch[:per_rank]) != tokens / 2  # the ranks hold different token counts
        steps = []
        for _ in range(2):  # the second step runs on the first's optimizer state
            steps.append(ray.get([w.train_step.remote(batch[r * per_rank : (r + 1) * per_rank], None, "auto", tokens)
                                  for r, w in enumerate(workers)]))
        results[zero] = (steps, _full_weights(workers))
        for w in workers:
            ray.kill(w)
    one_steps, one_weights = results[1]
    for zero in (2, 3):
        steps, weights = results[zero]
        assert sum(r["loss"] for r in steps[0]) / 2 == pytest.approx(one_steps[0][0]["loss"], rel=1e-5), zero
        assert steps[0][0]["grad_norm"] == pytest.approx(one_steps[0][0]["grad_norm"], rel=1e-3), zero
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, one_weights[name], rtol=1e-4, atol=1e-4, msg=lambda m, z=zero, n=name: f"zero {z}: {n}: {m}")
