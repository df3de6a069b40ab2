"""Binary math correctness: extract the final answer, compare it with the ground truth via math-verify.

Extraction reads the part after the thinking (after the last `</think>`; a response that opens `<think>`
and never closes it ran out of budget mid-thought and has no answer) and takes, in order:
1. the last `\\boxed{...}` (or `\\fbox{...}`), nested braces allowed;
2. the rest of the line after the last "Answer:" ("Final answer:", "**Answer:**", a full-width colon);
3. as a documented fallback (option `last_number`, on by default), the last number in the text.
The extracted answer is normalised for common unicode (− × ÷ π √ ∞, full-width digits) and stripped of
surrounding `$`. A response with no answer scores 0 with reason "no answer".

Equivalence is math-verify's (sympy underneath): numbers, fractions, LaTeX expressions, sets, intervals,
and the units / percent / degrees it knows how to drop. math-verify's own timeout uses signals, which only
work in a process's main thread and silently score 0 inside Ray worker threads; thinkrl therefore calls it
with its timeouts off and enforces a hard timeout from outside, by running rewards in killable worker
processes (`rewards.pool.RewardPool`). Calling `is_equivalent` directly has no time limit.
"""

from __future__ import annotations

import re

from rewards.types import RewardInput, RewardResult

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_ANSWER_MARK = re.compile(r"answer\s*(?:is)?\s*\**\s*[:：]\s*\**", re.IGNORECASE)
_UNICODE = str.maketrans({"−": "-", "–": "-", "×": "\\times ", "÷": "\\div ", "π": "\\pi ", "∞": "\\infty ",
                          "√": "\\sqrt ", "·": "\\cdot ", "≤": "\\le ", "≥": "\\ge ", "∪": "\\cup ",
                          "∅": "\\emptyset ", "，": ",", "．": ".", "（": "(", "）": ")", "＋": "+", "－": "-",
                          **{chr(0xFF10 + d): str(d) for d in range(10)}})
_LATEX_SYNONYMS = (("\\varnothing", "\\emptyset"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"))
_SCIENTIFIC = re.compile(r"^(-?\d+(?:\.\d+)?)[eE]([+-]?\d+)$")


def last_braced(text: str, command: str = "\\boxed") -> str | None:
    """The content of the last `command{...}` in `text` (nested braces allowed, spaces before `{` too),
    stripped; None if there is none with its braces closed. The project's one brace matcher.

    Example:
        >>> last_braced("so \\\\boxed{1} or rather \\\\boxed{\\\\frac{1}{2}}")
        '\\\\frac{1}{2}'
        >>> last_braced("\\\\fbox {7} and \\\\fbox{8", "\\\\fbox")  # the unclosed last one is skipped
        '7'
    """
    start = text.rfind(command)
    while start != -1:
        i = start + len(command)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        start = text.rfind(command, 0, start)
    return None


def final_part(response: str) -> str | None:
    """The text after the thinking: after the last `</think>`; None if `<think>` was never closed."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


def extract_answer(response: str, last_number: bool = True) -> str | None:
    """The final answer of a response, or None if it gives none (see the module docstring for the order).

    Example:
        >>> extract_answer("<think>2+2 is 4</think>So \\\\boxed{\\\\frac{8}{2}}.")
        '\\\\frac{8}{2}'
        >>> extract_answer("<think>still thinking about 3") is None
        True
    """
    final = final_part(response)
    if final is None:
        return None
    answer = last_braced(final, "\\boxed") or last_braced(final, "\\fbox")
    if not answer:
        marks = list(_ANSWER_MARK.finditer(final))
        if marks:
            line = final[marks[-1].end() :].strip().split("\n", 1)[0].strip()
            answer = line.rstrip(".").strip() or None
    if not answer and last_number:
        numbers = _NUMBER.findall(final.translate(_UNICODE))
        answer = numbers[-1] if numbers else None
    return normalize_answer(answer) if answer else None


def normalize_answer(answer: str) -> str:
    """Unicode math symbols to LaTeX, full-width digits to ASCII, `$...$` and trailing "." removed."""
    answer = answer.translate(_UNICODE).strip()
    for old, new in _LATEX_SYNONYMS:
        answer = answer.replace(old, new)
    while len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer[1:-1].strip()
    scientific = _SCIENTIFIC.match(answer)
    if scientific:  # math-verify reads 1e3 as a symbol product
        answer = f"{scientific.group(1)}\\times 10^{{{scientific.group(2)}}}"
    return answer.rstrip(".").strip()


def is_equivalent(gold: str, prediction: str) -> bool:
    """math-verify equivalence of two answer strings, with math-verify's signal timeouts disabled.

    Example:
        >>> is_equivalent("1/2", "\\\\frac{2}{4}"), is_equivalent("[0, 1]", "(0, 1)")
        (True, False)
    """
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # it warns on every call that its (signal-based) timeouts are off; that is deliberate here
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold, prediction = normalize_answer(gold), normalize_answer(prediction)
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(_as_latex(gold), extraction_config=configs, parsing_timeout=None)
    pred_parsed = parse(_as_latex(prediction), extraction_config=configs, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return gold.strip() == prediction.strip()
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _as_latex(answer: str) -> str:
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


def math_reward(response: str, answer: str) -> RewardResult:
    """1.0 if the response's final answer equals `answer`, else 0.0 (reason "correct", "wrong", "no answer").

    Example:
        >>> math_reward("<think>3+4</think>\\\\boxed{7}", "7")
        RewardResult(score=1.0, reason='correct', scores={}, correct=True)
    """
    return MathReward()(RewardInput("", response, answer))


class MathReward:
    """The `math` reward: binary correctness of the final answer (see the module docstring).

    Options: `last_number` (default True): fall back to the last number when there is no box and no
    "Answer:". Sets `RewardResult.correct`, so it is a set's correctness reward.
    """

    reward_kind = "sample"
    score_range = (0.0, 1.0)
    preload = ("math_verify", "sympy")

    def __init__(self, last_number: bool = True) -> None:
        self.last_number = bool(last_number)

    def __call__(self, sample: RewardInput) -> RewardResult:
        prediction = extract_answer(sample.response, last_number=self.last_number)
        if prediction is None:
            return RewardResult(0.0, "no answer", correct=False)
        if is_equivalent(str(sample.answer), prediction):
            return RewardResult(1.0, "correct", correct=True)
        return RewardResult(0.0, "wrong", correct=False)


math_reward.preload = MathReward.preload  # the pool imports these before starting a call's clock
