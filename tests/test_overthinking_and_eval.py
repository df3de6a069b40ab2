"""The overthinking teacher, test-time budgets and periodic evaluation: the pure parts (issue 19).

The RL run that uses them end to end (eval.every, eval.test_time_budgets, tts.png) is tests/test_e2e.py's.
"""

import random
import re
import statistics

import pytest

from rl.config import Recipe
from rl.train import level_changes
from sft.build_cot import ArithmeticTeacher
from sft.config import SFTRecipe
from thinkrl.config import RecipeError, load_recipe
from thinkrl.tasks import arithmetic

RECIPE = "recipes/tiny-long2short.yaml"


def _texts(rows, rechecks, slip_rate=0.25, fix_rate=0.2, k=1):
    prompts = [[{"role": "user", "content": r["prompt"], "raw_question": r["prompt"]}] for r in rows]
    return [t for group in ArithmeticTeacher(slip_rate, fix_rate, rechecks).sample(prompts, k=k, seed=0) for t in group]


def test_overthinking_traces_are_longer_and_answer_alike():
    rows = arithmetic.make_rows(600, seed=3, min_ops=1, max_ops=3)
    plain = _texts(rows, arithmetic.NO_RECHECKS, slip_rate=0.0)
    verbose = _texts(rows, arithmetic.OVERTHINKING, slip_rate=0.0)
    answer = re.compile(r"\\boxed\{(-?\d+)\}$")
    for row, a, b in zip(rows, plain, verbose, strict=True):
        # without slips both are right; the habits never change an answer
        assert answer.search(a).group(1) == answer.search(b).group(1) == str(row["answer"])
        assert len(b) >= len(a)
    ratio = statistics.mean(map(len, verbose)) / statistics.mean(map(len, plain))
    assert 2.0 < ratio < 3.0
    # each habit shows up, and not in every trace: lengths vary for the same question
    for habit, share in (("Verify: ", 0.5), ("Let me work it out again", 0.6), ("Wait, let me re-check", 0.6)):
        seen = sum(habit in t for t in verbose) / len(verbose)
        assert share - 0.12 < seen < share + 0.12 or (habit == "Verify: " and seen > 0.5), (habit, seen)
    same_question = _texts(rows[:1], arithmetic.OVERTHINKING, k=40)
    assert len({len(t) for t in same_question}) > 5


def test_verifications_undo_the_step_as_written():
    rows = arithmetic.make_rows(300, seed=4, min_ops=2, max_ops=3)
    for text in _texts(rows, arithmetic.OVERTHINKING, slip_rate=0.5, fix_rate=0.0):
        lines = text.removeprefix("<think>").split("</think>")[0].splitlines()
        for before, line in zip(lines, lines[1:], strict=False):
            if line.startswith("Verify: "):
                a, op, b, result = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", before.split(" ")[-1]).groups() \
                    if "=" in before else (None,) * 4
                value, undo, term, back = re.fullmatch(r"Verify: (-?\d+)([+-])(\d+)=(-?\d+)\.", line).groups()
                assert value == result and term == b and undo != op
                assert int(back) == (int(value) - int(term) if undo == "-" else int(value) + int(term))


def test_plain_mode_is_byte_for_byte_the_old_teacher():
    rows = arithmetic.make_rows(200, seed=5, min_ops=1, max_ops=3)
    rng = random.Random(0)
    old_style = [arithmetic.teacher_solution(arithmetic.parse_question(r["prompt"]), rng, 0.25, 0.2) for r in rows]
    rng = random.Random(0)
    off = arithmetic.Rechecks(rate=0.0, verify=0.0, rederive=0.0)
    assert old_style == [arithmetic.teacher_solution(arithmetic.parse_question(r["prompt"]), rng, 0.25, 0.2, off)
                         for r in rows]


def test_recipe_reads_alike_for_both_commands_and_its_budgets_hold_the_longest_trace(tokenizer):
    recipe = load_recipe(Recipe, RECIPE)
    assert load_recipe(SFTRecipe, RECIPE).sft == recipe.sft
    assert recipe.sft.rechecks == arithmetic.OVERTHINKING
    assert [s.name for s in recipe.reward.rewards] == ["math", "length"]
    assert recipe.reward.rewards[1].warmup_iterations > 0
    assert len(recipe.eval.test_time_budgets) >= 4 and recipe.eval.every > 0
    # every habit at its most on a longest chain with every slip caught
    problem = arithmetic.parse_question("9+9-8+7=?")
    longest = arithmetic.teacher_solution(problem, random.Random(0), slip_rate=1.0, fix_rate=1.0,
                                          rechecks=arithmetic.Rechecks(1.0, 1.0, arithmetic.OVERTHINKING.most, 1.0, 1.0))
    assert len(tokenizer(longest)["input_ids"]) + 40 <= recipe.sft.max_seq_len  # no warmup example is dropped
    # the rollout and evaluation budgets hold the teacher's traces (the worst case above, ~520 tokens, is
    # a 1-in-10^6 draw: cut, it just earns no answer)
    texts = _texts(arithmetic.make_rows(2000, seed=6, min_ops=3, max_ops=3), arithmetic.OVERTHINKING)
    assert max(len(tokenizer(t)["input_ids"]) for t in texts) <= min(recipe.rollout.max_tokens, recipe.eval.max_tokens)


@pytest.mark.parametrize("overrides, message", [
    (["sft.recheck_rate=0.2"], "teacher_mode overthinking sets its own re-checks"),
    (["sft.teacher_mode=verbose"], "sft.teacher_mode"),
    (["eval.test_time_budgets=[64,64]"], "budgets repeat"),
    (["eval.test_time_budgets=[0,64]"], ">= 1 token"),
    (["eval.test_time_budgets=[4096]"], "rollout.max_model_len"),
    (["eval.every=-1"], "eval.every"),
])
def test_bad_keys_are_named(overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(Recipe, RECIPE, overrides)


def test_budgets_are_sorted():
    assert load_recipe(Recipe, RECIPE, ["eval.test_time_budgets=[256,32,64,128]"]).eval.test_time_budgets == [32, 64, 128, 256]


def test_shapes_and_reasoning_gym_refuse_the_overthinking_teacher(tmp_path):
    from sft.train import build_task_sft_data
    from thinkrl.tasks import shapes

    rows = shapes.make_rows(4, seed=0, image_dir=tmp_path / "img")
    with pytest.raises(ValueError, match="teacher_mode"):
        build_task_sft_data(rows, tmp_path / "out", 0, 0.1, 0.5, rechecks=arithmetic.OVERTHINKING)


def test_level_changes_mark_each_new_level_once():
    records = [{"iteration": 0, "eval/accuracy": 0.5}] + [
        {"iteration": i, "sampler/curriculum/level": float(level)} for i, level in enumerate([1, 1, 2, 2, 3, 2], 1)]
    assert level_changes(records) == [(1, "level 1"), (3, "level 2"), (5, "level 3"), (6, "level 2")]
    assert level_changes([{"iteration": 1, "train/reward_mean": 0.1}]) == []
