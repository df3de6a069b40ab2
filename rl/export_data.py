"""Write a recipe's prompts as JSONL, exactly as a run would use them: `python -m rl.export_data RECIPE --out DIR`.

    thinkrl export-data recipes/tiny-reasoning-gym.yaml --out rg/ data.n_train=500

writes `DIR/train.jsonl` and `DIR/heldout.jsonl` (one row per line: `prompt`, `answer`, and the task's
fields: a reasoning-gym row's `task`, `difficulty` and `rg_metadata`), for inspection or for other tools:
they load back as `data.task=files` (and the `reasoning_gym` reward scores them), as the dataset builder's
input (`python -m sft.build_cot --input DIR/train.jsonl --question-field prompt --reward reasoning_gym`),
or as `rl.label` input. No model, Ray or engine starts; the rows are deterministic in `run.seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML (its data section and run.seed are used)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.n_train=500")
    parser.add_argument("--out", required=True, help="output folder (train.jsonl, heldout.jsonl)")
    args = parser.parse_intermixed_args(argv)  # --out may come before or after the overrides

    from rl.config import Recipe
    from thinkrl.config import RecipeError, load_recipe
    from thinkrl.fileio import DataError, write_jsonl
    from thinkrl.run import load_prompts

    out = Path(args.out).expanduser()
    try:
        recipe = load_recipe(Recipe, args.recipe, args.overrides)
        train, heldout = load_prompts(recipe.data, recipe.run.seed, out)  # images: out/images
    except (RecipeError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, rows in (("train", train), ("heldout", heldout)):
        if recipe.data.task == "files":  # the generated tasks' rows were written by load_prompts, as a run has them
            # text rows carry `images: []` only as the loader's uniform shape: a row without images leaves it out
            write_jsonl(out / f"{name}.jsonl", [{k: v for k, v in r.items() if k != "images" or v} for r in rows])
        print(f"{out / f'{name}.jsonl'}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
