"""Rolling out and scoring: prompts spread over the vLLM engines, responses turned into reward inputs,
and held-out evaluation (the reward set's correctness verdict, averaged over samples)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewards.combine import RewardSet
    from rewards.types import RewardInput
    from rollout.engine import Completion, RolloutSettings


def generate(engines: list, prompts_ids: list[list[int]], settings: RolloutSettings,
             images: list[list[bytes]] | None = None, max_tokens: list[int] | None = None,
             continued: list[int] | None = None) -> list[list[Completion]]:
    """Spread prompts (and their images, per-prompt budgets and continued lengths, if any: see
    `RolloutEngine.generate`) over the engines (contiguous shards), gather results in prompt order."""
    import ray

    shard = -(-len(prompts_ids) // len(engines))
    futures = []
    for e, engine in enumerate(engines):
        part = prompts_ids[e * shard : (e + 1) * shard]
        if part:
            seed = None if settings.seed is None else settings.seed + e * shard
            own = images[e * shard : (e + 1) * shard] if images and any(images) else None
            budgets = None if max_tokens is None else max_tokens[e * shard : (e + 1) * shard]
            prefix = None if continued is None else continued[e * shard : (e + 1) * shard]
            futures.append(engine.generate.remote(part, dataclasses.replace(settings, seed=seed), own, budgets, prefix))
    return [group for part in ray.get(futures) for group in part]


def reward_inputs(rows: list[dict], groups: list[list[Completion]]) -> list[list[RewardInput]]:
    """What the rewards see of each completion: its row's prompt, answer and other fields, the text, the length
    and how it ended."""
    from rewards.types import RewardInput

    out = []
    for row, group in zip(rows, groups, strict=True):
        metadata = {k: v for k, v in row.items() if k not in ("prompt", "answer")}  # images: their paths
        out.append([RewardInput(row["prompt"], c.text, row["answer"], len(c.token_ids), metadata,
                                finish_reason=c.finish_reason) for c in group])
    return out


def evaluate(engines: list, reward_set: RewardSet, prompts_ids: list[list[int]], rows: list[dict],
             settings: RolloutSettings, iteration: int, images: list[list[bytes]] | None = None) -> dict:
    """Held-out accuracy (mean correctness over `settings.n` samples per prompt) and mean response length;
    rows of several tasks (a `task` field, as reasoning-gym rows have) get `accuracy_by_task` too."""
    groups = generate(engines, prompts_ids, settings, images)
    per_prompt = reward_set.verdicts(reward_inputs(rows, groups), iteration=iteration)
    verdicts = [v for g in per_prompt for v in g]
    lengths = [len(c.token_ids) for g in groups for c in g]
    result = {
        "accuracy": sum(verdicts) / len(verdicts),
        "mean_response_tokens": sum(lengths) / len(lengths),
        "n_prompts": len(prompts_ids),
        "samples_per_prompt": settings.n,
    }
    tasks = [row.get("task") for row in rows]
    if any(isinstance(t, str) for t in tasks):
        by_task: dict[str, list[bool]] = {}
        for task, group in zip(tasks, per_prompt, strict=True):
            by_task.setdefault(str(task), []).extend(group)
        result["accuracy_by_task"] = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
        result["n_prompts_by_task"] = {t: len(v) // settings.n for t, v in sorted(by_task.items())}
    return result
