"""The PMD trainer rank on real DeepSpeed (CPU accelerator, gloo), without Ray."""

import os

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(tiny_dense):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from rl.trainer import PMDWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    return PMDWorker(str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(master_port=free_port(), zero_stage=1), seed=0)


def _samples(worker, rewards):
    """Four responses to one prompt, with their advantages (reward minus the group mean) and, as the
    "rollout" log-probs, the trainer's own."""
    from rl.trainer import Sample
    from thinkrl.chat import prompt_ids

    tok = worker.engine.tokenizer
    prompt = prompt_ids(tok, "3+4=?")
    responses = ["<think>3+4=7</think>\\boxed{7}", "<think>3+4=8</think>\\boxed{8}",
                 "<think>3+4=6</think>\\boxed{6}", "<think>3+4=9</think>\\boxed{9}"]
    mean = sum(rewards) / len(rewards)
    out = []
    for r, text in zip(rewards, responses, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(Sample(prompt, ids, r - mean, worker.probe_logprobs(prompt + ids, len(prompt))))
    return out


def _one_step(samples):
    from rl.batching import StepPlan

    return [StepPlan([list(range(len(samples)))], len(samples))]


def test_update_raises_rewarded_response_and_reports_gap(worker):
    from rl.trainer import PMDSettings

    samples = _samples(worker, [1.0, 0.0, 0.0, 0.0])
    before = [sum(s.rollout_logprobs) for s in samples]
    stats = worker.update(samples, _one_step(samples), PMDSettings(tau=0.1))
    after = [sum(worker.probe_logprobs(s.prompt_ids + s.response_ids, len(s.prompt_ids))) for s in samples]
    assert after[0] > before[0]
    assert sum(a - b for a, b in zip(after[1:], before[1:], strict=True)) < 0
    # log pi_theta_i was recomputed under the same weights the "rollout" log-probs came from
    assert stats["logprob_gap_vllm_trainer"] < 1e-4
    assert stats["grad_norm"] > 0 and stats["loss"] > 0 and stats["steps"] == 1


def test_equal_rewards_give_no_update(worker):
    from rl.trainer import PMDSettings

    samples = _samples(worker, [1.0, 1.0, 1.0, 1.0])
    stats = worker.update(samples, _one_step(samples), PMDSettings(tau=0.1))
    assert stats["grad_norm"] == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("old_logprobs", ["trainer", "rollout"])
def test_old_logprobs_match_each_sample_across_steps(worker, old_logprobs):
    """Equal rewards give a zero gradient, so the weights stay theta_i through both steps: every log-ratio
    must then be ~0, which holds only if each sample got its own log pi_theta_i, whether from the first
    step's forward, the no-grad pass over the second, or vLLM's numbers (summed in float64 on both sides:
    float32 sums differ by one rounding step, which a freshly reset Adam turns into a full-size step)."""
    from dataclasses import replace

    from rl.batching import StepPlan
    from rl.trainer import PMDSettings

    samples = _samples(worker, [1.0, 1.0, 1.0, 1.0])
    plans = [StepPlan([[0], [1]], 2), StepPlan([[2, 3]], 2)]
    stats = worker.update(samples, plans, PMDSettings(tau=0.1, old_logprobs=old_logprobs))
    assert stats["log_ratio_abs_max"] < 1e-9
    assert stats["logprob_gap_vllm_trainer"] < 1e-4
    with pytest.raises(ValueError, match="old_logprobs"):
        PMDSettings(tau=0.1, old_logprobs="engine")
    if old_logprobs == "rollout":
        with pytest.raises(ValueError, match="sample 0 has 0 for"):
            worker.update([replace(samples[0], rollout_logprobs=[]), *samples[1:]], plans,
                          PMDSettings(tau=0.1, old_logprobs="rollout"))


def test_micro_batches_under_a_token_budget_take_the_whole_batch_step(tiny_dense):
    """Micro-batches smaller than a prompt group (per-sample advantages, rl.max_tokens_per_micro_batch)
    move the weights exactly as one micro-batch per step: two fresh ranks, the same two steps (the
    second with a non-zero log-ratio, so the tau term acts too), the same log-probs afterwards."""
    from rl.batching import plan_update
    from rl.trainer import PMDSettings, PMDWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    results = {}
    for budget in (0, 40):
        worker = PMDWorker(str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(master_port=free_port()), seed=0)
        samples = _samples(worker, [1.0, 0.0, 0.0, 1.0]) + _samples(worker, [0.0, 0.0, 0.0, 1.0])
        groups = [0] * 4 + [1] * 4
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        [shard], [plans] = plan_update(lengths, groups, mini_batches=2, num_ranks=1,
                                       max_tokens_per_micro_batch=budget, seed=0)
        stats = worker.update([samples[i] for i in shard], plans, PMDSettings(tau=0.1))
        after = [worker.probe_logprobs(s.prompt_ids + s.response_ids, len(s.prompt_ids)) for s in samples]
        results[budget] = (stats, after, plans)
    (whole, whole_after, whole_plans), (split, split_after, split_plans) = results[0], results[40]
    assert [len(p.micro_batches) for p in whole_plans] == [1, 1]
    assert all(len(p.micro_batches) == 4 for p in split_plans)  # one sample each: less than a group
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert split["kl_to_prev_est"] > 0  # the second step saw moved weights
    for a, b in zip(split_after, whole_after, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)


def test_length_buckets_match_one_padded_batch(worker):
    """The bucketed forward gives each sample the log-probs and the gradient of one padded batch."""
    import random

    from rl.trainer import Sample

    rng = random.Random(0)
    vocab = worker.engine.module.config.vocab_size
    samples = [Sample([rng.randrange(3, vocab) for _ in range(p)], [rng.randrange(3, vocab) for _ in range(r)], 0.0, [])
               for p, r in [(12, 90), (9, 3), (15, 40), (10, 4), (12, 88), (11, 41)]]
    results = {}
    for name, overhead in (("one batch", 10**12), ("buckets", 0)):
        worker.bucket_overhead_tokens = overhead
        worker.engine.module.zero_grad(set_to_none=True)
        seq_logp, token_logps = worker._logprobs(samples)
        (seq_logp * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per sample: order matters
        grads = [p.grad.clone() for p in worker.engine.module.parameters() if p.grad is not None]
        results[name] = (seq_logp.detach(), [t.detach() for t in token_logps], grads)
    worker.engine.module.zero_grad(set_to_none=True)
    worker.bucket_overhead_tokens = 64
    (one, one_tokens, one_grads), (bucketed, bucket_tokens, bucket_grads) = results["one batch"], results["buckets"]
    assert [len(t) for t in bucket_tokens] == [len(s.response_ids) for s in samples]
    torch.testing.assert_close(bucketed, one, rtol=1e-5, atol=1e-4)
    for a, b in zip(bucket_tokens, one_tokens, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(bucket_grads) == len(one_grads) > 0
    for a, b in zip(bucket_grads, one_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_synced_and_exported_weights_are_the_trainers(worker, tmp_path):
    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import WeightBucket

    buckets = list(worker.engine.weight_buckets(bucket_bytes=64 << 10))  # small buckets: several of them
    assert len(buckets) > 3
    synced = {}
    for bucket in buckets:
        packed = WeightBucket.pack(bucket)  # what travels through Ray's object store
        synced.update({name: t.clone() for name, t in packed.tensors()})
    worker.save_hf(str(tmp_path / "hf"))
    reloaded = load_causal_lm(tmp_path / "hf").state_dict()
    for name, tensor in worker.engine.module.state_dict().items():
        if name != "lm_head.weight" or "lm_head.weight" in synced:  # a tied head travels once
            torch.testing.assert_close(synced[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(reloaded[name], tensor)


def test_a_rank_starts_past_a_stale_extension_lock(tiny_dense, tmp_path):
    """A process killed while torch compiled an extension leaves `lock` in its build folder, and torch then
    waits for it without end. On CPU a rank must not build DeepSpeed's shared-memory op at all: with such a
    lock planted in a fresh extensions folder, a rank starts and computes, and nothing is built there."""
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"  # with TORCH_EXTENSIONS_DIR set, torch builds in <dir>/<op name>
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    code = (
        "from rl.trainer import PMDWorker\n"
        "from thinkrl.cluster import free_port\n"
        "from thinkrl.train_engine import DistConfig, OptimConfig\n"
        f"w = PMDWorker({str(tiny_dense)!r}, OptimConfig(lr=1e-3), DistConfig(master_port=free_port()), seed=0)\n"
        "print('logprob', sum(w.probe_logprobs([1, 2, 3, 4], 2)))\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the rank waited on the planted lock for 180 s; its output: {e.stderr!r:.2000}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "logprob" in out.stdout
    assert [p.name for p in extensions.rglob("*") if p.is_file()] == ["lock"]
