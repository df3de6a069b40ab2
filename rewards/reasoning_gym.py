"""The `reasoning_gym` reward: a response scored by the reasoning-gym task's own answer scorer.

reasoning-gym (PyPI `reasoning-gym`, the optional extra `thinkrl[tasks]`) ships, for each of its procedural
tasks, a scorer `score_answer(answer, entry) -> float in [0, 1]` that knows the task's answer format (a
word spelled backwards, a list, a number). A row built by `thinkrl.tasks.reasoning_gym` carries what the
scorer needs: its `task` name and the item's `rg_metadata`; the prompt is the item's question and the
answer its gold answer.

The answer is the text after the thinking: the last `\\boxed{...}`, else the last `<answer>...</answer>`,
else the last non-empty line. A response whose `<think>` never closed has no answer (score 0).

Correct means a full score (1.0): several scorers give partial credit to an output that merely contains
the answer (gcd: "11" for "1" scores 0.5; spell_backward accepts a near miss), which a binary correctness
reward must not count. The reward's score is that verdict (1 or 0); the scorer's raw value is kept as the
sub-score `score` (logged as `reward/reasoning_gym/score`).

Trade-off: the scorers are reasoning-gym's code, run as they are inside the reward workers, so a scorer
that hangs or raises costs one sample's reward (the pool's hard timeout), never the run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rewards.math import final_part, last_braced
from rewards.types import RewardInput, RewardResult

EXTRA = "thinkrl[tasks]"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def import_reasoning_gym():
    """The `reasoning_gym` module; ImportError naming the extra that installs it when it is missing."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(f"reasoning-gym is not installed (it is the optional extra {EXTRA}): "
                          f"pip install '{EXTRA}' (or: pip install reasoning-gym==0.1.25); {e}") from None
    return reasoning_gym


def extract_answer(response: str) -> str | None:
    """The final answer of a response (see the module docstring for the order), or None.

    Example:
        >>> extract_answer("<think>n-u-s</think>\\\\boxed{nus}"), extract_answer("<think>x</think><answer> 7 </answer>")
        ('nus', '7')
        >>> extract_answer("<think>...</think>\\nso the count is\\n 4 \\n"), extract_answer("<think>still going") is None
        ('4', True)
    """
    final = final_part(response)
    if final is None:
        return None
    boxed = last_braced(final)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(final)
    if tags:
        return tags[-1].strip()
    lines = [line.strip() for line in final.splitlines() if line.strip()]
    return lines[-1] if lines else None


def entry_of(sample: RewardInput) -> tuple[str, dict[str, Any]]:
    """(task name, the reasoning-gym entry its scorer expects) of a sample from a reasoning-gym row.

    Raises ValueError naming the missing field when the sample's row is not one.
    """
    metadata: Mapping[str, Any] = sample.metadata
    task = metadata.get("task")
    if not isinstance(task, str) or not task:
        raise ValueError("the row has no 'task' field: the reasoning_gym reward scores rows built by "
                         "data.task=reasoning_gym (or rows exported from it)")
    rg_metadata = metadata.get("rg_metadata")
    if not isinstance(rg_metadata, Mapping):
        raise ValueError(f"the row (task {task!r}) has no 'rg_metadata' mapping (the reasoning-gym item's metadata)")
    return task, {"question": sample.prompt, "answer": sample.answer, "metadata": dict(rg_metadata)}


class ReasoningGymReward:
    """Binary correctness by the row's reasoning-gym scorer (`correct` = full score; raw score a sub-score).

    Example (needs the extra):
        >>> from rewards.types import RewardInput
        >>> row = {"task": "spell_backward", "rg_metadata": {"word": "sun", "word_len": 3}}
        >>> reward = ReasoningGymReward()
        >>> reward(RewardInput("Spell this word backward: sun", "<think>n-u-s</think>\\\\boxed{nus}", "nus", 9, row))
        RewardResult(score=1.0, reason='correct', scores={'score': 1.0}, correct=True)
    """

    score_range = (0.0, 1.0)
    preload = ("reasoning_gym",)

    def __call__(self, sample: RewardInput) -> RewardResult:
        task, entry = entry_of(sample)
        answer = extract_answer(sample.response)
        if answer is None:
            return RewardResult(0.0, "no answer", {"score": 0.0}, correct=False)
        scorer = import_reasoning_gym().get_score_answer_fn(task)
        raw = float(scorer(answer, entry))
        correct = raw >= 1.0
        reason = "correct" if correct else ("partial" if raw > 0 else "wrong")
        return RewardResult(1.0 if correct else 0.0, reason, {"score": raw}, correct=correct)
