"""The value every reward returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """A reward's verdict on one response: the score and a short reason ("correct", "timeout", ...)."""

    score: float
    reason: str = ""
