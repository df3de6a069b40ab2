"""Held-out evaluation of any model folder: `thinkrl eval RECIPE --model DIR [--out FILE] [key=value ...]`.

    thinkrl eval recipes/tiny-long2short.yaml --model runs/tiny-long2short/checkpoints/sft --out sft.json
    thinkrl eval recipes/tiny-long2short.yaml --model merged/ --max-tokens 256 --out merged-256.json

The numbers are the ones `rl.train` reports before and after RL, computed the same way: the recipe's held-out
prompts (`thinkrl.run.load_prompts`, rendered by `rl.setup.heldout_prompts`), its eval decoding (`eval.*`, with
`rl.train.EVAL_SEED`), its reward set's correctness verdict (`rl.train.reward_set_of`), on its vLLM engines
(`rl.setup.start_engines`), through `rl.generation.evaluate`. Models compared on one recipe (checkpoints, the
long2short methods' outputs) therefore see the same prompts, decoding and seed.

Output: one JSON object, on the last line of stdout and (indented) in `--out FILE`: `rl.generation.evaluate`'s
fields (accuracy, mean_response_tokens, n_prompts, samples_per_prompt; accuracy_by_task for multi-task data),
wall_seconds (generation and scoring), startup_seconds (the engines), model, recipe and eval_decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl.config import Recipe
    from rollout.engine import RolloutSettings

# flags that are recipe keys, as overrides: one validation path for both spellings
FLAG_KEYS = {"max_tokens": "eval.max_tokens", "samples": "eval.samples_per_prompt",
             "temperature": "eval.temperature", "engines": "rollout.num_engines"}


def eval_settings(recipe: Recipe) -> RolloutSettings:
    """The recipe's held-out decoding: `eval.*`, `rl.train.EVAL_SEED`, `rollout.repeat`'s stopping."""
    from rl.train import EVAL_SEED
    from rollout.engine import RolloutSettings
    from rollout.repeat import repeat_settings_of

    ev = recipe.eval
    return RolloutSettings(n=ev.samples_per_prompt, temperature=ev.temperature, top_p=ev.top_p,
                           max_tokens=ev.max_tokens, seed=EVAL_SEED, repeat=repeat_settings_of(recipe.rollout.repeat))


def evaluate_model(recipe: Recipe, model: Path, log=print) -> dict:
    """Held-out accuracy and length of the model folder `model` under `recipe` (see the module docstring).

    Ray must be initialised; the engines are started here and released before it returns.
    """
    import tempfile

    from rl.generation import evaluate
    from rl.long2short import check_context
    from rl.setup import heldout_prompts, start_engines
    from rl.train import EVAL_SEED, reward_set_of
    from thinkrl.cluster import release
    from thinkrl.models import load_tokenizer
    from thinkrl.run import Run, load_prompts
    from thinkrl.vl.inputs import ImageStore

    with tempfile.TemporaryDirectory(prefix="thinkrl-eval-") as data_dir:  # the generated tasks write their rows
        _, heldout_rows = load_prompts(recipe.data, recipe.run.seed, Path(data_dir))
        run = Run(Path(data_dir), model, load_tokenizer(model), [], heldout_rows)
        check_context(recipe, heldout_rows, run.tokenizer, recipe.eval.max_tokens, "eval.max_tokens")
        prompts = heldout_prompts(recipe, run)
        images = ImageStore()
        t0 = time.time()
        engines = start_engines(recipe, model)
        startup = time.time() - t0
        log(f"[eval] {len(engines)} vLLM engine(s) on {model} ready in {startup:.0f}s; {len(prompts)} held-out prompts "
            f"x {recipe.eval.samples_per_prompt} samples, max_tokens {recipe.eval.max_tokens}")
        try:
            with reward_set_of(recipe, log) as reward_set:
                t0 = time.time()
                result = evaluate(engines, reward_set, prompts, heldout_rows, eval_settings(recipe),
                                  iteration=recipe.rl.iterations,
                                  images=[images.get(r.get("images") or []) for r in heldout_rows])
                result["wall_seconds"] = time.time() - t0
        finally:
            release(engines)
    ev = recipe.eval
    return {**result, "startup_seconds": startup, "model": str(model),
            "eval_decoding": {"samples_per_prompt": ev.samples_per_prompt, "temperature": ev.temperature,
                              "top_p": ev.top_p, "max_tokens": ev.max_tokens, "seed": EVAL_SEED}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML: its data (held-out prompts), eval decoding, reward and engines")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.samples_per_prompt=8")
    parser.add_argument("--model", required=True, help="Hugging Face model folder to evaluate")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--max-tokens", type=int, help="eval.max_tokens: the response budget")
    parser.add_argument("--samples", type=int, help="eval.samples_per_prompt")
    parser.add_argument("--temperature", type=float, help="eval.temperature")
    parser.add_argument("--engines", type=int, help="rollout.num_engines: data-parallel vLLM engines")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides

    from rl.long2short import load_model_recipe
    from thinkrl.cluster import ClusterTooSmall, init_ray
    from thinkrl.config import RecipeError
    from thinkrl.fileio import DataError, atomic_write_json

    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items()}
    try:
        recipe, model = load_model_recipe(args.recipe, args.overrides, flags, args.model)
    except (RecipeError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray()
    import ray

    try:
        result = evaluate_model(recipe, model, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ClusterTooSmall, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()  # before the result: actors' late log lines must not follow it
    result["recipe"] = str(args.recipe)
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
