"""One PMD iteration, top to bottom:

    sample prompts -> roll out k responses each -> score -> advantages -> update -> sync -> probe -> log

Roll-outs go through the replay buffer (`rollout.partial.ReplayBuffer`): the new prompts join the groups
still in flight, every unfinished sample generates one segment, and the groups whose k samples have all
finished are scored and trained. Without partial rollouts a segment is the whole response budget and
every group finishes in the iteration that drew it.

Each stage is a short function of plain values: `LoopSettings` is read from the recipe once, at set-up
(`LoopSettings.from_recipe`), and nothing below reads the recipe. The heavy work runs in Ray actors:
vLLM engines (`rollout.engine.RolloutEngine`), DeepSpeed trainer ranks (`rl.trainer.PMDWorker`) and the
reward set's worker processes (`rewards.combine.RewardSet`).
"""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rl.generation import generate, reward_inputs
from rl.sync import Probe, sync_weights

if TYPE_CHECKING:
    from collections.abc import Callable

    from rewards.combine import RewardSet
    from rl.config import Recipe
    from rl.recovery import EngineRestarts
    from rl.trainer import PMDSettings, Sample
    from rollout.engine import Completion, RolloutSettings
    from rollout.partial import Group, ReplayBuffer
    from samplers import Sampler
    from thinkrl.vl.inputs import ImageStore


@dataclass(frozen=True)
class LoopSettings:
    """What the iterations need of the recipe, resolved once."""

    prompts_per_iteration: int
    rollout: RolloutSettings  # n = k samples per prompt; the seed is set per iteration
    seed: int
    tau: float
    baseline: str
    mini_batches: int
    num_trainers: int
    max_tokens_per_micro_batch: int
    drop_uniform_groups: bool
    samples_to_log: int
    pmd: PMDSettings
    segment_tokens: int  # partial rollouts: a trajectory's budget per iteration (the response budget when off)
    max_segments: int  # 1 when off

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> LoopSettings:
        from rl.trainer import PMDSettings
        from rollout.engine import RolloutSettings
        from rollout.repeat import repeat_settings_of

        rl, ro = recipe.rl, recipe.rollout
        partial = ro.partial.segment_tokens > 0
        return cls(
            prompts_per_iteration=rl.prompts_per_iteration,
            rollout=RolloutSettings(n=rl.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                                    max_tokens=ro.max_tokens, repeat=repeat_settings_of(ro.repeat)),
            seed=recipe.run.seed, tau=rl.tau, baseline=rl.baseline, mini_batches=rl.mini_batches,
            num_trainers=rl.num_trainers, max_tokens_per_micro_batch=rl.max_tokens_per_micro_batch,
            drop_uniform_groups=rl.drop_uniform_groups, samples_to_log=rl.samples_to_log,
            pmd=PMDSettings(tau=rl.tau, log_ratio_norm=rl.log_ratio_norm, reset_optimizer=rl.reset_optimizer,
                            old_logprobs=rl.old_logprobs, partial_loss=ro.partial.loss,
                            importance_clip=ro.partial.importance_clip),
            segment_tokens=ro.partial.segment_tokens if partial else ro.max_tokens,
            max_segments=ro.partial.max_segments if partial else 1,
        )

    def replay_buffer(self) -> ReplayBuffer:
        """An empty replay buffer cut by these settings."""
        from rollout.partial import ReplayBuffer

        return ReplayBuffer(self.segment_tokens, self.max_segments, self.rollout.max_tokens)


@dataclass
class Loop:
    """What every iteration uses: settings, actors, the reward set, the sampler and the fixed inputs."""

    settings: LoopSettings
    trainers: list  # Ray actor handles of rl.trainer.PMDWorker, rank order
    engines: list  # Ray actor handles of rollout.engine.RolloutEngine
    rewards: RewardSet
    sampler: Sampler
    train_rows: list[dict]
    train_prompts: list[list[int]]  # token ids of each train row's chat prompt
    probe: Probe
    samples_file: Path
    images: ImageStore  # the rows' image bytes, read when a prompt is sampled
    buffer: ReplayBuffer  # the groups in flight (all finish in their iteration without partial rollouts)
    decode: Callable[[list[list[int]]], list[str]]  # token ids -> texts (the tokenizer's batch decode)
    restarts: EngineRestarts | None = None  # replaces engines that die (rl.recovery); None: a dead engine ends the run

    def with_engines(self, step, what: str, before_retry=None):
        """`step()`, redone with a fresh engine in place of one that dies during it (if `restarts` is set)."""
        if self.restarts is None:
            return step()
        return self.restarts.run(self.engines, step, what, before_retry)


@dataclass
class Scored:
    """An iteration's finished groups: their prompts (row indices), completions, rewards and correctness,
    and how many leading tokens of each completion the update leaves out as context (partial rollouts: those
    generated under earlier weights, as `rollout.partial.loss` counts them)."""

    batch: list[int]
    groups: list[list[Completion]]
    rewards: list[list[float]]
    correct: list[list[float]]
    earlier_tokens: list[list[int]]


def run_iteration(loop: Loop, iteration: int) -> dict:
    """One PMD iteration; returns its metrics record."""
    times: dict[str, float] = {}
    # a roll-out redone after an engine died draws the same prompts and continues the same trajectories
    sampler_state = json.loads(json.dumps(loop.sampler.state_dict()))
    buffer_state = loop.buffer.state_dict()

    def restore() -> None:
        loop.sampler.load_state_dict(sampler_state)
        loop.buffer.load_state_dict(buffer_state)

    with _timed(times, "rollout"):
        finished, generated = loop.with_engines(lambda: roll_out(loop, iteration), "roll-out", restore)
    with _timed(times, "reward"):
        scored = score(loop, finished, iteration)
    with _timed(times, "update"):
        samples, group_ids, kept = make_samples(loop, scored)
        stats = update_policy(loop.trainers, samples, group_ids, loop.settings, iteration)
    times["time/weight_sync"] = loop.with_engines(lambda: sync_weights(loop.trainers, loop.engines),
                                                  "weight sync")
    with _timed(times, "probe"):
        gap = loop.with_engines(lambda: loop.probe.check(loop.trainers, loop.engines, iteration), "probe")
    log_samples(loop, iteration, scored)
    return {**iteration_record(loop, scored, kept, stats, gap, times), **loop.buffer.metrics(iteration, finished),
            "rollout/tokens_generated": generated}


def roll_out(loop: Loop, iteration: int) -> tuple[list[Group], int]:
    """The sampler's next prompts join the replay buffer; every unfinished sample in it generates one segment
    (each a request of its own: k per new prompt). Returns the groups that finished, and the tokens generated."""
    import dataclasses

    buffer = loop.buffer
    buffer.add(loop.sampler.next(loop.settings.prompts_per_iteration), loop.settings.rollout.n, iteration)
    requests = buffer.requests(loop.train_prompts)
    settings = dataclasses.replace(loop.settings.rollout, n=1, seed=loop.settings.seed * 10**7 + iteration * 10**4)
    outputs = generate(loop.engines, [r.prompt_ids for r in requests], settings,
                       _images(loop, [buffer.groups[r.group].row for r in requests]),
                       [r.max_tokens for r in requests], [r.continued for r in requests])
    completions = [out[0] for out in outputs]
    buffer.extend(requests, [(c.token_ids, c.logprobs, c.finish_reason, c.prompt_ids) for c in completions], iteration)
    return buffer.pop_finished(), sum(len(c.token_ids) for c in completions)


def _images(loop: Loop, batch: list[int]) -> list[list[bytes]]:
    return [loop.images.get(loop.train_rows[i].get("images") or []) for i in batch]


def score(loop: Loop, finished: list[Group], iteration: int) -> Scored:
    """Rewards of every completion of the finished groups; the sampler observes correctness (success
    rates), not the total."""
    from rollout.engine import Completion

    batch = [g.row for g in finished]
    texts = iter(loop.decode([s.tokens for g in finished for s in g.samples]))
    groups = [[Completion(s.tokens, s.logprobs, next(texts), s.finish_reason, s.prompt_ids) for s in g.samples]
              for g in finished]
    loss = loop.settings.pmd.partial_loss
    earlier = [[s.context_tokens(iteration, loss) for s in g.samples] for g in finished]
    if not finished:
        return Scored([], [], [], [], [])
    scored = loop.rewards.score_groups(reward_inputs([loop.train_rows[i] for i in batch], groups), iteration)
    correct = [[float(s.correct) for s in g] for g in scored]
    loop.sampler.observe(batch, correct)
    return Scored(batch, groups, [[s.total for s in g] for g in scored], correct, earlier)


def make_samples(loop: Loop, scored: Scored) -> tuple[list[Sample], list[int], list[int]]:
    """The trainer's samples with their advantages (r_j minus the group baseline, computed here where whole
    groups are at hand), their group ids, and the groups kept (`drop_uniform_groups` leaves some out)."""
    import torch

    from rl.loss import advantages
    from rl.trainer import Sample

    kept = [j for j, r in enumerate(scored.rewards) if not (loop.settings.drop_uniform_groups and len(set(r)) == 1)]
    group_ids = [n for n, j in enumerate(kept) for _ in scored.groups[j]]
    if not kept:
        return [], [], kept
    rewards = torch.tensor([r for j in kept for r in scored.rewards[j]], dtype=torch.float64)
    adv = advantages(rewards, torch.tensor(group_ids), loop.settings.tau, loop.settings.baseline).tolist()
    images = _images(loop, [scored.batch[j] for j in kept])
    # an image prompt as the engine ran it (placeholders expanded): what the trainer computes on
    completions = [(c.prompt_ids or loop.train_prompts[scored.batch[j]], c, images[n] or None, e)
                   for n, j in enumerate(kept) for c, e in zip(scored.groups[j], scored.earlier_tokens[j], strict=True)]
    samples = [Sample(prompt, c.token_ids, a, c.logprobs, own, earlier)
               for (prompt, c, own, earlier), a in zip(completions, adv, strict=True)]
    return samples, group_ids, kept


def update_policy(trainers: list, samples: list[Sample], group_ids: list[int], settings: LoopSettings,
                  iteration: int) -> list[dict]:
    """The PMD update on every rank, as `rl.batching.plan_update` splits it; [] when no sample is left."""
    import ray

    from rl.batching import plan_update

    if not samples:
        return []
    shards, plans = plan_update([len(s.prompt_ids) + len(s.response_ids) for s in samples], group_ids,
                                mini_batches=settings.mini_batches, num_ranks=settings.num_trainers,
                                max_tokens_per_micro_batch=settings.max_tokens_per_micro_batch,
                                seed=settings.seed * 10**6 + iteration)
    return ray.get([trainer.update.remote([samples[i] for i in shard], plan, settings.pmd)
                    for trainer, shard, plan in zip(trainers, shards, plans, strict=True)])


def log_samples(loop: Loop, iteration: int, scored: Scored) -> None:
    """A few rollouts of the iteration into samples.jsonl (the first response of random prompts)."""
    rng = random.Random(iteration)
    with open(loop.samples_file, "a") as f:
        for j in rng.sample(range(len(scored.batch)), min(loop.settings.samples_to_log, len(scored.batch))):
            row = loop.train_rows[scored.batch[j]]
            f.write(json.dumps({"iteration": iteration, "prompt": row["prompt"], "answer": row["answer"],
                                "response": scored.groups[j][0].text, "reward": scored.rewards[j][0]}) + "\n")


def iteration_record(loop: Loop, scored: Scored, kept: list[int], stats_per_rank: list[dict], gap: float,
                     times: dict[str, float]) -> dict:
    """The iteration's metrics: train/, reward/, losses/, optim/, sync/, sampler and time/ keys (train/ and
    reward/ over the groups that finished: NaN when none did, as can happen with partial rollouts)."""
    flat = [r for g in scored.rewards for r in g] or [float("nan")]
    lengths = [len(c.token_ids) for g in scored.groups for c in g] or [float("nan")]
    trained = [(len(c.token_ids), e) for j in kept for c, e in zip(scored.groups[j], scored.earlier_tokens[j],
                                                                    strict=True)]
    masked = loop.settings.pmd.masks_earlier_tokens
    ranks = stats_per_rank or [{}]
    stats = {k: sum(s[k] for s in stats_per_rank) / len(stats_per_rank) for k in ranks[0]}
    extra = ("lr", "grad_norm", "logprob_gap_vllm_trainer", "logprob_gap_text", "logprob_gap_image", "time_logprobs",
             "time_in_trainer", "micro_batches", "steps", "importance_weight_mean")
    return {
        "train/reward_mean": sum(flat) / len(flat),
        "train/accuracy": sum(c for g in scored.correct for c in g) / len(flat) if scored.groups else float("nan"),
        "train/response_tokens_mean": sum(lengths) / len(lengths),
        "train/response_tokens_max": max(lengths),
        "train/truncated_share": sum(c.finish_reason == "length" for g in scored.groups for c in g) / len(lengths),
        # stopped by rollout.repeat at decode time (of the finished samples)
        "rollout/repeat_share": sum(c.finish_reason == "repeat" for g in scored.groups for c in g) / len(lengths),
        # response tokens of the samples in the update, and those of them the loss takes a gradient of
        "train/response_tokens_in_update": sum(n for n, _ in trained),
        "train/tokens_trained": sum(n - e if masked else n for n, e in trained),
        **loop.rewards.metrics(),
        **{f"losses/{k}": v for k, v in stats.items() if k not in extra},
        "optim/lr": stats.get("lr", float("nan")),
        "optim/grad_norm": stats.get("grad_norm", float("nan")),
        "optim/steps": stats.get("steps", 0),
        "optim/micro_batches_per_step": stats.get("micro_batches", float("nan")),
        "sync/logprob_gap_rollout_vs_trainer": stats.get("logprob_gap_vllm_trainer", float("nan")),
        # the same gap by modality: a vision-language mismatch shows on image prompts only
        "sync/logprob_gap_rollout_vs_trainer_text": stats.get("logprob_gap_text", float("nan")),
        "sync/logprob_gap_rollout_vs_trainer_image": stats.get("logprob_gap_image", float("nan")),
        "train/uniform_reward_groups": sum(len(set(r)) == 1 for r in scored.rewards),
        "train/groups_in_update": len(kept),
        "sync/probe_gap_after_sync": gap,
        "losses/importance_weight_mean": stats.get("importance_weight_mean", float("nan")),
        "faults/engine_restarts": loop.restarts.used if loop.restarts else 0,
        **loop.sampler.metrics(),
        **times,
        "time/iteration": sum(times.values()),
        # the part of time/update spent recomputing log pi_theta_i (not added to time/iteration again)
        "time/update_logprobs": stats.get("time_logprobs", float("nan")),
        # the part of time/update the trainer ranks spend in their update call (mean over ranks)
        "time/update_in_trainer": stats.get("time_in_trainer", float("nan")),
    }


@contextmanager
def _timed(times: dict[str, float], stage: str):
    start = time.time()
    yield
    times[f"time/{stage}"] = time.time() - start
