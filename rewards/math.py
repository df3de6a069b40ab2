"""Binary math correctness: extract the final answer, compare it with the ground truth via math-verify.

Extraction reads the part after the thinking (after the last `</think>` when present) and takes, in
order: the last `\\boxed{...}` (nested braces allowed), the text after the last "Answer:", and, as a
documented fallback, the last number. Equivalence is math-verify's (sympy underneath): numbers,
fractions, LaTeX expressions, sets and intervals.

math-verify's own timeout uses signals, which only work in a process's main thread and silently score 0
inside Ray worker threads; thinkrl therefore calls it with its timeouts off and enforces a hard timeout
from outside, by running rewards in killable worker processes (`rewards.pool.RewardPool`).
"""

from __future__ import annotations

import re

from rewards.types import RewardResult

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None if it gives none (see the module docstring for order)."""
    final = response.rsplit("</think>", 1)[-1] if "</think>" in response else response
    boxed = _last_boxed(final)
    if boxed:
        return boxed
    marker = final.lower().rfind("answer:")
    if marker != -1:
        tail = final[marker + len("answer:") :].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip().rstrip(".")
    numbers = _NUMBER.findall(final)
    return numbers[-1] if numbers else None


def is_equivalent(gold: str, prediction: str) -> bool:
    """math-verify equivalence of two answer strings, with math-verify's signal timeouts disabled."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # it warns on every call that its (signal-based) timeouts are off; that is deliberate here
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(_as_latex(gold), extraction_config=configs, parsing_timeout=None)
    pred_parsed = parse(_as_latex(prediction), extraction_config=configs, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == prediction.strip()
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _as_latex(answer: str) -> str:
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def math_reward(response: str, answer: str) -> RewardResult:
    """1.0 if the response's final answer equals `answer`, else 0.0 (reason "no answer" or "wrong")."""
    prediction = extract_answer(response)
    if prediction is None:
        return RewardResult(0.0, "no answer")
    if is_equivalent(answer, prediction):
        return RewardResult(1.0, "correct")
    return RewardResult(0.0, "wrong")
