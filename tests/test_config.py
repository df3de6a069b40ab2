from pathlib import Path

import pytest

from rl.config import Recipe
from thinkrl.config import RecipeError, load_recipe, parse_overrides

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
TINY = Path(__file__).parent.parent / "recipes" / "tiny.yaml"


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
        load_recipe(Recipe, TINY, ["data.task=files"])


def test_rollout_logprobs_refused_where_engine_and_trainer_differ():
    from rl.sync import check_old_logprobs

    check_old_logprobs("rollout", 5e-7, 1e-3)  # float32 tiny dense: accepted
    with pytest.raises(ValueError, match=r"rl.old_logprobs=rollout .* 2.0e-02"):
        check_old_logprobs("rollout", 2e-2, 1e-3)
    check_old_logprobs("trainer", 2e-2, 1e-3)  # the trainer's own log-probs: always fine


def test_sft_recipe_reads_its_sections_of_a_whole_recipe():
    """`python -m sft.train recipe.yaml`: the same file as the RL run; only run, model, data, sft and the
    trainer group of `rl` are read, typos in those still fail, the RL-only sections are not its business."""
    from sft.config import SFTRecipe

    recipe = load_recipe(SFTRecipe, RECIPES[0], ["rl.num_trainers=2", "rl.zero_stage=2", "rl.tau=0.3"])
    assert recipe.rl.num_trainers == 2 and recipe.rl.zero_stage == 2
    assert recipe.sft.steps == load_recipe(Recipe, RECIPES[0]).sft.steps
    with pytest.raises(RecipeError, match="sft.stepz: unknown key"):
        load_recipe(SFTRecipe, RECIPES[0], ["sft.stepz=3"])
    with pytest.raises(RecipeError, match="foo: unknown key"):
        load_recipe(SFTRecipe, RECIPES[0], ["foo.bar=1"])


def test_packages_import_in_one_direction():
    """DESIGN.md's layout: rewards and samplers import nothing of ours; sft and rollout never import rl;
    thinkrl (what SFT and RL share) imports neither sft, rollout nor rl."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    forbidden = {"rewards": {"rl", "sft", "rollout", "samplers", "thinkrl"},
                 "samplers": {"rl", "sft", "rollout", "rewards", "thinkrl"},
                 "sft": {"rl"}, "rollout": {"rl", "sft"}, "thinkrl": {"rl", "sft", "rollout"}}
    found = []
    for package, banned in forbidden.items():
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                found += [f"{path.relative_to(root)} imports {n}" for n in names if n.split(".")[0] in banned]
    assert found == []


def test_tiny_vl_recipe_loads_and_prepares_its_visual_task(tmp_path):
    """recipes/tiny-vl.yaml (the visual demo) with tiny overrides: the shapes task on the tiny Kimi-VL."""
    from thinkrl.run import load_prompts

    recipe = load_recipe(Recipe, Path(__file__).parent.parent / "recipes" / "tiny-vl.yaml",
                         ["data.n_train=8", "data.n_heldout=4", "rl.iterations=1", f"run.output_dir={tmp_path}"])
    assert recipe.model.name_or_path == "tiny-vl" and recipe.data.task == "shapes"
    assert recipe.sampler.kind == "prioritized" and recipe.rl.old_logprobs == "rollout"
    train, heldout = load_prompts(recipe.data, recipe.run.seed, tmp_path / "data")
    assert len(train) == 8 and len(heldout) == 4 and all(len(r["images"]) == 1 for r in train + heldout)
