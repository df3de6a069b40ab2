"""reasoning-gym tasks as a data source: rows for RL, held-out and the warmup, and programmatic teachers.

reasoning-gym (the optional extra `thinkrl[tasks]`) generates items of its 100+ tasks from a seed:
`create_dataset(name, seed=S, size=N, **config)`, item i drawn from `Random(S + i)`, with curricula that
map a level to a config. `make_rows` turns a recipe's `data.reasoning_gym.datasets` into rows:

- each dataset gets a share of the rows by its `weight`, spread evenly over its `levels` (curriculum
  levels of the task: level L's config comes from `create_curriculum(name)` at global level L, then the
  dataset's own `config` on top); without levels the config alone, at level 0;
- a row is `{id, prompt, answer, difficulty, task, rg_metadata}`: the item's question and gold answer, the
  level as the integer `difficulty` the curriculum and prioritized samplers read, the task name and the
  item's metadata (what its scorer needs, as JSON: rows written to a file score the same);
- rows are deterministic in the run seed and distinct by question. Datasets of nearby seeds share items
  (seeds 0 and 1 share 99 of 100), so each (split, task, level) gets its own seed hashed from the run
  seed, and the held-out questions are passed as `exclude` when the train rows are drawn: no question is
  in both. A level whose generator cannot give its share of distinct questions (chain_sum's 2 one-digit
  terms have 200; up to 32 items are read per question wanted) hands the rest to the next level; the last one
  short is an error naming the task.

The teachers (`solution`, `ReasoningGymTeacher`) write long-CoT traces for a few tasks, short enough for a
byte-level tiny model, with the moves of `thinkrl.tasks.arithmetic`'s teacher: a plan, one line per step,
slips (probability `slip_rate` per step) of which a share `fix_rate` is caught by a "Wait, ..." line, a
check, and `\\boxed{}` after `</think>`. An uncaught slip carries into the answer: the warmed-up policy
inherits it, and RL with the task's own scorer is what removes it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from rewards.reasoning_gym import import_reasoning_gym
from thinkrl.tasks.arithmetic import worked_step


@dataclass(frozen=True)
class DatasetSpec:
    """One reasoning-gym task of a mix: its `name`, share `weight`, `config` (keyword arguments of its
    dataset) and curriculum `levels` (empty: `config` alone, at level 0)."""

    name: str
    weight: float = 1.0
    config: dict = field(default_factory=dict)
    levels: tuple[int, ...] = ()


def dataset_names() -> list[str]:
    """Every task reasoning-gym registers, sorted."""
    import_reasoning_gym()  # first: a missing install gets the message naming the extra
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_name(name: str) -> None:
    """ValueError for a task reasoning-gym does not have, listing the closest names."""
    names = dataset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(names)} tasks; e.g. {', '.join(names[:6])})"
        raise ValueError(f"reasoning-gym has no task {name!r}{hint}")


def level_config(spec: DatasetSpec, level: int | None) -> dict:
    """The dataset's keyword arguments at curriculum `level` (None: the spec's config alone). ValueError
    naming the task when it has no curriculum or the level is past its last."""
    if level is None:
        return dict(spec.config)
    from reasoning_gym.factory import create_curriculum

    try:
        curriculum = create_curriculum(spec.name)
    except Exception as e:
        raise ValueError(f"task {spec.name!r} has no curriculum, so no levels ({e}); drop 'levels'") from None
    top = max(len(a.levels) for a in curriculum.attributes.values()) - 1
    if not 0 <= level <= top:
        raise ValueError(f"task {spec.name!r}: level {level} is outside its curriculum's levels 0..{top}")
    for name, attribute in curriculum.attributes.items():  # past an attribute's last level it stays there
        curriculum.set_attr_level(name, min(level, len(attribute.levels) - 1))
    generated = vars(curriculum.generate_configuration({"seed": 0, "size": 1}))
    generated = {k: v for k, v in generated.items() if k not in ("seed", "size")}
    return {**generated, **spec.config}


def check_spec(spec: DatasetSpec) -> None:
    """Everything about one dataset of a mix that can be checked without drawing its rows: the name, each
    level, and that its config builds a dataset. ValueError naming what is wrong."""
    check_name(spec.name)
    rg = import_reasoning_gym()
    for level in spec.levels or (None,):
        config = level_config(spec, level)
        where = f"task {spec.name!r}" + ("" if level is None else f" at level {level}")
        try:
            items = rg.create_dataset(spec.name, seed=0, size=1, **config)
            _json_metadata(items[0], spec.name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        except Exception as e:  # reasoning-gym's own checks are asserts and TypeErrors
            raise ValueError(f"{where}: config {config} is refused: {type(e).__name__}: {e}") from None


def _seed(seed: int, split: str, name: str, level: int | None) -> int:
    """A seed of its own per (run seed, split, task, level): reasoning-gym's item i uses Random(seed + i),
    so nearby seeds would share items."""
    digest = hashlib.sha256(f"{seed}/{split}/{name}/{level}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _json_metadata(item: dict, name: str) -> dict:
    try:
        return json.loads(json.dumps(item["metadata"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"task {name!r}: an item's metadata is not JSON ({e}); this task cannot be written "
                         "to rows") from None


def _shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders), summing to `total`."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def make_rows(specs: Iterable[DatasetSpec], n: int, seed: int, split: str,
              exclude: set[str] | None = None) -> list[dict]:
    """`n` rows of the mix `specs` (see the module docstring), none with a question in `exclude`.

    `split` names the draw ("heldout", "train", "sft"): each draws from seeds of its own. Rows of one task
    and level are contiguous, in the generator's order; ids are `rg-<split>-<task>-<level>-<k>`.
    """
    rg = import_reasoning_gym()
    specs = list(specs)
    seen = set(exclude or ())
    rows: list[dict] = []
    for spec, count in zip(specs, _shares(n, [s.weight for s in specs]), strict=True):
        levels = list(spec.levels) or [None]
        short = 0
        for k, (level, want) in enumerate(zip(levels, _shares(count, [1.0] * len(levels)), strict=True)):
            want += short
            config = level_config(spec, level)
            size = 32 * want + 1024  # items are generated as they are read: the size only bounds the search
            items = rg.create_dataset(spec.name, seed=_seed(seed, split, spec.name, level), size=size, **config)
            got = 0
            for i in range(size):
                if got == want:
                    break
                item = items[i]
                if item["question"] in seen:
                    continue
                seen.add(item["question"])
                rows.append({"id": f"rg-{split}-{spec.name}-{0 if level is None else level}-{got}",
                             "prompt": item["question"], "answer": str(item["answer"]),
                             "difficulty": 0 if level is None else level, "task": spec.name,
                             "rg_metadata": _json_metadata(item, spec.name)})
                got += 1
            short = want - got
            if short and k == len(levels) - 1:
                raise ValueError(f"task {spec.name!r}: {size} items drawn at level {level} gave only {got} of the "
                                 f"{want} distinct questions needed (the task's config allows few); lower data.n_train "
                                 f"/ n_heldout, give it less weight or more levels")
    return rows


# ---- teachers ---------------------------------------------------------------------------------------------

_CHAIN_SUM = re.compile(r"arithmetic problem:\s*(-?\d+(?:\s*[-+]\s*-?\d+)*)\s*=")
_LETTER_COUNTING = re.compile(r'How many times does the letter "(.)" appear in the text: "(.*)"\?', re.DOTALL)
_SPELL_BACKWARD = re.compile(r"Spell this word backward \(example: sun -> nus\):\s*(\S+)")


def _slip(rng: random.Random, value: int, floor: int | None = None) -> int:
    """`value` off by one (never below `floor`)."""
    wrong = value + rng.choice((-1, 1))
    return value + 1 if floor is not None and wrong < floor else wrong


def chain_sum_solution(expression: str, rng: random.Random, slip_rate: float, fix_rate: float) -> str:
    """A left-to-right running total over `expression` ("4 + 3 - 12").

    >>> print(chain_sum_solution("4 + 3 - 12", random.Random(0), slip_rate=0.0, fix_rate=0.0))
    <think>Plan: 3 terms, left to right.
    4+3=7
    7-12=-5
    Check: -5+12=7.</think>\\boxed{-5}
    """
    tokens = re.findall(r"[-+]|\d+", expression.replace(" ", ""))
    if tokens[0] == "-":  # a negative first term
        tokens = [f"-{tokens[1]}", *tokens[2:]]
    value, rest = int(tokens[0]), tokens[1:]
    lines = [f"Plan: {len(rest) // 2 + 1} terms, left to right."]
    for op, term in zip(rest[::2], rest[1::2], strict=True):
        written, value = worked_step(rng, f"{value}{op}{term}", value + int(term) if op == "+" else value - int(term),
                                     _slip, slip_rate, fix_rate)
        lines += written
    if rest:
        op, term = rest[-2], rest[-1]
        undo, back = ("-", value - int(term)) if op == "+" else ("+", value + int(term))
        lines.append(f"Check: {value}{undo}{term}={back}.")
    return "<think>" + "\n".join(lines) + "</think>\\boxed{" + str(value) + "}"


def letter_counting_solution(letter: str, text: str, rng: random.Random, slip_rate: float, fix_rate: float) -> str:
    """Word by word: the word and how many `letter`s it holds (case-insensitive, as the task counts), with a
    running total on the words that hold one.

    >>> print(letter_counting_solution("a", "bad apple", random.Random(0), slip_rate=0.0, fix_rate=0.0))
    <think>Count "a" in 2 words.
    bad 1, total 1
    apple 1, total 2
    So 2.</think>\\boxed{2}
    """
    words = text.split()
    lines = [f'Count "{letter}" in {len(words)} words.']
    total = 0
    for word in words:
        count = word.lower().count(letter.lower())
        if rng.random() < slip_rate:
            wrong = _slip(rng, count, floor=0)
            lines.append(f"{word} {wrong}" + (f", total {total + wrong}" if wrong else ""))
            if rng.random() < fix_rate:
                lines.append(f"Wait, {word} has {count}.")
            else:
                count = wrong
        else:
            lines.append(f"{word} {count}" + (f", total {total + count}" if count else ""))
        total += count
        if lines[-1].startswith("Wait") and count:
            lines.append(f"total {total}")
    lines.append(f"So {total}.")
    return "<think>" + "\n".join(lines) + "</think>\\boxed{" + str(total) + "}"


def spell_backward_solution(word: str, rng: random.Random, slip_rate: float, fix_rate: float) -> str:
    """The letters from the last to the first, joined. A slip swaps two neighbouring letters.

    >>> print(spell_backward_solution("sun", random.Random(0), slip_rate=0.0, fix_rate=0.0))
    <think>sun has 3 letters. From the end: n-u-s.</think>\\boxed{nus}
    """
    letters = list(reversed(word))
    if len(letters) > 1 and rng.random() < slip_rate:
        i = rng.randrange(len(letters) - 1)
        wrong = letters[:i] + [letters[i + 1], letters[i]] + letters[i + 2 :]
        if rng.random() < fix_rate:
            return (f"<think>{word} has {len(word)} letters. From the end: {'-'.join(wrong)}. Wait, "
                    f"{'-'.join(letters)}.</think>\\boxed{{{''.join(letters)}}}")
        letters = wrong
    return f"<think>{word} has {len(word)} letters. From the end: {'-'.join(letters)}.</think>\\boxed{{{''.join(letters)}}}"


TEACHER_TASKS = ("chain_sum", "letter_counting", "spell_backward")


def solution(question: str, rng: random.Random, slip_rate: float = 0.15, fix_rate: float = 0.5) -> str:
    """A teacher trace for a question of one of `TEACHER_TASKS`, recognised by its wording; ValueError naming
    the question otherwise."""
    if match := _CHAIN_SUM.search(question):
        return chain_sum_solution(match.group(1), rng, slip_rate, fix_rate)
    if match := _LETTER_COUNTING.search(question):
        return letter_counting_solution(match.group(1), match.group(2), rng, slip_rate, fix_rate)
    if match := _SPELL_BACKWARD.search(question):
        return spell_backward_solution(match.group(1), rng, slip_rate, fix_rate)
    raise ValueError(f"no programmatic teacher for the question {question[:80]!r}: the embedded teachers write "
                     f"{', '.join(TEACHER_TASKS)}; for other tasks build the warmup data with a model teacher "
                     "(python -m sft.build_cot --teacher vllm|openai --reward reasoning_gym)")


class ReasoningGymTeacher:
    """The programmatic teachers behind `sft.build_cot.Teacher` (reads `messages[-1]["raw_question"]`)."""

    def __init__(self, slip_rate: float = 0.15, fix_rate: float = 0.5) -> None:
        self.slip_rate, self.fix_rate = slip_rate, fix_rate

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        out = []
        for p, messages in enumerate(prompts):
            rng = random.Random(f"{seed}-{p}")
            question = messages[-1]["raw_question"]
            out.append([solution(question, rng, self.slip_rate, self.fix_rate) for _ in range(k)])
        return out
