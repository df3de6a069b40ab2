"""reasoning-gym as a data source (issue 20): rows, the `reasoning_gym` reward against the tasks' own scorers,
the teachers, the recipe, the export command and the dataset builder on its rows.

Unit tests: no Ray, vLLM or DeepSpeed (the builder's reward workers are plain processes). The RL run on these
rows is in `test_reasoning_gym_run` below (integration).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.reasoning_gym import ReasoningGymReward, entry_of, extract_answer, import_reasoning_gym
from rewards.types import RewardInput
from rl.config import Recipe
from thinkrl.config import RecipeError, load_recipe
from thinkrl.run import DataConfig, load_prompts
from thinkrl.tasks import reasoning_gym as rgt

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-reasoning-gym.yaml"
MIX = [rgt.DatasetSpec("chain_sum", 2.0, {"min_digits": 1, "max_digits": 1}, (1, 2, 3)),
       rgt.DatasetSpec("letter_counting", 1.0, {}, (0, 1, 2))]
# tasks beyond the mix, with scorers of other kinds (partial credit, lists, words)
OTHERS = [rgt.DatasetSpec(name) for name in ("spell_backward", "gcd", "count_bits", "lcm", "number_sequence",
                                             "leg_counting")]


def _data(**overrides) -> DataConfig:
    datasets = [{"name": s.name, "weight": s.weight, "config": s.config, "levels": list(s.levels)} for s in MIX]
    return DataConfig(task="reasoning_gym", reasoning_gym={"datasets": datasets}, **overrides)


# ---- rows ------------------------------------------------------------------------------------------------


def test_rows_are_deterministic_in_the_seed_and_distinct():
    first = rgt.make_rows(MIX, 300, seed=5, split="train")
    assert first == rgt.make_rows(MIX, 300, seed=5, split="train")
    assert first != rgt.make_rows(MIX, 300, seed=6, split="train")
    assert len({r["prompt"] for r in first}) == 300 and len({r["id"] for r in first}) == 300
    # shares by weight (2:1), spread over the levels, the level as the row's difficulty
    by_task = {t: [r for r in first if r["task"] == t] for t in ("chain_sum", "letter_counting")}
    assert (len(by_task["chain_sum"]), len(by_task["letter_counting"])) == (200, 100)
    assert sorted({r["difficulty"] for r in by_task["chain_sum"]}) == [1, 2, 3]
    assert sorted({r["difficulty"] for r in by_task["letter_counting"]}) == [0, 1, 2]
    # the level's config is really used: spans grow with the level
    words = {lvl: max(len(r["rg_metadata"]["span"]) for r in by_task["letter_counting"] if r["difficulty"] == lvl)
             for lvl in (0, 2)}
    assert words[0] <= 7 < words[2] <= 11


def test_train_and_heldout_are_disjoint_and_written_as_used(tmp_path):
    """Nearby seeds share reasoning-gym items; the held-out questions never reach train (nor the warmup's)."""
    train, heldout = load_prompts(_data(n_train=1000, n_heldout=300), seed=0, data_dir=tmp_path)
    assert len(train) == 1000 and len(heldout) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert load_prompts(_data(n_train=1000, n_heldout=300), seed=0, data_dir=tmp_path / "again") == (train, heldout)
    on_disk = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert [{"images": [], **r} for r in on_disk] == heldout
    sft = rgt.make_rows(MIX, 2000, seed=0, split="sft", exclude={r["prompt"] for r in heldout})
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in heldout}


def test_a_level_short_of_questions_hands_the_rest_on_and_the_last_one_fails_by_name():
    tiny = rgt.DatasetSpec("chain_sum", 1.0, {"min_digits": 1, "max_digits": 1}, (0, 3))  # level 0: 200 questions
    rows = rgt.make_rows([tiny], 800, seed=0, split="train")
    levels = [r["difficulty"] for r in rows]
    assert len(rows) == 800 and levels.count(0) < 400 < levels.count(3)
    with pytest.raises(ValueError, match="chain_sum.*distinct questions"):
        rgt.make_rows([rgt.DatasetSpec("chain_sum", 1.0, {"min_digits": 1, "max_digits": 1}, (0,))], 500, 0, "x")


def test_unknown_task_level_or_config_fails_when_the_recipe_loads_naming_it():
    def error(*overrides):
        with pytest.raises(RecipeError) as e:
            load_recipe(Recipe, RECIPE, list(overrides))
        return str(e.value)

    message = error("data.reasoning_gym.datasets=[{name: letter_countin}]")
    assert "data.reasoning_gym.datasets.0" in message and "did you mean letter_counting" in message
    assert "outside its curriculum's levels 0..7" in error("data.reasoning_gym.datasets=[{name: letter_counting, "
                                                           "levels: [9]}]")
    assert "'bogus'" in error("data.reasoning_gym.datasets=[{name: chain_sum, config: {bogus: 1}}]")
    assert "has no curriculum" in error("data.reasoning_gym.datasets=[{name: list_functions, levels: [0]}]")
    assert "needs data.reasoning_gym.datasets" in error("data.reasoning_gym.datasets=[]")
    assert "weight" in error("data.reasoning_gym.datasets=[{name: chain_sum, weight: 0}]")


def test_a_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # what a failed import looks like
    with pytest.raises(ImportError, match=r"thinkrl\[tasks\]"):
        import_reasoning_gym()
    with pytest.raises(RecipeError, match=r"pip install 'thinkrl\[tasks\]'"):
        load_recipe(Recipe, RECIPE)


# ---- the reward -------------------------------------------------------------------------------------------


def _responses(row: dict, rng: random.Random) -> list[str]:
    """Right, wrong and near-miss answers in the three places the reward reads them from, and hostile ones."""
    answer = row["answer"]
    near = [answer + answer[-1:], answer[:-1] or "0", "1" + answer, f"{answer} or so", answer.upper()]
    shapes = [lambda a: f"<think>hm</think>\\boxed{{{a}}}", lambda a: f"<think>hm</think><answer>{a}</answer>",
              lambda a: f"<think>hm</think>so the answer is\n{a}\n"]
    out = [shape(answer) for shape in shapes] + [rng.choice(shapes)(a) for a in near]
    out += [f"<think>{answer}", "", f"\\boxed{{{answer}", "<think></think>\\boxed{" + "{" * 300 + "}" * 300 + "}",
            f"<think>x</think>\\boxed{{{answer}}}" + "\x00" * 50, f"<think>x</think>\\boxed{{{answer * 5000}}}"]
    return out


def test_the_reward_agrees_with_each_tasks_own_scorer_and_only_a_full_score_is_correct():
    rg = import_reasoning_gym()
    rows = rgt.make_rows(MIX + OTHERS, 80, seed=3, split="check")
    reward, rng = ReasoningGymReward(), random.Random(0)
    partial = 0
    for row in rows:
        metadata = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        scorer = rg.get_score_answer_fn(row["task"])
        entry = {"question": row["prompt"], "answer": row["answer"], "metadata": row["rg_metadata"]}
        for response in _responses(row, rng):
            result = reward(RewardInput(row["prompt"], response, row["answer"], 10, metadata))
            extracted = extract_answer(response)
            raw = 0.0 if extracted is None else float(scorer(extracted, entry))
            assert result.scores["score"] == raw, (row["task"], response[:80])
            assert result.correct is (raw >= 1.0) and result.score == float(raw >= 1.0)
            partial += 0 < raw < 1
    assert partial > 0  # the scorers' partial credit happened, and never counted as correct


def test_answer_extraction_order_and_rows_that_are_not_reasoning_gym_rows():
    assert extract_answer("<think>\\boxed{1}</think><answer>2</answer> \\boxed{3}") == "3"
    assert extract_answer("<think>x</think><answer>2</answer>\nthe end") == "2"
    assert extract_answer("<think>x</think>\n\n  ") is None and extract_answer("no think at all\n 5 ") == "5"
    sample = RewardInput("q", "<think>x</think>\\boxed{1}", "1", 3, {"task": "gcd"})
    with pytest.raises(ValueError, match="rg_metadata"):
        entry_of(sample)
    with pytest.raises(ValueError, match="no 'task' field"):
        ReasoningGymReward()(RewardInput("q", "\\boxed{1}", "1", 3, {}))


# ---- the teachers -----------------------------------------------------------------------------------------


def test_teachers_without_slips_are_right_by_the_tasks_scorers_and_slips_cost_what_they_should():
    rg = import_reasoning_gym()
    specs = [*MIX, rgt.DatasetSpec("spell_backward", 1.0, {}, (0, 1))]
    rows = rgt.make_rows(specs, 600, seed=1, split="teach")

    def accuracy(slip_rate, fix_rate):
        rng, right = random.Random(0), 0
        for row in rows:
            entry = {"question": row["prompt"], "answer": row["answer"], "metadata": row["rg_metadata"]}
            text = rgt.solution(row["prompt"], rng, slip_rate, fix_rate)
            right += rg.get_score_answer_fn(row["task"])(extract_answer(text), entry) == 1.0
        return right / len(rows)

    assert accuracy(0.0, 0.0) == 1.0
    assert accuracy(0.3, 1.0) == 1.0  # every slip caught by a "Wait, ..." line
    assert 0.2 < accuracy(0.3, 0.0) < 0.8
    with pytest.raises(ValueError, match="no programmatic teacher.*--teacher vllm"):
        rgt.solution("What is the gcd of 4 and 6?", random.Random(0))


def test_the_recipe_loads_and_its_mix_has_the_teachers_and_the_reward():
    recipe = load_recipe(Recipe, RECIPE)
    assert recipe.data.task == "reasoning_gym" and recipe.data.n_heldout >= 200
    assert {d.name for d in recipe.data.reasoning_gym.datasets} <= set(rgt.TEACHER_TASKS)
    assert [r.name for r in recipe.reward.rewards] == ["reasoning_gym"]
    assert recipe.sampler.kind.startswith("curriculum")


# ---- the export command and the dataset builder on its rows ------------------------------------------------


def test_export_then_build_verified_warmup_data_with_the_reward(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "thinkrl.cli", "export-data", str(RECIPE), "--out", str(tmp_path / "rg"),
                          "data.n_train=60", "data.n_heldout=20"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    train, heldout = load_prompts(load_recipe(Recipe, RECIPE, ["data.n_train=60", "data.n_heldout=20"]).data, 0,
                                  tmp_path / "direct")
    exported = [json.loads(line) for line in (tmp_path / "rg" / "train.jsonl").read_text().splitlines()]
    assert [{"images": [], **r} for r in exported] == train
    bad = subprocess.run([sys.executable, "-m", "thinkrl.cli", "export-data", str(RECIPE), "--out", str(tmp_path / "x"),
                          "data.reasoning_gym.datasets=[{name: chain_summ}]"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode == 2 and "did you mean chain_sum" in bad.stderr and not (tmp_path / "x").exists()

    build = subprocess.run([sys.executable, "-m", "sft.build_cot", "--input", str(tmp_path / "rg" / "train.jsonl"),
                            "--question-field", "prompt", "--output", str(tmp_path / "cot"), "--teacher", "reasoning_gym",
                            "--reward", "reasoning_gym", "-k", "4", "--keep", "all", "--slip-rate", "0.3",
                            "--fix-rate", "0", "--reward-workers", "1", "--no-progress"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert build.returncode == 0, build.stderr[-3000:]
    kept = [json.loads(line) for line in (tmp_path / "cot" / "data.jsonl").read_text().splitlines()]
    assert 0 < len(kept) < 4 * 60  # slips were caught by the verifier
    rows = {r["id"]: r for r in exported}
    reward = ReasoningGymReward()
    for k in kept:  # every kept trace is right by its task's scorer
        row = rows[k["id"]]
        sample = RewardInput(row["prompt"], k["messages"][1]["content"], row["answer"], 1,
                             {"task": row["task"], "rg_metadata": row["rg_metadata"]})
        assert reward(sample).correct


# ---- an RL run on reasoning-gym rows (real Ray, vLLM, DeepSpeed) -------------------------------------------


@pytest.mark.integration
def test_reasoning_gym_run_reports_accuracy_per_task(tmp_path):
    """The recipe, shrunk: the warmup on the teachers' traces, one RL iteration scored by the tasks' own
    scorers in the reward workers, and held-out accuracy per task in the report and the metrics."""
    small = ["sft.steps=15", "sft.n_examples=300", "data.n_train=64", "data.n_heldout=12", "rl.iterations=1",
             "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.mini_batches=2",
             "eval.samples_per_prompt=2", "rollout.max_tokens=96", "eval.max_tokens=96"]
    env = {**os.environ, "THINKRL_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "RAY_ADDRESS": "local"}
    out = subprocess.run([sys.executable, "-m", "rl.train", str(RECIPE), f"run.output_dir={tmp_path / 'run'}", *small],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    tasks = {d.name for d in load_recipe(Recipe, RECIPE).data.reasoning_gym.datasets}
    assert len(tasks) == 2 and report["n_heldout_by_task"] == dict.fromkeys(tasks, 6)
    for when in ("before_rl", "after_rl"):
        by_task = report[f"accuracy_by_task_{when}"]
        assert set(by_task) == tasks and all(0 <= a <= 1 for a in by_task.values())
        assert abs(sum(by_task.values()) / 2 - report[f"accuracy_{when}"]) < 1e-9  # equal shares of the 12
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/accuracy/letter_counting" in r for r in records) == 2
    assert any("reward/reasoning_gym/score" in r for r in records)
    rows = [json.loads(line) for line in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == tasks
