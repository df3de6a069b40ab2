"""One PMD iteration, top to bottom:

    sample prompts -> roll out k responses each -> score -> advantages -> update -> sync -> probe -> log

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
    from rewards.combine import RewardSet
    from rl.config import Recipe
    from rl.recovery import EngineRestarts
    from rl.trainer import PMDSettings, Sample
    from rollout.engine import Completion, RolloutSettings
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

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> LoopSettings:
        from rl.trainer import PMDSettings
        from rollout.engine import RolloutSettings

        rl, ro = recipe.rl, recipe.rollout
        return cls(
            prompts_per_iteration=rl.prompts_per_iteration,
            rollout=RolloutSettings(n=rl.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                                    max_tokens=ro.max_tokens),
            seed=recipe.run.seed, tau=rl.tau, baseline=rl.baseline, mini_batches=rl.mini_batches,
            num_trainers=rl.num_trainers, max_tokens_per_micro_batch=rl.max_tokens_per_micro_batch,
            drop_uniform_groups=rl.drop_uniform_groups, samples_to_log=rl.samples_to_log,
            pmd=PMDSettings(tau=rl.tau, log_ratio_norm=rl.log_ratio_norm, reset_optimizer=rl.reset_optimizer,
                            old_logprobs=rl.old_logprobs),
        )


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
    restarts: EngineRestarts | None = None  # replaces engines that die (rl.recovery); None: a dead engine ends the run

    def with_engines(self, step, what: str, before_retry=None):
        """`step()`, redone with a fresh engine in place of one that dies during it (if `restarts` is set)."""
        if self.restarts is None:
            return step()
        return self.restarts.run(self.engines, step, what, before_retry)


@dataclass
class Scored:
    """An iteration's prompts (row indices), their completions, rewards and correctness, by group."""

    batch: list[int]
    groups: list[list[Completion]]
    rewards: list[list[float]]
    correct: list[list[float]]


def run_iteration(loop: Loop, iteration: int) -> dict:
    """One PMD iteration; returns its metrics record."""
    times: dict[str, float] = {}
    sampler_state = json.loads(json.dumps(loop.sampler.state_dict()))  # a roll-out redone after an engine died draws the same prompts
    with _timed(times, "rollout"):
        batch, groups = loop.with_engines(lambda: roll_out(loop, iteration), "roll-out",
                                          lambda: loop.sampler.load_state_dict(sampler_state))
    with _timed(times, "reward"):
        scored = score(loop, batch, groups, iteration)
    with _timed(times, "update"):
        samples, group_ids, kept = make_samples(loop, scored)
        stats = update_policy(loop.trainers, samples, group_ids, loop.settings, iteration)
    times["time/weight_sync"] = loop.with_engines(lambda: sync_weights(loop.trainers, loop.engines),
                                                  "weight sync")
    with _timed(times, "probe"):
        gap = loop.with_engines(lambda: loop.probe.check(loop.trainers, loop.engines, iteration), "probe")
    log_samples(loop, iteration, scored)
    return iteration_record(loop, scored, kept, stats, gap, times)


def roll_out(loop: Loop, iteration: int) -> tuple[list[int], list[list[Completion]]]:
    """The sampler's next prompts, and k completions of each from the engines."""
    import dataclasses

    batch = loop.sampler.next(loop.settings.prompts_per_iteration)
    settings = dataclasses.replace(loop.settings.rollout, seed=loop.settings.seed * 10**7 + iteration * 10**4)
    return batch, generate(loop.engines, [loop.train_prompts[i] for i in batch], settings, _images(loop, batch))


def _images(loop: Loop, batch: list[int]) -> list[list[bytes]]:
    return [loop.images.get(loop.train_rows[i].get("images") or []) for i in batch]


def score(loop: Loop, batch: list[int], groups: list[list[Completion]], iteration: int) -> Scored:
    """Rewards of every completion; the sampler observes correctness (success rates), not the total."""
    scored = loop.rewards.score_groups(reward_inputs([loop.train_rows[i] for i in batch], groups), iteration)
    correct = [[float(s.correct) for s in g] for g in scored]
    loop.sampler.observe(batch, correct)
    return Scored(batch, groups, [[s.total for s in g] for g in scored], correct)


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
    completions = [(c.prompt_ids or loop.train_prompts[scored.batch[j]], c, images[n] or None)
                   for n, j in enumerate(kept) for c in scored.groups[j]]
    samples = [Sample(prompt, c.token_ids, a, c.logprobs, own)
               for (prompt, c, own), a in zip(completions, adv, strict=True)]
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
    """The iteration's metrics: train/, reward/, losses/, optim/, sync/, sampler and time/ keys."""
    flat = [r for g in scored.rewards for r in g]
    lengths = [len(c.token_ids) for g in scored.groups for c in g]
    ranks = stats_per_rank or [{}]
    stats = {k: sum(s[k] for s in stats_per_rank) / len(stats_per_rank) for k in ranks[0]}
    extra = ("lr", "grad_norm", "logprob_gap_vllm_trainer", "logprob_gap_text", "logprob_gap_image", "time_logprobs",
             "time_in_trainer", "micro_batches", "steps")
    return {
        "train/reward_mean": sum(flat) / len(flat),
        "train/accuracy": sum(c for g in scored.correct for c in g) / len(flat),
        "train/response_tokens_mean": sum(lengths) / len(lengths),
        "train/response_tokens_max": max(lengths),
        "train/truncated_share": sum(c.finish_reason == "length" for g in scored.groups for c in g) / len(lengths),
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
