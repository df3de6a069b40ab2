"""The reward contract: what a reward receives, what it may return, and how that is normalised.

A reward is any callable of one of two shapes (see `docs/rewards.md` for the guide):

- per sample: `reward(sample: RewardInput) -> float | RewardResult | dict`
- per group:  `reward(samples: list[RewardInput]) -> list[float | RewardResult | dict]`, one result per
  sample, in order (all k responses of one prompt at once: the length penalty, judge-style rewards).

A reward declares its shape and the range its scores live in through attributes (`reward_kind`,
`score_range`), set by hand on a class or by the `@reward(...)` decorator on a function. Everything here is
plain data so that rewards and their inputs can travel to worker processes by pickling.

Trade-off: three accepted return types make plugins short to write, at the cost of one normalisation step
(`normalize_result`) that is also where wrong types, NaN and out-of-range values are caught.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

RewardKind = Literal["sample", "group"]
DEFAULT_SCORE_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class RewardResult:
    """A reward's verdict on one response.

    score:   the reward's value (must be finite and inside the reward's `score_range`).
    reason:  a short word or phrase: "correct", "wrong", "no answer", "timeout after 10s", ...
    scores:  optional named sub-scores, logged as `reward/<reward name>/<sub-score name>`; finite floats.
    correct: the sample's correctness verdict, for rewards that judge it (math, code); None otherwise.
             The first reward of a set that sets it decides `ScoredSample.correct`.
    """

    score: float
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    correct: bool | None = None


@dataclass(frozen=True)
class RewardInput:
    """One response to score, as every reward receives it.

    prompt, response: the text shown to the model and the text it produced (thinking included).
    answer:     the ground truth as a string (for `code`: the test cases, see `rewards.code`).
    num_tokens: the response's length in tokens (what the length penalty measures).
    metadata:   anything else from the data row (difficulty, source, ...); must be picklable.
    correct:    filled in by `RewardSet` before group rewards run: the correctness verdict of the
                set's correctness reward (None for per-sample rewards, which run first).
    finish_reason: how the generation ended: "stop" (the model ended it), "length" (out of budget),
                "repeat" (stopped at decode time because its tail looped, `rollout.repeat`); "" when unknown
                (a scored file, a hand-made input).
    """

    prompt: str
    response: str
    answer: str
    num_tokens: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    correct: bool | None = None
    finish_reason: str = ""


@dataclass(frozen=True)
class ScoredSample:
    """The combined verdict of a reward set on one sample.

    total:   sum over rewards of weight * score (0 for terms still in warmup; 0 overall if a gate failed).
    scores:  unweighted score of each reward by name, plus sub-scores as "<name>/<sub>".
    reason:  the reasons of all rewards, "name: reason; name: reason".
    correct: the verdict of the correctness reward (see `RewardResult.correct`).
    reasons: the reason of each reward by name.
    failed:  the names of the rewards that failed on this sample (raised, ran past the timeout or
             returned an invalid value; each such term scored 0, its reason says why).
    """

    total: float
    scores: dict[str, float]
    reason: str
    correct: bool
    reasons: dict[str, str] = field(default_factory=dict)
    failed: tuple[str, ...] = ()


class SampleReward(Protocol):
    """A per-sample reward: `reward(sample: RewardInput) -> float | RewardResult | dict`.

    The contract, for every reward (and `GroupReward`):
    - picklable: a module-level function, or an instance of a module-level class whose state is plain
      data (options); it is shipped to worker processes, and so are its inputs and results;
    - no global state: each call may run in any worker process, in any order, and a worker may be killed
      and replaced at any time; create clients or caches lazily inside the call if needed;
    - may be called from any process and thread (never assume the main thread or signals);
    - bounded: a call past the set's `timeout_s` is killed and scores 0, like a call that raises or
      returns a wrong type, NaN or a value outside `score_range` (default (-1, 1)).
    Optional attributes: `reward_kind` ("sample" by default, "group" for `GroupReward`), `score_range`,
    `preload` (modules to import before the call's clock starts), `gate` (see `rewards.format`).

    Example:
        >>> def exact(sample: RewardInput) -> float:
        ...     return float(sample.response.strip() == sample.answer)
        >>> exact(RewardInput("2+2?", "4", "4")), normalize_result(exact(RewardInput("2+2?", "5", "4")))
        (1.0, RewardResult(score=0.0, reason='', scores={}, correct=None))
    """

    def __call__(self, sample: RewardInput) -> float | RewardResult | dict: ...


class GroupReward(Protocol):
    """A group reward: all k responses of one prompt at once, one result per sample, in order.

    `reward_kind = "group"` marks it (class attribute, or `@reward(kind="group")`). Group rewards run
    after the per-sample ones, so each `RewardInput.correct` holds the set's correctness verdict. Same
    contract as `SampleReward`; a returned list of the wrong length fails the whole group.

    Example:
        >>> class Rank:
        ...     reward_kind = "group"
        ...     def __call__(self, samples):
        ...         return [1.0 if s.correct else 0.0 for s in samples]
        >>> Rank()([RewardInput("p", "a", "1", correct=True), RewardInput("p", "b", "1", correct=False)])
        [1.0, 0.0]
    """

    reward_kind: RewardKind

    def __call__(self, samples: list[RewardInput]) -> list[float | RewardResult | dict]: ...


class RewardPluginError(RuntimeError):
    """A reward plugin failed on too many samples in a row (or cannot be loaded); the run must stop."""


def reward(kind: RewardKind = "sample", score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
           preload: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator declaring a function's reward shape and score range (the defaults need no decorator).

    `preload` names modules the worker processes import once at start (heavy imports such as sympy),
    so that their import time does not count against the first call's time limit.

    Example:
        >>> @reward(kind="group", score_range=(0.0, 1.0))
        ... def shortest_wins(samples):
        ...     best = min(s.num_tokens for s in samples)
        ...     return [1.0 if s.num_tokens == best else 0.0 for s in samples]
        >>> shortest_wins([RewardInput("p", "a", "1", 3), RewardInput("p", "ab", "1", 5)])
        [1.0, 0.0]
    """
    if kind not in ("sample", "group"):
        raise ValueError(f"reward kind must be 'sample' or 'group', got {kind!r}")
    low, high = score_range
    if not low <= high:
        raise ValueError(f"score_range must be (low, high) with low <= high, got {score_range}")

    def mark(fn: Callable) -> Callable:
        fn.reward_kind = kind
        fn.score_range = (float(low), float(high))
        fn.preload = tuple(preload)
        return fn

    return mark


def normalize_result(value: Any, score_range: tuple[float, float] = DEFAULT_SCORE_RANGE) -> RewardResult:
    """Turn what a reward returned into a validated `RewardResult`, or raise ValueError/TypeError saying why.

    Accepted: a real number (bool excluded), a `RewardResult`, or a dict with key "score" and optional
    "reason", "scores" (dict of name -> number) and "correct" (bool).
    """
    if isinstance(value, RewardResult):
        result = value
    elif isinstance(value, bool) or value is None:
        raise TypeError(f"returned {type(value).__name__}, expected a number, RewardResult or dict")
    elif isinstance(value, numbers.Real):
        result = RewardResult(float(value))
    elif isinstance(value, Mapping):
        unknown = set(value) - {"score", "reason", "scores", "correct"}
        if "score" not in value or unknown:
            raise TypeError(f"returned a dict with keys {sorted(value)}; expected 'score' and optionally "
                            "'reason', 'scores', 'correct'")
        result = RewardResult(_number(value["score"], "score"), str(value.get("reason", "")),
                              dict(value.get("scores") or {}), value.get("correct"))
    else:
        raise TypeError(f"returned {type(value).__name__}, expected a number, RewardResult or dict")
    score = _number(result.score, "score")
    low, high = score_range
    if not low <= score <= high:
        raise ValueError(f"score {score:g} outside the reward's range [{low:g}, {high:g}]")
    if not isinstance(result.scores, Mapping):
        raise TypeError(f"sub-scores must be a dict, got {type(result.scores).__name__}")
    scores = {str(k): _number(v, f"sub-score {k!r}") for k, v in result.scores.items()}
    if result.correct is not None and not isinstance(result.correct, bool):
        raise TypeError(f"'correct' must be a bool or None, got {type(result.correct).__name__}")
    return RewardResult(score, str(result.reason), scores, result.correct)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} is {type(value).__name__}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}")
    return value
