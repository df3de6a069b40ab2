"""Partial rollouts: the replay buffer's bookkeeping and the maths of the `mask` and `importance` losses
(pure, no Ray), then the PMD trainer rank on real DeepSpeed with samples that span several weights."""

import json
import os

import pytest
import torch

from rl.loss import advantages, importance_weights, pmd_terms
from rollout.partial import ReplayBuffer

PROMPTS = [[100 + i] for i in range(10)]


def _segment(tokens, reason, lp=-1.0):
    return tokens, [lp] * len(tokens), reason, None


def test_a_cut_trajectory_continues_from_exactly_its_tokens():
    buffer = ReplayBuffer(segment_tokens=3, max_segments=4, max_tokens=8)
    buffer.add([2, 5], k=2, iteration=1)
    first = buffer.requests(PROMPTS)
    assert [(r.prompt_ids, r.max_tokens, r.continued) for r in first] == [([102], 3, 0)] * 2 + [([105], 3, 0)] * 2
    buffer.extend(first, [_segment([1, 2, 3], "length"), _segment([4], "stop"),
                          _segment([5, 6], "stop"), _segment([7, 8], "stop")], iteration=1)
    [done] = buffer.pop_finished()  # row 5's group: both samples stopped
    assert done.row == 5 and [s.tokens for s in done.samples] == [[5, 6], [7, 8]]
    buffer.add([9], k=2, iteration=2)
    second = buffer.requests(PROMPTS)
    # the unfinished sample goes on from its three tokens; the finished one of its group waits
    assert [(r.prompt_ids, r.max_tokens, r.continued) for r in second] == [
        ([102, 1, 2, 3], 3, 3), ([109], 3, 0), ([109], 3, 0)]
    buffer.extend(second, [_segment([9, 9, 9], "length", -2.0), _segment([1], "stop"), _segment([2], "stop")], 2)
    assert [g.row for g in buffer.pop_finished()] == [9]
    s = buffer.groups[0].samples[0]
    assert s.tokens == [1, 2, 3, 9, 9, 9] and s.segments == [[1, 3], [2, 3]] and s.finish_reason is None
    assert s.tokens_before(3) == 6 and s.tokens_before(2) == 3 and s.logprobs == [-1.0] * 3 + [-2.0] * 3
    # the last segment may ask only what is left of max_tokens
    assert [(r.max_tokens, r.continued) for r in buffer.requests(PROMPTS)] == [(2, 6)]


@pytest.mark.parametrize(("segment_tokens", "max_segments", "lengths", "finished"), [
    (3, 2, [3, 3], "length"),    # past max_segments: truncated
    (3, 5, [3, 3, 2], "length"),  # max_tokens (8) reached
])
def test_a_trajectory_ends_truncated_at_its_limits(segment_tokens, max_segments, lengths, finished):
    buffer = ReplayBuffer(segment_tokens, max_segments, max_tokens=8)
    buffer.add([0], k=1, iteration=1)
    for it, n in enumerate(lengths, start=1):
        [req] = buffer.requests(PROMPTS)
        assert buffer.pop_finished() == []
        buffer.extend([req], [_segment([7] * n, "length")], it)
    [group] = buffer.pop_finished()
    assert group.samples[0].finish_reason == finished and len(group.samples[0].segments) == len(lengths)


def test_without_partial_rollouts_every_group_finishes_in_its_iteration():
    buffer = ReplayBuffer(segment_tokens=8, max_segments=1, max_tokens=8)
    buffer.add([0, 1], k=2, iteration=1)
    reqs = buffer.requests(PROMPTS)
    buffer.extend(reqs, [_segment([1] * 8, "length"), _segment([2], "stop"), _segment([3], "repeat"),
                         _segment([4], "stop")], 1)
    assert [[s.finish_reason for s in g.samples] for g in buffer.pop_finished()] == [["length", "stop"],
                                                                                    ["repeat", "stop"]]
    assert buffer.groups == []


def test_each_loss_leaves_out_its_own_context_tokens():
    """A group whose first sample stopped in iteration 1 and whose second needed iteration 2 too: `mask`
    trains none of the first (all its tokens predate iteration 2) and the second's new segment; `last_segment`
    trains each sample's own last segment; `importance` leaves nothing out (the count is its weighted prefix)."""
    buffer = ReplayBuffer(segment_tokens=3, max_segments=4, max_tokens=8)
    buffer.add([2], k=2, iteration=1)
    buffer.extend(buffer.requests(PROMPTS), [_segment([4, 4], "stop"), _segment([1, 2, 3], "length")], iteration=1)
    buffer.extend(buffer.requests(PROMPTS), [_segment([5], "stop")], iteration=2)
    [group] = buffer.pop_finished()
    counts = {loss: [s.context_tokens(2, loss) for s in group.samples] for loss in ("mask", "last_segment", "importance")}
    assert counts == {"mask": [2, 3], "last_segment": [0, 3], "importance": [2, 3]}


def test_the_buffer_survives_json_and_refuses_other_cuts():
    buffer = ReplayBuffer(segment_tokens=2, max_segments=3, max_tokens=6)
    buffer.add([3, 4], k=2, iteration=1)
    reqs = buffer.requests(PROMPTS)
    buffer.extend(reqs, [(_segment([1, 2], "length")[:3] + ([103, 55],)), _segment([3], "stop"),
                         _segment([4, 5], "length"), _segment([6, 7], "length")], 1)
    state = json.loads(json.dumps(buffer.state_dict()))
    restored = ReplayBuffer(2, 3, 6)
    restored.load_state_dict(state)
    assert restored.state_dict() == buffer.state_dict()
    assert [(r.prompt_ids, r.max_tokens) for r in restored.requests(PROMPTS)] == \
        [(r.prompt_ids, r.max_tokens) for r in buffer.requests(PROMPTS)]
    # the expanded prompt an engine returned is kept without the continued tokens
    assert restored.groups[0].samples[0].prompt_ids == [103, 55]
    with pytest.raises(ValueError, match="segment_tokens, max_segments, max_tokens = \\(2, 3, 6\\).*rollout.partial"):
        ReplayBuffer(4, 3, 6).load_state_dict(state)


def test_buffer_metrics_count_what_waits_and_what_spanned_segments():
    buffer = ReplayBuffer(segment_tokens=2, max_segments=3, max_tokens=6)
    buffer.add([0], k=2, iteration=1)
    buffer.extend(buffer.requests(PROMPTS), [_segment([1, 1], "length"), _segment([2], "stop")], 1)
    buffer.add([1], k=2, iteration=2)
    buffer.extend(buffer.requests(PROMPTS), [_segment([3], "stop"), _segment([4, 4], "length"),
                                             _segment([5], "stop")], 2)
    finished = buffer.pop_finished()
    m = buffer.metrics(3, finished)
    assert [g.row for g in finished] == [0]
    assert m["rollout/partial/buffer_groups"] == 1 and m["rollout/partial/buffer_unfinished_samples"] == 1
    assert m["rollout/partial/partial_sample_share"] == 0.5 and m["rollout/partial/finished_group_age_mean"] == 2
    assert m["rollout/partial/buffer_age_max"] == 1 and m["rollout/partial/buffer_tokens"] == 3


# ---- the maths on tensors: a policy of independent per-position softmaxes, theta = logits ------------

def _policy_logp(theta_T_V, tokens, start=0):
    """log pi_theta(tokens[start:] | tokens[:start]) of a toy policy with one softmax per position."""
    logp_T_V = torch.log_softmax(theta_T_V, -1)
    return sum(logp_T_V[t, tok] for t, tok in enumerate(tokens) if t >= start)


def _grad(loss_fn, theta):
    theta = theta.clone().requires_grad_(True)
    loss_fn(theta).backward()
    return theta.grad


def test_mask_gradient_is_the_policy_gradient_of_the_new_segment_only():
    torch.manual_seed(0)
    theta = torch.randn(6, 4, dtype=torch.float64)
    responses = [[0, 1, 2, 3, 1, 0], [2, 2, 1, 0, 3, 3], [1, 0, 0, 2, 2, 1]]
    earlier = [4, 0, 6]  # the third sample's whole response predates this iteration
    adv = advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.long), tau=0.1)

    def loss(th):
        logp = torch.stack([_policy_logp(th, y, e) if e < len(y) else th.sum() * 0 for y, e in
                            zip(responses, earlier, strict=True)])
        return pmd_terms(logp, logp.detach(), adv, tau=0.1).mean()

    expected = _grad(lambda th: -sum(a * _policy_logp(th, y, e) for a, y, e in zip(adv, responses, earlier, strict=True)
                                     if e < len(y)) / 3, theta)
    got = _grad(loss, theta)
    torch.testing.assert_close(got, expected)
    assert got[:4].abs().sum() > 0  # the second sample trains every position
    # the first sample's earlier tokens (positions 0-3) get no gradient of their own: drop the second
    only_first = _grad(lambda th: pmd_terms(_policy_logp(th, responses[0], 4).reshape(1),
                                            _policy_logp(th, responses[0], 4).detach().reshape(1), adv[:1], 0.1).mean(),
                       theta)
    assert only_first[:4].abs().sum() == 0 and only_first[4:].abs().sum() > 0


def test_importance_gradient_is_the_clipped_ratio_weighted_policy_gradient():
    torch.manual_seed(1)
    theta = torch.randn(5, 3, dtype=torch.float64)
    responses = [[0, 1, 2, 0, 1], [2, 1, 0, 0, 2]]
    earlier = [3, 2]
    behaviour = torch.tensor([_policy_logp(theta, y[:e]).item() + d for y, e, d in
                              zip(responses, earlier, [0.5, -3.0], strict=True)], dtype=torch.float64)
    old_prefix = torch.stack([_policy_logp(theta, y[:e]) for y, e in zip(responses, earlier, strict=True)])
    w = importance_weights(old_prefix, behaviour, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([torch.exp(torch.tensor(-0.5)).item(), 2.0], dtype=torch.float64))
    adv = torch.tensor([0.7, -0.7], dtype=torch.float64)

    def loss(th):
        logp = torch.stack([_policy_logp(th, y) for y in responses])
        return pmd_terms(logp, logp.detach(), adv, tau=0.1, weights=w).mean()

    expected = _grad(lambda th: -sum(wj * a * _policy_logp(th, y) for wj, a, y in zip(w, adv, responses, strict=True))
                     / 2, theta)
    torch.testing.assert_close(_grad(loss, theta), expected)
    # away from theta_i the tau term pulls back, weighted the same way
    moved = theta + 0.1
    logp_old = torch.stack([_policy_logp(theta, y) for y in responses])
    got = _grad(lambda th: pmd_terms(torch.stack([_policy_logp(th, y) for y in responses]), logp_old, adv, 0.1,
                                     weights=w).mean(), moved)
    d = torch.stack([_policy_logp(moved, y) for y in responses]) - logp_old
    expected = _grad(lambda th: sum(wj * (a - 0.1 * dj) * -_policy_logp(th, y) for wj, a, dj, y in
                                    zip(w, adv, d, responses, strict=True)) / 2, moved)
    torch.testing.assert_close(got, expected)


# ---- the trainer rank on real DeepSpeed -----------------------------------------------------------

def _worker(model):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from rl.trainer import PMDWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    return PMDWorker(str(model), OptimConfig(lr=3e-3), DistConfig(master_port=free_port(), zero_stage=1), seed=0)


def _params(worker):
    return {k: v.detach().clone() for k, v in worker.engine.engine.module.state_dict().items()}


def _texts(worker):
    from thinkrl.chat import prompt_ids

    tok = worker.engine.tokenizer
    prompt = prompt_ids(tok, "12+30=?")
    responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in
                 ["<think>12+30=42. Check: 42-30=12.</think>\\boxed{42}", "<think>12+30=41</think>\\boxed{41}"]]
    return prompt, responses


@pytest.mark.integration
def test_trainer_mask_equals_training_on_the_earlier_tokens_as_prompt(tiny_dense):
    """Under `mask`, a sample's earlier segments are context: the update is the one of a sample whose
    prompt ends with them. Under `importance`, one step equals plain samples with w_j * a_j as advantages."""
    from rl.batching import StepPlan
    from rl.trainer import PMDSettings, Sample

    a, b = _worker(tiny_dense), _worker(tiny_dense)
    prompt, (r1, r2) = _texts(a)
    plan = [StepPlan([[0, 1]], 2)]
    cut = 9
    partial = [Sample(prompt, r1, 0.5, a.probe_logprobs(prompt + r1, len(prompt)), earlier_tokens=cut),
               Sample(prompt, r2, -0.5, a.probe_logprobs(prompt + r2, len(prompt)))]
    moved = [Sample(prompt + r1[:cut], r1[cut:], 0.5, partial[0].rollout_logprobs[cut:]), partial[1]]
    a.update(partial, plan, PMDSettings(tau=0.1, partial_loss="mask"))
    b.update(moved, plan, PMDSettings(tau=0.1))
    pa, pb = _params(a), _params(b)
    assert not any((pa[k] != pb[k]).any() for k in pa)
    # last_segment leaves out the earlier_tokens the driver counted for it, as mask does
    e = _worker(tiny_dense)
    e.update(partial, plan, PMDSettings(tau=0.1, partial_loss="last_segment"))
    pe = _params(e)
    assert not any((pa[k] != pe[k]).any() for k in pa)
    changed = _params(_worker(tiny_dense))
    assert any((pa[k] != changed[k]).any() for k in pa)  # and the update did move the weights

    # importance: the behaviour gave the earlier tokens log 2 less than theta_i does, so w = 2 (the clip: 3)
    c, d = _worker(tiny_dense), _worker(tiny_dense)
    lp = c.probe_logprobs(prompt + r1, len(prompt))
    behaviour = [x - 0.6931471805599453 / cut if t < cut else x for t, x in enumerate(lp)]
    weighted = [Sample(prompt, r1, 0.5, behaviour, earlier_tokens=cut),
                Sample(prompt, r2, -0.5, c.probe_logprobs(prompt + r2, len(prompt)))]
    stats = c.update(weighted, plan, PMDSettings(tau=0.1, partial_loss="importance", importance_clip=3.0))
    d.update([Sample(prompt, r1, 1.0, lp), weighted[1]], plan, PMDSettings(tau=0.1))
    assert stats["importance_weight_mean"] == pytest.approx(1.5, abs=1e-5)
    pc, pd = _params(c), _params(d)
    for k in pc:
        torch.testing.assert_close(pc[k], pd[k], rtol=1e-4, atol=1e-6)


# ---- the loop on real Ray, vLLM and DeepSpeed -----------------------------------------------------

PLUGINS = os.path.join(os.path.dirname(__file__), "fixtures", "reward_plugin")


@pytest.fixture(scope="module")
def partial_loop(ray_local, tmp_path_factory, tiny_dense):
    """The tiny recipe's loop on the untrained tiny model (its responses run to the budget), segments of 12
    tokens, at most 2 per trajectory, a reward that varies on any text: a coin per sample, and groups of 8 so
    that an update without a group of mixed rewards (one that leaves the weights as they were) is a 1-in-16,000
    chance (each group of k is all-equal with probability 2 / 2**k; with k=2 the test failed one run in four)."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PLUGINS, os.environ.get("PYTHONPATH")]))
    import sys

    sys.path.insert(0, PLUGINS)
    from rewards.combine import RewardSet
    from rl.config import Recipe
    from rl.setup import build_loop, start_actors
    from thinkrl.config import load_recipe
    from thinkrl.run import prepare_run

    root = tmp_path_factory.mktemp("partial")
    recipe = load_recipe(Recipe, "recipes/tiny.yaml", [
        f"run.output_dir={root / 'run'}", "data.n_train=32", "data.n_heldout=4", "sft.enabled=false",
        "rollout.num_engines=1", "rollout.max_tokens=30", "rollout.partial.segment_tokens=12",
        "rollout.partial.max_segments=2", "rl.prompts_per_iteration=2", "rl.samples_per_prompt=8",
        "rl.mini_batches=1", "rl.lr=3e-3", "rl.old_logprobs=trainer", "reward.rewards=['user_rewards:coin']",
        "reward.num_workers=1", "sampler.kind=uniform",
        # the engine keeps plain weights: its syncs (one copy out of the trainer's arena) pass the probe here
        "rollout.cpu_weights=plain"])
    run = prepare_run(recipe.run, recipe.model, recipe.data)
    trainers, engines = start_actors(recipe, tiny_dense, None, run.dir)
    rewards = RewardSet(recipe.reward.rewards, 1, 10.0)
    loop = build_loop(recipe, run, trainers, engines, rewards, {})
    yield recipe, run, loop
    rewards.close()


@pytest.mark.integration
def test_cut_trajectories_continue_from_their_tokens_under_the_new_weights(partial_loop):
    import ray
    from transformers import AutoModelForCausalLM

    from rl.loop import roll_out, run_iteration

    recipe, run, loop = partial_loop
    first = run_iteration(loop, 1)  # nothing finishes in its first segment: no update yet
    assert first["rollout/partial/finished_groups"] == 0 and first["train/groups_in_update"] == 0
    # the untrained model seldom ends within 12 tokens: each sample that did not is cut at the budget and waits
    samples = [s for g in loop.buffer.groups for s in g.samples]
    running = [s for s in samples if s.finish_reason is None]
    assert len(samples) == 16 and len(running) >= 12 and all(len(s.tokens) == 12 for s in running)
    assert first["rollout/partial/buffer_unfinished_samples"] == len(running)
    assert first["rollout/tokens_generated"] == sum(len(s.tokens) for s in samples)
    second = run_iteration(loop, 2)  # iteration 1's groups end (max_segments) and are trained
    assert second["rollout/partial/finished_groups"] == 2 and second["train/groups_in_update"] == 2
    # the share of its samples that spanned two segments: those cut in iteration 1
    assert second["rollout/partial/partial_sample_share"] == len(running) / 16 and second["optim/steps"] == 1
    assert second["sync/probe_gap_after_sync"] < 1e-3
    waiting = {id(s): list(s.tokens) for g in loop.buffer.groups for s in g.samples}
    rows = [g.row for g in loop.buffer.groups]
    finished, _ = roll_out(loop, 3)  # iteration 2's groups: their second segment, under the weights of update 2
    assert [g.row for g in finished] == rows
    base = AutoModelForCausalLM.from_pretrained(str(run.base_model)).eval()
    continued = 0
    for group in finished:
        prompt = loop.train_prompts[group.row]
        for s in group.samples:
            cut = len(waiting[id(s)])
            if cut < 12:  # ended (end of sequence) inside its first segment: not continued, nothing added
                assert s.tokens == waiting[id(s)] and s.segments == [[2, cut]]
                continue
            continued += 1
            assert cut == 12 and s.tokens[:cut] == waiting[id(s)] and s.segments == [[2, 12], [3, len(s.tokens) - 12]]
            new = ray.get(loop.trainers[0].probe_logprobs.remote(prompt + s.tokens, len(prompt) + cut))
            assert max(abs(a - b) for a, b in zip(new, s.logprobs[cut:], strict=True)) < 1e-3
            ids = torch.tensor([prompt + s.tokens])
            old = torch.log_softmax(base(ids).logits[0, :-1].double(), -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            assert max(abs(a - b) for a, b in zip(old[len(prompt) + cut - 1:].tolist(), s.logprobs[cut:],
                                                  strict=True)) > 1e-2
    assert continued >= 8  # an untrained model rarely ends within 12 tokens


@pytest.mark.integration
def test_the_replay_buffer_is_in_the_checkpoint_and_a_resume_continues_it(partial_loop):
    from rl.checkpoint import latest_checkpoint, save_checkpoint
    from rl.loop import roll_out
    from rl.setup import build_loop

    recipe, run, loop = partial_loop
    roll_out(loop, 4)  # leaves the new groups' first segments in the buffer
    assert loop.buffer.groups and all(s.tokens for g in loop.buffer.groups for s in g.samples)
    state = {"sampler": loop.sampler.state_dict(), "replay_buffer": loop.buffer.state_dict()}
    save_checkpoint(run.dir, loop.trainers, 4, state)
    _, saved = latest_checkpoint(run.dir)
    resumed = build_loop(recipe, run, loop.trainers, loop.engines, loop.rewards, saved)
    assert resumed.buffer.state_dict() == loop.buffer.state_dict() and resumed.buffer.groups
    assert [(r.prompt_ids, r.max_tokens) for r in resumed.buffer.requests(resumed.train_prompts)] == \
        [(r.prompt_ids, r.max_tokens) for r in loop.buffer.requests(loop.train_prompts)]


@pytest.mark.integration
def test_an_importance_update_weighs_the_samples_that_span_two_weights(partial_loop):
    import dataclasses

    from rl.loop import run_iteration

    _, _, loop = partial_loop
    settings = loop.settings
    loop.settings = dataclasses.replace(settings, pmd=dataclasses.replace(settings.pmd, partial_loss="importance"))
    try:
        while not loop.buffer.groups:  # groups in flight, so that the next iteration trains partial samples
            run_iteration(loop, 20)
        record = run_iteration(loop, 21)
    finally:
        loop.settings = settings
    assert record["train/groups_in_update"] > 0 and record["rollout/partial/partial_sample_share"] > 0
    # every token is trained; the weights are the clipped ratios of the earlier segments (behaviour: the
    # engines' log-probs then; pi_theta_i: the trainer's now), all in (0, clip]
    assert record["train/tokens_trained"] == record["train/response_tokens_in_update"]
    assert 0 < record["losses/importance_weight_mean"] <= settings.pmd.importance_clip
    assert record["sync/probe_gap_after_sync"] < 1e-3


@pytest.mark.integration
def test_requests_are_dealt_round_robin_and_come_back_in_order(ray_local):
    """`rl.generation.generate` deals request i to engine i mod E (a group's samples, alike in length, are
    spread over the engines), with each request's own budget and continued length, and returns the
    results in request order."""
    import ray

    from rl.generation import generate
    from rollout.engine import RolloutSettings

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self, name: int) -> None:
            self.name = name

        def generate(self, prompts, settings, images, budgets, continued):
            return [[(self.name, p, b, c, settings.seed)] for p, b, c in zip(prompts, budgets, continued, strict=True)]

    engines = [Recorder.remote(e) for e in range(3)]
    prompts = [[i, i + 1] for i in range(8)]
    out = generate(engines, prompts, RolloutSettings(seed=100), max_tokens=[10 + i for i in range(8)],
                   continued=[i % 2 for i in range(8)])
    assert [g[0] for g in out] == [(i % 3, [i, i + 1], 10 + i, i % 2, 100 + i % 3) for i in range(8)]
    # fewer requests than engines: the idle engines get no call
    assert [g[0][0] for g in generate(engines, prompts[:2], RolloutSettings(), max_tokens=[1, 1],
                                      continued=[0, 0])] == [0, 1]
