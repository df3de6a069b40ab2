"""The arithmetic teacher's re-check loops (`Rechecks`) and `recipes/tiny-longtail.yaml`, the recipe whose
warmed-up policy has a long tail of response lengths (issue 17, partial rollouts)."""

import hashlib
import json
import random
import re
import statistics
from pathlib import Path

import pytest

from rewards.math import math_reward
from rl.config import Recipe
from sft.build_cot import ArithmeticTeacher
from sft.config import SFTRecipe
from thinkrl.config import RecipeError, load_recipe
from thinkrl.tasks import arithmetic

RECIPE = Path(__file__).parent.parent / "recipes" / "tiny-longtail.yaml"


def _rechecks(recipe) -> arithmetic.Rechecks:
    return arithmetic.Rechecks(recipe.sft.recheck_rate, recipe.sft.recheck_repeat, recipe.sft.max_rechecks)


def _teacher_texts(rows: list[dict], rechecks: arithmetic.Rechecks) -> list[str]:
    """The warmup's traces as `sft.train` writes them (the dataset builder's arithmetic teacher)."""
    prompts = [[{"role": "user", "content": r["prompt"], "raw_question": r["prompt"]}] for r in rows]
    return [k[0] for k in ArithmeticTeacher(0.25, 0.2, rechecks).sample(prompts, k=1, seed=0)]


def test_rechecks_off_leave_the_teacher_byte_for_byte_as_before():
    """The digest of the teacher's traces (tiny.yaml's slip and fix rates) from before the option existed:
    off (rate 0, whatever the other knobs) draws nothing more from the generator."""
    rows = arithmetic.make_rows(500, seed=2, min_ops=1, max_ops=3)
    before = "3f9d7726a4508e25a2367db1d220d821c72e1fc1678f9ab668c84d637fbc5a5f"
    for rechecks in (arithmetic.NO_RECHECKS, arithmetic.Rechecks(rate=0.0, repeat=0.9, most=50)):
        conversations = arithmetic.sft_conversations(rows, seed=0, slip_rate=0.25, fix_rate=0.2, rechecks=rechecks)
        per_prompt = [arithmetic.teacher_solution(arithmetic.parse_question(r["prompt"]), random.Random(f"0-{p}"),
                                                  0.25, 0.2, rechecks) for p, r in enumerate(rows)]
        assert hashlib.sha256(json.dumps([conversations, per_prompt]).encode()).hexdigest() == before
    assert _teacher_texts(rows, arithmetic.NO_RECHECKS) == per_prompt


def test_recipe_teacher_lengths_are_heavy_tailed_and_answers_unchanged(tokenizer):
    """3000 traces of the recipe's teacher: p99 / median of the response tokens >= 4, deterministic from
    the seed; a re-check repeats the chain the teacher believes, so the boxed answer is its last value."""
    recipe = load_recipe(Recipe, RECIPE)
    rows = arithmetic.make_rows(3000, seed=2, min_ops=recipe.data.min_ops, max_ops=recipe.data.max_ops)
    texts = _teacher_texts(rows, _rechecks(recipe))
    assert texts == _teacher_texts(rows, _rechecks(recipe))
    lengths = sorted(len(tokenizer(t)["input_ids"]) + 1 for t in texts)  # + the end-of-turn token
    median, p99 = statistics.median(lengths), lengths[int(0.99 * len(lengths))]
    assert p99 / median >= 4, (median, p99)
    assert median <= 80  # the bulk stays as short as tiny.yaml's (61 tokens)
    looped = [t for t in texts if "Wait, let me re-check:" in t]
    assert 0.15 < len(looped) / len(texts) < 0.25  # recheck_rate 0.2
    for text in looped:
        rechecks = re.findall(r"Wait, let me re-check: .*=(-?\d+)\.", text)
        assert len(set(rechecks)) == 1 and text.endswith(f"\\boxed{{{rechecks[0]}}}")
        assert text.count("Wait, let me re-check:") <= recipe.sft.max_rechecks
    accuracy = statistics.mean(math_reward(t, r["answer"]).score for t, r in zip(texts, rows, strict=True))
    assert 0.5 < accuracy < 0.9  # as imperfect as tiny.yaml's teacher: room for RL


def test_rechecks_count_is_geometric_and_capped():
    rng = random.Random(0)
    counts = [arithmetic.Rechecks(rate=0.5, repeat=0.5, most=3).draw(rng) for _ in range(20000)]
    shares = [counts.count(k) / len(counts) for k in range(4)]
    assert shares == pytest.approx([0.5, 0.25, 0.125, 0.125], abs=0.015)
    with pytest.raises(ValueError, match="rate and repeat in"):
        arithmetic.Rechecks(rate=1.5)


def test_recipe_validates_and_its_budgets_hold_the_longest_trace(tokenizer):
    """Both commands read the recipe; the teacher's longest trace (every re-check on a longest chain)
    fits the SFT context, the rollout and evaluation budgets, and vLLM's context with its prompt."""
    recipe = load_recipe(Recipe, RECIPE)
    assert load_recipe(SFTRecipe, RECIPE).sft == recipe.sft
    assert recipe.sft.recheck_rate > 0 and recipe.data.task == "arithmetic"
    question = "9" + "+9-9" * (recipe.data.max_ops // 2) + "+9" * (recipe.data.max_ops % 2) + "=?"
    longest = arithmetic.teacher_solution(arithmetic.parse_question(question), random.Random(0), slip_rate=1.0,
                                          fix_rate=1.0, rechecks=arithmetic.Rechecks(1.0, 1.0, recipe.sft.max_rechecks))
    response = len(tokenizer(longest)["input_ids"]) + 1
    prompt = len(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))
    assert response <= min(recipe.rollout.max_tokens, recipe.eval.max_tokens)
    assert prompt + response <= recipe.sft.max_seq_len
    assert prompt + recipe.rollout.max_tokens <= recipe.rollout.max_model_len


def test_shapes_task_refuses_rechecks(tmp_path):
    from sft.train import build_task_sft_data

    rows = [{"id": "s0", "prompt": "<image>How many red squares?", "answer": "1", "images": ["a.png"]}]
    with pytest.raises(ValueError, match="sft.recheck_rate"):
        build_task_sft_data(rows, tmp_path, 0, 0.1, 0.5, rechecks=arithmetic.Rechecks(rate=0.2))
    with pytest.raises(RecipeError, match=r"sft\.recheck_rate"):
        load_recipe(Recipe, RECIPE, ["sft.recheck_rate=1.5"])
