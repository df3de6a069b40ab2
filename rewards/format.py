"""The `format` reward: the think-tag structure, one `<think>...</think>` block and then an answer.

A well-formed response is: optional whitespace, `<think>`, the reasoning, `</think>`, then a non-empty
answer with no further think tags. With `think_in_prompt=True` (chat templates that end the generation
prompt with `<think>`) the response must instead hold exactly one `</think>` and no `<think>`.

Two modes. `mode="reward"` (default): 1.0 if well formed, else 0.0, added with the spec's weight. `mode=
"gate"`: the score is the same but is not added; instead a malformed response gets a total reward of 0 and
counts as incorrect, whatever the other rewards said (a hard format requirement without a shaping term).
"""

from __future__ import annotations

from typing import Literal

from rewards.types import RewardInput, RewardResult


def check_format(response: str, think_in_prompt: bool = False) -> str:
    """"ok", or what is wrong with the response's think-tag structure.

    Example:
        >>> check_format("<think>2+2=4</think>\\\\boxed{4}"), check_format("\\\\boxed{4}")
        ('ok', 'no <think> block')
    """
    opens, closes = response.count("<think>"), response.count("</think>")
    if think_in_prompt:
        if opens:
            return "<think> in the response (the prompt opens it)"
        body = response
    else:
        if opens == 0:
            return "no <think> block"
        if response[: response.index("<think>")].strip():
            return "text before <think>"
        if opens > 1:
            return "more than one <think> block"
        body = response[response.index("<think>") + len("<think>") :]
    if closes == 0:
        return "unclosed <think>"
    if closes > 1:
        return "more than one </think>"
    if not body.split("</think>", 1)[1].strip():
        return "no answer after </think>"
    return "ok"


class FormatReward:
    """The `format` reward. Options: `mode` ("reward" or "gate"), `think_in_prompt` (bool)."""

    reward_kind = "sample"
    score_range = (0.0, 1.0)

    def __init__(self, mode: Literal["reward", "gate"] = "reward", think_in_prompt: bool = False) -> None:
        if mode not in ("reward", "gate"):
            raise ValueError(f"format: mode must be 'reward' or 'gate', got {mode!r}")
        self.gate = mode == "gate"
        self.think_in_prompt = bool(think_in_prompt)

    def __call__(self, sample: RewardInput) -> RewardResult:
        verdict = check_format(sample.response, self.think_in_prompt)
        return RewardResult(1.0 if verdict == "ok" else 0.0, verdict)
