"""Which cognitive patterns a reasoning trace shows: planning, evaluation, reflection, exploration.

Heuristics, documented so their counts can be read for what they are: a trace shows a pattern when its
thinking part (the whole text if it has no `</think>`) contains one of the pattern's cue phrases,
case-insensitively, at a word boundary. The cues are the phrases the builder's prompt asks for and the
ones reasoning models commonly write; they over-count when a word is used literally ("check the box")
and under-count paraphrases. Cheap and transparent beats a classifier model here: the numbers are for
comparing teachers and prompts, not for filtering.

| pattern     | cues                                                                                   |
|-------------|----------------------------------------------------------------------------------------|
| planning    | plan, first(,) I/we/let, step 1, approach, strategy, outline, let me start, to solve this |
| evaluation  | check, verify, double-check, confirm, sanity, let me make sure, substitut(e/ing) back    |
| reflection  | wait, hmm, actually, mistake, error, oops, on second thought, reconsider, correction     |
| exploration | alternatively, another way/approach/method, let me try, instead, what if, or maybe       |
"""

from __future__ import annotations

import re

PATTERNS: tuple[str, ...] = ("planning", "evaluation", "reflection", "exploration")

_CUES: dict[str, re.Pattern[str]] = {
    "planning": re.compile(
        r"\b(plan|first,? (?:i|we|let)|step 1\b|approach|strategy|outline|let me start|to solve this)", re.I),
    "evaluation": re.compile(
        r"\b(check|verif(?:y|ied|ies)|double-check|confirm|sanity|let me make sure|substitut(?:e|ing) back)", re.I),
    "reflection": re.compile(
        r"\b(wait|hmm|actually|mistake|error|oops|on second thought|reconsider|correction)\b", re.I),
    "exploration": re.compile(
        r"\b(alternatively|another (?:way|approach|method)|let me try|instead|what if|or maybe)\b", re.I),
}


def thinking_part(trace: str) -> str:
    """The text before the last `</think>` (the whole trace if there is none)."""
    cut = trace.rfind("</think>")
    return trace if cut < 0 else trace[:cut]


def detect_patterns(trace: str) -> list[str]:
    """The patterns (in `PATTERNS` order) whose cues occur in the trace's thinking part."""
    thinking = thinking_part(trace)
    return [name for name in PATTERNS if _CUES[name].search(thinking)]


def pattern_frequencies(pattern_lists: list[list[str]]) -> dict[str, dict[str, float]]:
    """{pattern: {"count": n, "share": n / traces}} over traces given as their detected pattern lists."""
    total = len(pattern_lists)
    return {name: {"count": (n := sum(name in p for p in pattern_lists)), "share": n / total if total else 0.0}
            for name in PATTERNS}
