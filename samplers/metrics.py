"""What every sampler logs about the batch it last observed, under `sampler/...`.

A reward counts as a success when it is > 0 (binary correctness gives 1/0; a NaN reward is a failure).
A group is *uniform* when its k rewards are all equal: under a mean baseline every advantage is zero, so
it carries no gradient signal (`rl.drop_uniform_groups` removes such groups from the loss; they are counted
here either way). All-correct and all-wrong groups are the two uniform cases of binary rewards.
"""

from __future__ import annotations

from collections import Counter

# upper edges of the per-prompt success-rate histogram; the last bin includes 1.0
HISTOGRAM_EDGES = (0.2, 0.4, 0.6, 0.8, 1.0)


def is_success(reward: float) -> bool:
    return reward > 0  # False for NaN too


def success_rate(rewards: list[float]) -> float:
    return sum(is_success(r) for r in rewards) / len(rewards) if rewards else 0.0


def check_observation(indices: list[int], rewards: list[list[float]], num_prompts: int) -> None:
    """Raise ValueError unless `rewards` has one list per index and every index is in range."""
    if len(indices) != len(rewards):
        raise ValueError(f"observe: {len(indices)} indices but {len(rewards)} reward groups")
    for i in indices:
        if not 0 <= i < num_prompts:
            raise ValueError(f"observe: prompt index {i} outside the dataset of {num_prompts} prompts")


def batch_metrics(indices: list[int], rewards: list[list[float]], levels: list[int] | None) -> dict[str, float]:
    """Counts and shares of the observed batch: uniform / all-correct / all-wrong groups, the histogram
    of per-prompt success rates (shares of the batch), and the share of each difficulty level."""
    groups = [g for g in rewards if g]
    out = {
        "sampler/batch_prompts": float(len(indices)),
        "sampler/uniform_groups": float(sum(len(set(g)) == 1 for g in groups)),
        "sampler/all_correct_groups": float(sum(all(is_success(r) for r in g) for g in groups)),
        "sampler/all_wrong_groups": float(sum(not any(is_success(r) for r in g) for g in groups)),
    }
    out["sampler/uniform_group_share"] = out["sampler/uniform_groups"] / len(groups) if groups else 0.0
    hist = [0] * len(HISTOGRAM_EDGES)
    for g in groups:
        s = success_rate(g)
        hist[next(b for b, edge in enumerate(HISTOGRAM_EDGES) if s < edge or edge == HISTOGRAM_EDGES[-1])] += 1
    lower = 0.0
    for edge, count in zip(HISTOGRAM_EDGES, hist, strict=True):
        out[f"sampler/success_hist/{lower:.1f}-{edge:.1f}"] = count / len(groups) if groups else 0.0
        lower = edge
    if levels is not None and indices:
        for level, count in sorted(Counter(levels[i] for i in indices).items()):
            out[f"sampler/batch_share/level_{level}"] = count / len(indices)
    return out
