"""The embedded default task: left-to-right integer arithmetic with a programmatic long-CoT teacher.

A problem is a chain of 1-5 additions/subtractions of single digits (`7+5-3+8=?`); its difficulty is
the number of operations. Running totals stay in 0..20, so a tiny character-level model can learn the
arithmetic in minutes on a CPU.

The teacher writes worked solutions with the cognitive moves the Kimi reports name: a plan, one line
per step, a reflection that catches and corrects a slip ("Wait, ..."), a final check, and a
`\\boxed{}` answer after `</think>`. Like an LLM teacher, it is imperfect on purpose: each step slips
by one with probability `slip_rate`, and only a share `fix_rate` of slips is caught by the reflection.
A model warmed up on these traces inherits the slips; RL with a correctness reward is what lets the
policy become better than its teacher, which is what the demo measures.

`Rechecks` gives the teacher a second habit of long-CoT models, off by default: after its final check it
sometimes re-checks the whole chain, and sometimes again and again ("Wait, let me re-check: ..."). The
number of re-checks is geometric, so a minority of traces is several times longer than the median: the
long tail of response lengths that partial rollouts exist for (`recipes/tiny-longtail.yaml`). A policy
warmed up on them inherits the loop, since only the chance of one more re-check is there to learn.
The same dataclass holds two more habits of overthinking models, each off by default: verifying every
step by its inverse ("Verify: 12-5=7.") and deriving the whole chain again from the start before the
final check. `OVERTHINKING` turns all three on at once (`sft.teacher_mode: overthinking`): traces about
three times as long as the plain teacher's, none of it needed for the answer, which is what long2short
methods exist to remove (`recipes/tiny-long2short.yaml`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

MAX_TOTAL = 20


@dataclass(frozen=True)
class Problem:
    """One problem. `terms[0]` is the start; `ops[i]` ('+'/'-') applies `terms[i + 1]`."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def question(self) -> str:
        text = str(self.terms[0])
        for op, term in zip(self.ops, self.terms[1:], strict=True):
            text += op + str(term)
        return text + "=?"

    @property
    def answer(self) -> int:
        return self.partial_totals()[-1]

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    def partial_totals(self) -> list[int]:
        totals = [self.terms[0]]
        for op, term in zip(self.ops, self.terms[1:], strict=True):
            totals.append(totals[-1] + term if op == "+" else totals[-1] - term)
        return totals


def sample_problem(rng: random.Random, num_ops: int) -> Problem:
    """A random problem with `num_ops` operations whose running totals stay in 0..MAX_TOTAL."""
    terms = [rng.randint(1, 9)]
    ops: list[str] = []
    total = terms[0]
    for _ in range(num_ops):
        term = rng.randint(1, 9)
        choices = [op for op, ok in (("+", total + term <= MAX_TOTAL), ("-", total - term >= 0)) if ok]
        op = rng.choice(choices)
        total = total + term if op == "+" else total - term
        terms.append(term)
        ops.append(op)
    return Problem(tuple(terms), tuple(ops))


@dataclass(frozen=True)
class LongProblems:
    """A share of problems drawn with many more operations: a long tail of problem lengths, so the long
    responses are the ones the answer needs (RL cannot shorten them away, as it does a teacher's idle
    re-checks). Off by default (`share` 0). Each row is long with probability `share`; a problem drawn twice
    is redrawn of the same kind, so the share holds however few distinct short problems there are."""

    share: float = 0.0
    min_ops: int = 12
    max_ops: int = 24

    def __post_init__(self) -> None:
        if not (0 <= self.share <= 1 and 1 <= self.min_ops <= self.max_ops):
            raise ValueError(f"LongProblems needs share in [0, 1] and 1 <= min_ops <= max_ops, got {self}")


def make_rows(n: int, seed: int, min_ops: int = 1, max_ops: int = 5, exclude: set[str] | None = None,
              long: LongProblems | None = None) -> list[dict]:
    """`n` distinct problems as dataset rows: `id`, `prompt`, `answer`, `difficulty`. With `long`, each
    problem is a long one (`long.min_ops..long.max_ops` operations) with probability `long.share`; without,
    the draws are the same, byte for byte, as before the option existed."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    attempts = 0
    while len(rows) < n:
        lo, hi = (long.min_ops, long.max_ops) if long and long.share and rng.random() < long.share else (min_ops, max_ops)
        while True:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct problems with {lo}..{hi} operations")
            problem = sample_problem(rng, rng.randint(lo, hi))
            if problem.question not in seen:
                break
        seen.add(problem.question)
        rows.append(
            {
                "id": f"arith-{seed}-{len(rows)}",
                "prompt": problem.question,
                "answer": str(problem.answer),
                "difficulty": problem.difficulty,
            }
        )
    return rows


def parse_question(question: str) -> Problem:
    """Inverse of `Problem.question`."""
    body = question.removesuffix("=?")
    terms, ops, digits = [], [], ""
    for ch in body:
        if ch in "+-":
            terms.append(int(digits))
            ops.append(ch)
            digits = ""
        else:
            digits += ch
    terms.append(int(digits))
    return Problem(tuple(terms), tuple(ops))


@dataclass(frozen=True)
class Rechecks:
    """How often the teacher re-checks its work beyond the plain solution (all off by default).

    Re-check loops (`rate`, `repeat`, `most`) after the final check; step verification (`verify`: the
    chance each step is followed by its inverse, "Verify: 12-5=7."); re-derivation (`rederive`: the chance
    the whole chain is worked again from the start before the final check). None changes the answer.

    A trace re-checks with probability `rate`; each re-check is followed by another with probability
    `repeat`, up to `most` in all. So P(at least k re-checks) = rate * repeat**(k - 1): a geometric tail
    whose length the loop's one decision (one more, or stop) sets, which is what a warmed-up policy can
    learn to imitate.

    >>> text = teacher_solution(parse_question("7+5-3=?"), random.Random(0), slip_rate=0.0,
    ...                         rechecks=Rechecks(rate=1.0, repeat=0.0))
    >>> print(text)
    <think>Plan: 2 steps.
    7+5=12
    12-3=9
    Check: 9+3=12.
    Wait, let me re-check: 7+5=12, 12-3=9.</think>\\boxed{9}
    """

    rate: float = 0.0
    repeat: float = 0.0
    most: int = 8
    verify: float = 0.0
    rederive: float = 0.0

    def __post_init__(self) -> None:
        rates = (self.rate, self.repeat, self.verify, self.rederive)
        if not (all(0 <= r <= 1 for r in rates) and self.most >= 1):
            raise ValueError(f"Rechecks needs rate and repeat in [0, 1] (verify and rederive too) and most >= 1, got {self}")

    @property
    def on(self) -> bool:
        """Whether any habit is on (a trace may differ from the plain teacher's)."""
        return bool(self.rate or self.verify or self.rederive)

    def draw(self, rng: random.Random) -> int:
        """The number of re-checks of one trace. Draws nothing from `rng` when off, so traces without
        re-checks are the same, byte for byte, as before the option existed."""
        if self.rate == 0 or rng.random() >= self.rate:
            return 0
        count = 1
        while count < self.most and rng.random() < self.repeat:
            count += 1
        return count


NO_RECHECKS = Rechecks()
# `sft.teacher_mode: overthinking`: every habit at once. Each is a coin flip per step or trace, so the
# warmed-up policy's responses vary in length for the same question: the spread a length penalty needs.
OVERTHINKING = Rechecks(rate=0.6, repeat=0.5, most=6, verify=0.5, rederive=0.6)


def worked_step(rng: random.Random, step: str, result: int, slip: Callable[[random.Random, int], int],
                slip_rate: float, fix_rate: float) -> tuple[list[str], int]:
    """One step `step=result` as an imperfect teacher writes it: the lines, and the value it carries on with.

    With probability `slip_rate` it writes `slip(rng, result)` instead; a share `fix_rate` of slips is caught
    by a "Wait, step=result." line, the others carry on. The draws from `rng` (slip?, the slip, caught?) are
    in that order, which the teachers' traces depend on.
    """
    if rng.random() >= slip_rate:
        return [f"{step}={result}"], result
    wrong = slip(rng, result)
    if rng.random() < fix_rate:
        return [f"{step}={wrong}", f"Wait, {step}={result}."], result
    return [f"{step}={wrong}"], wrong


def _slip_in_range(rng: random.Random, result: int) -> int:
    """`result` off by one, staying in 0..MAX_TOTAL."""
    return result + rng.choice((-1, 1)) if 0 < result < MAX_TOTAL else result + (1 if result == 0 else -1)


def teacher_solution(problem: Problem, rng: random.Random, slip_rate: float = 0.15, fix_rate: float = 0.5,
                     rechecks: Rechecks = NO_RECHECKS) -> str:
    """A worked long-CoT solution (the assistant message content) for `problem`.

    Each step's result slips by +-1 with probability `slip_rate`; a slip is caught by a reflection
    line and corrected with probability `fix_rate`, otherwise the chain carries on from the wrong value.
    After the final check the teacher re-checks the chain as it believes it (an uncaught slip stays)
    `rechecks.draw(rng)` times; `rechecks.verify` and `rechecks.rederive` add step verifications and a
    second derivation (see `Rechecks`). They lengthen the trace and never change the answer.

    >>> print(teacher_solution(parse_question("7+5-3=?"), random.Random(0), slip_rate=0.0,
    ...                        rechecks=Rechecks(verify=1.0, rederive=1.0)))
    <think>Plan: 2 steps.
    7+5=12
    Verify: 12-5=7.
    12-3=9
    Verify: 9+3=12.
    Let me work it out again from the start: 7+5=12, 12-3=9.
    Check: 9+3=12.</think>\\boxed{9}
    """
    lines = [f"Plan: {problem.difficulty} steps."]
    steps = []
    value = problem.terms[0]
    for op, term in zip(problem.ops, problem.terms[1:], strict=True):
        step = f"{value}{op}{term}"
        written, value = worked_step(rng, step, value + term if op == "+" else value - term, _slip_in_range,
                                     slip_rate, fix_rate)
        lines += written
        steps.append(f"{step}={value}")
        if rechecks.verify and rng.random() < rechecks.verify:
            lines.append(f"Verify: {_inverse(value, op, term)}.")
    if problem.ops:
        if rechecks.rederive and rng.random() < rechecks.rederive:
            lines.append(f"Let me work it out again from the start: {', '.join(steps)}.")
        last = problem.terms[-1]
        lines.append(f"Check: {_inverse(value, problem.ops[-1], last)}.")
        lines += [f"Wait, let me re-check: {', '.join(steps)}."] * rechecks.draw(rng)
    return "<think>" + "\n".join(lines) + "</think>\\boxed{" + str(value) + "}"


def _inverse(value: int, op: str, term: int) -> str:
    """The step undone from its written result: `value-term=back` after a `+`, `value+term=back` after a `-`."""
    undo, back = ("-", value - term) if op == "+" else ("+", value + term)
    return f"{value}{undo}{term}={back}"


def sft_conversations(rows: list[dict], seed: int, samples_per_row: int = 1, slip_rate: float = 0.15,
                      fix_rate: float = 0.5, rechecks: Rechecks = NO_RECHECKS) -> list[dict]:
    """ChatML conversations (`{"messages": [...]}`) with teacher solutions for the SFT warmup."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        problem = parse_question(row["prompt"])
        for _ in range(samples_per_row):
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": teacher_solution(problem, rng, slip_rate, fix_rate, rechecks)},
                    ],
                    "answer": row["answer"],
                }
            )
    return out
