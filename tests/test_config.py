from pathlib import Path

import pytest

from rl.config import Recipe
from thinkrl.config import RecipeError, load_recipe, parse_overrides

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(Recipe, path)
    assert recipe.rl.samples_per_prompt >= 2


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["rl.tau=0.5", "sft.enabled=false", "run.output_dir=/x/y"]) == {
        "rl": {"tau": 0.5}, "sft": {"enabled": False}, "run": {"output_dir": "/x/y"}
    }
    recipe = load_recipe(Recipe, RECIPES[0], ["rl.iterations=3", "rl.tau=0.5", "rl.lr=1e-5"])
    assert recipe.rl.iterations == 3 and recipe.rl.tau == 0.5 and recipe.rl.lr == 1e-5


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  iteratons: 3\n")
    with pytest.raises(RecipeError, match=r"bad.yaml.*\n.*rl\.iteratons: unknown key"):
        load_recipe(Recipe, bad)


def test_unknown_override_and_bad_value_are_named():
    with pytest.raises(RecipeError, match=r"rl\.nope: unknown key"):
        load_recipe(Recipe, RECIPES[0], ["rl.nope=1"])
    with pytest.raises(RecipeError, match=r"rl\.tau: .*greater than 0"):
        load_recipe(Recipe, RECIPES[0], ["rl.tau=-1"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(Recipe, RECIPES[0], ["rl.tau"])


def test_files_task_needs_files(tmp_path):
    with pytest.raises(RecipeError, match="train_file"):
        load_recipe(Recipe, RECIPES[0], ["data.task=files"])


def test_rollout_logprobs_refused_where_engine_and_trainer_differ():
    from rl.sync import check_old_logprobs

    check_old_logprobs("rollout", 5e-7, 1e-3)  # float32 tiny dense: accepted
    with pytest.raises(ValueError, match=r"rl.old_logprobs=rollout .* 2.0e-02"):
        check_old_logprobs("rollout", 2e-2, 1e-3)
    check_old_logprobs("trainer", 2e-2, 1e-3)  # the trainer's own log-probs: always fine
