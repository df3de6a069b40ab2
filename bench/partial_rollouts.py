"""Benchmark 9: partial rollouts vs synchronous roll-outs on the long-tail recipe.

    .venv/bin/python bench/partial_rollouts.py --segment-tokens 96 --samples 2048 --heldout 200

Two loops start from the same SFT checkpoint of `recipes/tiny-longtail.yaml` (its warm-up, cached under
bench/results/work): one with `rollout.partial.segment_tokens` set, one without. They are stepped
alternately, one iteration each (the order flips every round), in one process, until each has trained
on `--samples` samples; then both are evaluated on the same held-out problems with the same decoding.

Throughput = response tokens of the samples in the update per wall-second of the loop's iterations
(`train/response_tokens_in_update`, all of each sample's tokens: under `mask` the earlier segments'
are context, counted here as the samples' tokens and reported apart as `tokens_trained`). The ratio is
taken over windows of `--window` rounds (each window: the tokens and wall time of both loops over the
same rounds) and reported as min / median / max, and over the whole run. The first round of each loop
is not counted (first-call costs). The partial loop's next iterations are counted although its buffer
is still filling (fewer groups finish than start), and the work left in its buffer at the end is not
credited: both err against partial rollouts.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from common import WORK_DIR, command_line, setup_env, spread, tiny_run, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny-longtail.yaml", help="a recipe of recipes/ (default tiny-longtail.yaml)")
    p.add_argument("--segment-tokens", type=int, default=96, help="rollout.partial.segment_tokens of the partial loop")
    p.add_argument("--max-segments", type=int, default=None, help="rollout.partial.max_segments (default: enough "
                   "segments for rollout.max_tokens)")
    p.add_argument("--loss", default="mask", choices=["mask", "last_segment", "importance"])
    p.add_argument("--samples", type=int, default=2048, help="samples each loop trains on before the evaluation")
    p.add_argument("--heldout", type=int, default=200, help="held-out problems in the final evaluation")
    p.add_argument("--window", type=int, default=4, help="rounds per throughput ratio")
    p.add_argument("--sft-steps", type=int, default=None, help="warm-up steps (default: the recipe's)")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides for both loops (key=value)")
    return p.parse_args(argv)


class Contender:
    """One loop (bench/contenders.ThinkrlLoop) and what it did per iteration."""

    def __init__(self, name: str, recipe, run, sft_dir, heldout: int) -> None:
        from contenders import ThinkrlLoop

        self.name, self.records = name, []
        self.loop = ThinkrlLoop(recipe, run, sft_dir, heldout)

    @property
    def samples(self) -> int:
        return sum(r["samples"] for r in self.records)

    def step(self) -> dict:
        from rl.loop import run_iteration

        self.loop.done += 1
        start = time.perf_counter()
        record = run_iteration(self.loop.loop, self.loop.done)
        wall = time.perf_counter() - start
        kept = {k: v for k, v in record.items() if k.startswith(("rollout/", "train/", "time/")) and
                isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))}
        out = {"wall_s": wall, "samples": round(record["train/groups_in_update"] * self.loop.recipe.rl.samples_per_prompt),
               "tokens_in_update": record["train/response_tokens_in_update"],
               "tokens_trained": record["train/tokens_trained"], "tokens_generated": record["rollout/tokens_generated"],
               "metrics": kept}
        self.records.append(out)
        return out


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_env()
    from rl.config import Recipe
    from thinkrl.config import load_recipe

    base = load_recipe(Recipe, f"recipes/{args.recipe}", args.set)
    max_tokens, seg = base.rollout.max_tokens, args.segment_tokens
    max_segments = args.max_segments or -(-max_tokens // seg)
    # the heavy tail needs no curriculum in the way: both loops draw uniformly (drop_uniform_groups off)
    common = ["rollout.num_engines=2", *args.set]
    recipe, run, sft_dir, _ = tiny_run("tiny-dense", args.sft_steps, tuple(common), recipe_file=args.recipe)
    contenders = {}
    for name, extra in (("partial", [f"rollout.partial.segment_tokens={seg}", f"rollout.partial.max_segments="
                                     f"{max_segments}", f"rollout.partial.loss={args.loss}"] +
                         (["rl.old_logprobs=trainer"] if args.loss == "importance" else [])),
                        ("sync", [])):
        own = load_recipe(Recipe, f"recipes/{args.recipe}", [f"run.output_dir={WORK_DIR / ('partial-bench-' + name)}",
                                                              *common, *extra])
        own_run = type(run)(WORK_DIR / f"partial-bench-{name}", run.base_model, run.tokenizer, run.train_rows,
                            run.heldout_rows)
        own_run.dir.mkdir(parents=True, exist_ok=True)
        contenders[name] = Contender(name, own, own_run, sft_dir, args.heldout)
        print(f"[bench] {name} loop ready", flush=True)
    rounds = 0
    while min(c.samples for c in contenders.values()) < args.samples:
        order = list(contenders) if rounds % 2 == 0 else list(contenders)[::-1]
        for name in order:
            c = contenders[name]
            if c.samples < args.samples or rounds == 0:
                r = c.step()
                print(f"[bench] round {rounds + 1} {name}: {r['wall_s']:.1f}s  samples {c.samples}  "
                      f"tokens in update {r['tokens_in_update']}  generated {r['tokens_generated']}", flush=True)
        rounds += 1
    result = summarize(args, contenders, max_segments, recipe)
    for name, c in contenders.items():
        result["loops"][name]["heldout"] = c.loop.evaluate()
        print(f"[bench] {name}: held-out accuracy {result['loops'][name]['heldout']['accuracy']:.3f}", flush=True)
    p, s = result["loops"]["partial"]["heldout"], result["loops"]["sync"]["heldout"]
    result["accuracy_gap_points"] = 100 * (p["accuracy"] - s["accuracy"])
    result["goals"] = {"throughput_ratio_ge_1_5": result["throughput_ratio_overall"] >= 1.5,
                       "accuracy_within_2_points": abs(result["accuracy_gap_points"]) <= 2}
    path = write_result("partial_rollouts", result, command_line())
    print(f"[bench] tokens in update per second, partial / sync: {result['throughput_ratio_overall']:.2f} overall, "
          f"windows {result['throughput_ratio_windows']}; held-out {p['accuracy']:.3f} vs {s['accuracy']:.3f}; {path}")
    for c in contenders.values():
        c.loop.close()
    return 0


def summarize(args, contenders: dict, max_segments: int, recipe) -> dict:
    """Throughput of each loop over the counted iterations, the ratios, the length distribution."""
    counted = {n: c.records[1:] for n, c in contenders.items()}
    n = min(len(v) for v in counted.values())
    loops = {}
    for name, recs in counted.items():
        recs = recs[:n]
        wall = sum(r["wall_s"] for r in recs)
        loops[name] = {"iterations": len(contenders[name].records), "counted": n,
                       "samples_trained": contenders[name].samples,
                       "tokens_in_update_per_s": sum(r["tokens_in_update"] for r in recs) / wall,
                       "tokens_trained_per_s": sum(r["tokens_trained"] for r in recs) / wall,
                       "tokens_generated_per_s": sum(r["tokens_generated"] for r in recs) / wall,
                       "iteration_s": spread([r["wall_s"] for r in recs]),
                       "records": contenders[name].records}
    windows = []
    for lo in range(0, n - args.window + 1, args.window):
        rate = {name: sum(r["tokens_in_update"] for r in recs[lo:lo + args.window]) /
                sum(r["wall_s"] for r in recs[lo:lo + args.window]) for name, recs in counted.items()}
        windows.append(rate["partial"] / rate["sync"])
    return {
        "recipe": args.recipe, "segment_tokens": args.segment_tokens, "max_segments": max_segments, "loss": args.loss,
        "max_tokens": recipe.rollout.max_tokens, "prompts_per_iteration": recipe.rl.prompts_per_iteration,
        "samples_per_prompt": recipe.rl.samples_per_prompt, "samples_target": args.samples,
        "heldout_problems": args.heldout,
        "throughput_ratio_overall": loops["partial"]["tokens_in_update_per_s"] / loops["sync"]["tokens_in_update_per_s"],
        "throughput_ratio_windows": spread(windows) if windows else None,
        "loops": loops,
    }


if __name__ == "__main__":
    sys.exit(main())
