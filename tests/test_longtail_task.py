"""The arithmetic task's long problems (`LongProblems`), the teacher's re-check loops (`Rechecks`) and
`recipes/tiny-longtail.yaml`, the recipe whose policy has a long tail of response lengths (issue 17, partial
rollouts)."""

import hashlib
import json
import random
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


def _teacher_texts(rows: list[dict], rechecks: arithmetic.Rechecks, slip_rate: float = 0.25,
                   fix_rate: float = 0.2) -> list[str]:
    """The warmup's traces as `sft.train` writes them (the dataset builder's arithmetic teacher)."""
    prompts = [[{"role": "user", "content": r["prompt"], "raw_question": r["prompt"]}] for r in rows]
    return [k[0] for k in ArithmeticTeacher(slip_rate, fix_rate, rechecks).sample(prompts, k=1, seed=0)]


def _recipe_traces(recipe, n: int, seed: int) -> tuple[list[dict], list[str]]:
    """n problems drawn as the recipe draws them, and its warm-up teacher's traces of them."""
    rows = arithmetic.make_rows(n, seed=seed, min_ops=recipe.data.min_ops, max_ops=recipe.data.max_ops,
                                long=recipe.data.long_problems())
    return rows, _teacher_texts(rows, _rechecks(recipe), recipe.sft.slip_rate, recipe.sft.fix_rate)


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


def test_long_problems_off_draw_the_rows_as_before():
    """Without long problems (none, or a share of 0) the rows are the same, byte for byte, as before the
    option existed; with a share, that share of the problems has long_min_ops..long_max_ops operations."""
    before = arithmetic.make_rows(400, seed=3, min_ops=1, max_ops=3)
    assert arithmetic.make_rows(400, seed=3, min_ops=1, max_ops=3, long=arithmetic.LongProblems(0.0, 5, 9)) == before
    # short problems of 1-2 operations repeat often (a few hundred of them): a repeat is redrawn of its kind
    rows = arithmetic.make_rows(1000, seed=3, min_ops=1, max_ops=2, long=arithmetic.LongProblems(0.25, 5, 9))
    long = [r for r in rows if r["difficulty"] > 2]
    assert 0.22 < len(long) / len(rows) < 0.28
    assert {r["difficulty"] for r in long} == set(range(5, 10))
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert all(str(arithmetic.parse_question(r["prompt"]).answer) == r["answer"] for r in rows)
    with pytest.raises(ValueError, match="share in"):
        arithmetic.LongProblems(0.5, 9, 5)


def test_recipe_teacher_lengths_are_heavy_tailed_and_answers_unchanged(tokenizer):
    """3000 problems as the recipe draws them and its teacher's traces: p99 / median of the response tokens
    >= 4, deterministic from the seed, the long responses being the long problems'; the teacher is right
    often enough on short chains and seldom on long ones (room for RL on both)."""
    recipe = load_recipe(Recipe, RECIPE)
    rows, texts = _recipe_traces(recipe, 3000, seed=2)
    assert texts == _recipe_traces(recipe, 3000, seed=2)[1]
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + the end-of-turn token
    ordered = sorted(lengths)
    median, p99 = statistics.median(ordered), ordered[int(0.99 * len(ordered))]
    assert p99 / median >= 4, (median, p99)
    assert median <= 80  # the bulk stays as short as tiny.yaml's (61 tokens)
    long = [r["difficulty"] >= recipe.data.long_min_ops for r in rows]
    assert 0.09 < statistics.mean(long) < 0.15  # long_share 0.12
    tail = ordered[int(0.9 * len(ordered))]
    assert all(is_long for is_long, n in zip(long, lengths, strict=True) if n > tail)
    right = [math_reward(t, r["answer"]).score for t, r in zip(texts, rows, strict=True)]
    short_accuracy = statistics.mean(s for s, is_long in zip(right, long, strict=True) if not is_long)
    long_accuracy = statistics.mean(s for s, is_long in zip(right, long, strict=True) if is_long)
    assert 0.6 < short_accuracy < 0.9 and 0.01 < long_accuracy < 0.3, (short_accuracy, long_accuracy)


def test_rechecks_count_is_geometric_and_capped():
    rng = random.Random(0)
    counts = [arithmetic.Rechecks(rate=0.5, repeat=0.5, most=3).draw(rng) for _ in range(20000)]
    shares = [counts.count(k) / len(counts) for k in range(4)]
    assert shares == pytest.approx([0.5, 0.25, 0.125, 0.125], abs=0.015)
    with pytest.raises(ValueError, match="rate and repeat in"):
        arithmetic.Rechecks(rate=1.5)


def test_recipe_validates_and_its_budgets_hold_the_longest_trace(tokenizer):
    """Both commands read the recipe; the longest of its warm-up's traces (sft.n_examples problems drawn as the
    warm-up draws them), with a margin of a quarter, fits the SFT context, the rollout and evaluation budgets,
    and vLLM's context with its prompt."""
    recipe = load_recipe(Recipe, RECIPE)
    assert load_recipe(SFTRecipe, RECIPE).sft == recipe.sft
    assert recipe.data.long_share > 0 and recipe.data.task == "arithmetic" and recipe.sampler.kind == "uniform"
    rows, texts = _recipe_traces(recipe, recipe.sft.n_examples, seed=recipe.run.seed + 2)
    response = max(len(tokenizer(t)["input_ids"]) + 1 for t in texts) * 5 // 4
    question = max((r["prompt"] for r in rows), key=len)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert prompt > len(question)  # the chat template's tokens around it
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


def test_recipe_refuses_long_problems_out_of_order():
    with pytest.raises(RecipeError, match=r"data\.long_min_ops must be <= data\.long_max_ops"):
        load_recipe(Recipe, RECIPE, ["data.long_min_ops=30", "data.long_max_ops=20"])
    with pytest.raises(RecipeError, match=r"long_share"):
        load_recipe(Recipe, RECIPE, ["data.long_share=1.5"])
