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
    `RolloutEngine.generate`) over the engines, gather results in prompt order.

    Prompts are dealt round-robin (prompt i to engine i mod E), not in contiguous shards: neighbouring
    requests are alike (a group's k samples, the continued samples of a replay buffer), and so are their
    lengths, so contiguous shards would give one engine the long ones while the others sit idle."""
    import ray

    futures, parts = [], []
    for e, engine in enumerate(engines):
        part = list(range(e, len(prompts_ids), len(engines)))
        if not part:
            continue
        seed = None if settings.seed is None else settings.seed + e
        own = [images[i] for i in part] if images and any(images) else None
        budgets = None if max_tokens is None else [max_tokens[i] for i in part]
        prefix = None if continued is None else [continued[i] for i in part]
        futures.append(engine.generate.remote([prompts_ids[i] for i in part], dataclasses.replace(settings, seed=seed),
                                              own, budgets, prefix))
        parts.append(part)
    out: list = [None] * len(prompts_ids)
    for part, groups in zip(parts, ray.get(futures), strict=True):
        for i, group in zip(part, groups, strict=True):
            out[i] = group
    return out


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
