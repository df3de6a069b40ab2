"""A weighted set of rewards, scored in a pool of worker processes: what the RL loop and the CLI use.

`RewardSet(specs, ...)` resolves every reward up front (one clear error before any worker starts), owns a
`RewardPool` (or borrows a running one), and scores groups of samples (all k responses of one prompt) in
three steps:
1. per-sample rewards, one pool call per (sample, reward), each with the hard timeout;
2. correctness per sample, from the set's correctness reward (below), and the gates;
3. group rewards (length penalty, judges), one pool call per (group, reward), seeing `correct`.
total = sum of weight * score over the rewards active at this iteration, or 0 if a gate failed.

The correctness reward is `correctness` if given, else the first per-sample reward named `math` or
`code`, else the first per-sample reward. A sample is correct when that reward's result says so
(`RewardResult.correct`), or, if the reward does not say, when its score is > 0; a failure is incorrect.

Failures: a reward that raises, returns a wrong type, NaN or an out-of-range value, or runs past the
timeout scores 0 on that sample (its term only), with the reason recorded and counted in `metrics()`.
A reward that fails on `max_consecutive_failures` samples in a row raises `RewardPluginError` at once,
naming the reward and its last reason: a plugin broken on every input stops the run, boundedly.

Trade-off: one pool call per (sample, reward) keeps each timeout and each failure attributable to one
reward, at one pipe round trip per call (~0.1 ms, small next to a math-verify call).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from rewards.config import ResolvedReward, resolve_specs
from rewards.pool import Outcome, RewardPool
from rewards.registry import build_reward
from rewards.types import RewardInput, RewardPluginError, RewardResult, ScoredSample, normalize_result

_CORRECTNESS_NAMES = ("math", "code")


def _apply(fn, arg):
    return fn(arg)


def check_correctness_reward(name: str) -> None:
    """Raise ValueError saying why, unless `name` (built-in, entry-point name or `module:attr`) loads as a
    per-sample reward, i.e. one that can be a set's correctness reward and judge each response alone.

    For the tools that verify answers with one named reward (`sft.build_cot --reward`, `rl.label
    --reward`): they call it before anything slow starts, then score with `RewardSet([name])` and read
    `ScoredSample.correct`. Starts no process.

    Example:
        >>> check_correctness_reward("math")
        >>> check_correctness_reward("length")
        Traceback (most recent call last):
        ...
        ValueError: reward 'length' is a group reward; answers are verified by a per-sample reward (math, code, ...)
    """
    try:
        loaded = build_reward(name)
    except (LookupError, TypeError, ValueError) as e:
        raise ValueError(f"reward '{name}': {e}") from None
    if loaded.kind != "sample":
        raise ValueError(f"reward '{name}' is a group reward; answers are verified by a per-sample reward "
                         "(math, code, ...)")


def correctness_reward(rewards: Sequence[ResolvedReward]) -> str | None:
    """The name of the reward that decides correctness by default (the module docstring's rule): the first
    per-sample reward named `math` or `code`, else the first per-sample reward; None if there is none."""
    per_sample = [r.name for r in rewards if r.reward.kind == "sample"]
    return next((n for n in per_sample if n in _CORRECTNESS_NAMES), per_sample[0] if per_sample else None)


def preload_of(rewards: Sequence[ResolvedReward]) -> tuple[str, ...]:
    """The modules a pool's worker imports at start-up for these rewards (their `preload`), once each."""
    return tuple(dict.fromkeys(m for r in rewards for m in r.reward.preload))


class RewardSet:
    """Score groups of samples with several weighted rewards (see the module docstring).

    specs: a list of `RewardSpec`, dicts or names (see `rewards.config`); resolved at construction.
    num_workers, timeout_s: the worker processes and the hard limit per reward call.
    max_consecutive_failures: the bound after which a failing reward stops the run.
    correctness: the name of the reward that decides `correct` (default: see the module docstring).
    pool: a running `RewardPool` to score in, left open by `close` (several sets, or several runs of a
        tool, can share warm workers); `num_workers` and `timeout_s` are then the pool's. Default: the
        set starts its own.

    Example:
        >>> with RewardSet(["math", {"name": "length", "weight": 0.5}], num_workers=1, timeout_s=30) as rs:
        ...     [[s.total for s in g] for g in rs.score_groups([[
        ...         RewardInput("1+1?", "<think>1+1=2</think>\\\\boxed{2}", "2", num_tokens=8),
        ...         RewardInput("1+1?", "<think>so 1+1 is 3</think>\\\\boxed{3}", "2", num_tokens=12)]], 1)]
        [[1.25, -0.25]]
    """

    def __init__(self, specs: Sequence[Any], num_workers: int = 2, timeout_s: float = 10.0,
                 max_consecutive_failures: int = 32, correctness: str | None = None,
                 pool: RewardPool | None = None, close_pool: bool = False) -> None:
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.rewards: list[ResolvedReward] = resolve_specs(specs)
        names = [r.name for r in self.rewards]
        per_sample = [r.name for r in self.rewards if r.reward.kind == "sample"]
        if correctness is not None and correctness not in per_sample:
            raise ValueError(f"correctness reward '{correctness}' is not a per-sample reward of the set "
                             f"({', '.join(per_sample) or 'none'})")
        self.correctness = correctness or correctness_reward(self.rewards)
        self.max_consecutive_failures = max_consecutive_failures
        self._in_a_row = dict.fromkeys(names, 0)
        self._last_failure = dict.fromkeys(names, "")
        self._metrics: dict[str, float] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._owns_pool = pool is None or close_pool  # a given pool (any with run/close) is the caller's unless said
        self._pool = RewardPool(num_workers, timeout_s, preload=preload_of(self.rewards)) if pool is None else pool

    def submit(self, groups: list[list[RewardInput]], iteration: int) -> Future:
        """`score_groups` in a background thread, so scoring overlaps whatever the caller does next.

        Submitted calls run one after another; do not call `score_groups` directly while one is pending.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="reward-set")
        return self._executor.submit(self.score_groups, groups, iteration)

    def score_groups(self, groups: list[list[RewardInput]], iteration: int) -> list[list[ScoredSample]]:
        """Score each group (the responses of one prompt); results have the groups' shape.

        `iteration` (1-based) decides which rewards are past their warmup. Raises `RewardPluginError`
        when a reward has failed on `max_consecutive_failures` samples in a row.
        """
        start = time.monotonic()
        flat = [s for g in groups for s in g]
        active = [r for r in self.rewards if r.spec.active(iteration)]
        results: dict[str, list[RewardResult | None]] = {r.name: [None] * len(flat) for r in self.rewards}
        failures: dict[str, list[Outcome | None]] = {r.name: [None] * len(flat) for r in self.rewards}

        sample_rewards = [r for r in active if r.reward.kind == "sample"]
        correct, gated = self._sample_verdicts(flat, sample_rewards, results, failures)

        group_calls, offset = [], 0
        for group in groups:
            indices = list(range(offset, offset + len(group)))
            offset += len(group)
            with_verdicts = [replace(flat[i], correct=correct[i]) for i in indices]
            group_calls += [(r, indices, (r.reward.fn, with_verdicts))
                            for r in active if r.reward.kind == "group" and group]
        self._run_calls(group_calls, results, failures)

        scored = [self._combine(i, results, failures, correct[i], gated[i], iteration) for i in range(len(flat))]
        self._metrics = self._summarise(scored, results, failures, gated, time.monotonic() - start)
        out, offset = [], 0
        for group in groups:
            out.append(scored[offset : offset + len(group)])
            offset += len(group)
        return out

    def verdicts(self, groups: list[list[RewardInput]], iteration: int) -> list[list[bool]]:
        """Only each sample's correctness verdict (held-out evaluation), in the groups' shape.

        Runs the correctness reward and the gates, nothing else (no other per-sample or group reward),
        and leaves `metrics()` as the last `score_groups` set it.
        """
        flat = [s for g in groups for s in g]
        needed = [r for r in self.rewards if r.spec.active(iteration) and r.reward.kind == "sample"
                  and (r.name == self.correctness or r.reward.gate)]
        results: dict[str, list[RewardResult | None]] = {r.name: [None] * len(flat) for r in self.rewards}
        failures: dict[str, list[Outcome | None]] = {r.name: [None] * len(flat) for r in self.rewards}
        correct, _ = self._sample_verdicts(flat, needed, results, failures)
        out, offset = [], 0
        for group in groups:
            out.append(correct[offset : offset + len(group)])
            offset += len(group)
        return out

    def _sample_verdicts(self, flat, sample_rewards, results, failures) -> tuple[list[bool], list[bool]]:
        """Run `sample_rewards` on every sample; (correct, gated) per sample (a gated sample is not correct)."""
        calls = [(r, i) for i in range(len(flat)) for r in sample_rewards]
        self._run_calls([(r, [i], (r.reward.fn, flat[i])) for r, i in calls], results, failures)
        correct = [self._is_correct(results, failures, i) for i in range(len(flat))]
        gated = [any(r.reward.gate and (failures[r.name][i] or results[r.name][i].score <= 0)
                     for r in sample_rewards) for i in range(len(flat))]
        return [c and not g for c, g in zip(correct, gated, strict=True)], gated

    def _run_calls(self, calls, results, failures) -> None:
        def on_outcome(index: int, outcome: Outcome) -> None:
            reward, indices, _ = calls[index]
            values = self._validate(reward, outcome, len(indices) if reward.reward.kind == "group" else None)
            for i, value in zip(indices, values, strict=True):
                if isinstance(value, RewardResult):
                    results[reward.name][i] = value
                    self._in_a_row[reward.name] = 0
                else:
                    failures[reward.name][i] = value
                    self._in_a_row[reward.name] += 1
                    self._last_failure[reward.name] = value.error
                    if self._in_a_row[reward.name] >= self.max_consecutive_failures:
                        raise RewardPluginError(
                            f"reward '{reward.name}' ({reward.spec.name}) failed on {self._in_a_row[reward.name]}"
                            f" samples in a row; last: {value.error} (the bound is max_consecutive_failures="
                            f"{self.max_consecutive_failures})")

        if calls:
            self._pool.run(_apply, [c[2] for c in calls], on_outcome)

    @staticmethod
    def _validate(reward: ResolvedReward, outcome: Outcome, group_size: int | None) -> list:
        """One RewardResult or failed Outcome per sample the call covered."""
        count = group_size or 1
        if not outcome.ok:
            return [outcome] * count
        values = [outcome.value]
        if group_size is not None:
            if not isinstance(outcome.value, (list, tuple)) or len(outcome.value) != group_size:
                got = len(outcome.value) if isinstance(outcome.value, (list, tuple)) else type(outcome.value).__name__
                return [Outcome(error=f"invalid: group reward returned {got}, expected a list of "
                                      f"{group_size}")] * count
            values = list(outcome.value)
        checked = []
        for value in values:
            try:
                checked.append(normalize_result(value, reward.reward.score_range))
            except (TypeError, ValueError) as e:
                checked.append(Outcome(error=f"invalid: {e}"))
        return checked

    def _is_correct(self, results, failures, i: int) -> bool:
        if self.correctness is None or results[self.correctness][i] is None:
            return False
        result = results[self.correctness][i]
        return result.correct if result.correct is not None else result.score > 0

    def _combine(self, i, results, failures, correct: bool, gated: bool, iteration: int) -> ScoredSample:
        total, scores, reasons = 0.0, {}, {}
        for r in self.rewards:
            result, failure = results[r.name][i], failures[r.name][i]
            if failure is not None:
                scores[r.name], reasons[r.name] = 0.0, failure.error
            elif result is None:
                scores[r.name], reasons[r.name] = 0.0, "warmup"
            else:
                scores[r.name], reasons[r.name] = result.score, result.reason
                scores.update({f"{r.name}/{k}": v for k, v in result.scores.items()})
                if not r.reward.gate:
                    total += r.spec.weight * result.score
        reason = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        failed = tuple(r.name for r in self.rewards if failures[r.name][i] is not None)
        return ScoredSample(0.0 if gated else total, scores, reason, correct, reasons, failed)

    def _summarise(self, scored, results, failures, gated, seconds: float) -> dict[str, float]:
        n = max(1, len(scored))
        metrics = {"reward/total": sum(s.total for s in scored) / n,
                   "reward/correct_share": sum(s.correct for s in scored) / n}
        all_failures = [f for r in self.rewards for f in failures[r.name] if f is not None]
        for r in self.rewards:
            metrics[f"reward/{r.name}"] = sum(s.scores[r.name] for s in scored) / n
            subs = sorted({k for s in scored for k in s.scores if k.startswith(r.name + "/")})
            for key in subs:
                values = [s.scores[key] for s in scored if key in s.scores]
                metrics[f"reward/{key}"] = sum(values) / len(values)
            metrics[f"reward/{r.name}/failures"] = sum(f is not None for f in failures[r.name])
        metrics["reward/failures"] = len(all_failures)
        metrics["reward/timeouts"] = sum(f.timed_out for f in all_failures)
        metrics["reward/invalid"] = sum(f.error.startswith("invalid") for f in all_failures)
        metrics["reward/errors"] = metrics["reward/failures"] - metrics["reward/timeouts"] - metrics["reward/invalid"]
        if self.correctness is not None:
            verdicts = results[self.correctness]
            metrics["reward/no_answer_share"] = sum(v is not None and v.reason == "no answer" for v in verdicts) / n
        if any(r.reward.gate for r in self.rewards):
            metrics["reward/gated_share"] = sum(gated) / n
        metrics["reward/seconds"] = seconds
        return metrics

    def metrics(self) -> dict[str, float]:
        """Metrics of the last `score_groups` call: `reward/<name>` (mean unweighted score), sub-scores
        `reward/<name>/<sub>`, `reward/total`, `reward/correct_share`, `reward/no_answer_share`,
        `reward/failures` (= timeouts + invalid + errors), per-reward `reward/<name>/failures`, ..."""
        return dict(self._metrics)

    def close(self) -> None:
        """Stop the worker processes (unless the pool was given) and the background thread of `submit`."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._owns_pool:
            self._pool.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
