"""Benchmark 12: what a roll-out costs on this machine, which bounds what partial rollouts can save.

    .venv/bin/python bench/rollout_costs.py

Two parts, on the warm-up checkpoint of `recipes/tiny-longtail.yaml` (bench/common.tiny_run, cached):

- `engine`: one vLLM engine pinned to one core, as each of the recipe's two engines is (its engine core in
  the same process, as thinkrl's engines run on CPU). A decode step's
  wall time at batch 1 ... 220 (`ignore_eos`, 64 steps, the best of 3), at two context lengths, fitted as
  `a + b x batch` (a: the step's fixed cost, b: each sequence's); and prefill per token. Partial rollouts
  remove decode steps of the tail, where the batch is small: they save about `a` per step removed, and a
  continued sample is prefilled again after every weight sync (its cache holds the old weights' keys).
- `loop`: the partial loop (`--segment-tokens`) with its two engines and trainer rank. After a few
  iterations, pairs of (roll-out, then the PMD update on its samples) and (the same update started while
  the next roll-out decodes, one step off-policy), alternately: the update overlapped with the roll-out
  against the two one after the other. On one CPU machine both take the same cores. Each pair trains on
  the same samples twice: the part measures cost, not learning.

`--part engine|loop|all` (all: the engine part in a child process, then the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import WORK_DIR, command_line, setup_env, spread, tiny_run, write_result

RECIPE = "tiny-longtail.yaml"
BATCHES = (1, 16, 64, 128, 220)
CONTEXTS = (40, 240)  # prompt tokens before the 64 decoded: the bulk's and the tail's
STEPS = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="all", choices=["engine", "loop", "all"])
    p.add_argument("--segment-tokens", type=int, default=128, help="rollout.partial.segment_tokens of the loop part")
    p.add_argument("--reps", type=int, default=4, help="pairs (one after the other, overlapped) in the loop part")
    p.add_argument("--model", default=None, help="the engine part's model folder (with --part engine; default: the "
                   "recipe's warm-up checkpoint)")
    p.add_argument("--out", default=None, help="the engine part's JSON (with --part engine)")
    return p.parse_args(argv)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def engine_costs(model: str) -> dict:
    """Decode-step milliseconds by batch and context, their linear fit, and prefill microseconds per token."""
    import random

    from rollout.engine import cpu_binding

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(0, 2, sorted(os.sched_getaffinity(0)))
    # the engine core in this process, as `RolloutEngine` runs it on CPU (`EngineSettings.in_process`);
    # VLLM_ENABLE_V1_MULTIPROCESSING=1 in the environment measures vLLM's default, a second process
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    torch.set_num_threads(1)  # the engine's one core (RolloutEngine sizes torch's pool to its cores)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from thinkrl.inference import build_llm

    llm = build_llm(model, max_model_len=1024, enforce_eager=True, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(0)

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=1.0, logprobs=0, flat_logprobs=True,
                              detokenize=False)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(5, vocab) for _ in range(n)]

    def wall(prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params(n), use_tqdm=False)
        return time.perf_counter() - start

    wall([tokens(40) for _ in range(8)], STEPS)  # first-call costs
    # prefill: 100-token prompts, one token decoded (distinct prompts: nothing from the prefix cache)
    prefill = {n: 1e6 * wall([tokens(100) for _ in range(n)], 1) / (n * 100) for n in (64, 256)}
    steps: dict[int, dict[int, float]] = {}
    for context in CONTEXTS:
        steps[context] = {}
        for batch in BATCHES:
            # each call's prompts differ (a new last token), so no step is served from the prefix cache
            base = tokens(context - 1)
            steps[context][batch] = min(1e3 * wall([base + [rng.randrange(5, vocab)] for _ in range(batch)], STEPS)
                                        for _ in range(3)) / STEPS
    fits = {c: fit_line(list(BATCHES), [steps[c][b] for b in BATCHES]) for c in CONTEXTS}
    return {"step_ms": {str(c): {str(b): v for b, v in s.items()} for c, s in steps.items()},
            "fit": {str(c): {"fixed_ms": a, "per_sequence_ms": b} for c, (a, b) in fits.items()},
            "prefill_us_per_token": {str(n): v for n, v in prefill.items()}, "decode_steps": STEPS}


def overlap_costs(recipe, run, sft_dir, segment_tokens: int, reps: int) -> dict:
    """Seconds of (roll-out, then update) against (update started while the next roll-out decodes)."""
    import ray
    from contenders import ThinkrlLoop

    from rl.batching import plan_update
    from rl.config import Recipe
    from rl.loop import make_samples, roll_out, run_iteration, score
    from rl.sync import sync_weights
    from thinkrl.config import load_recipe

    out_dir = WORK_DIR / "rollout-costs"
    own = load_recipe(Recipe, f"recipes/{RECIPE}", [f"run.output_dir={out_dir}", "rollout.num_engines=2",
                                                   f"rollout.partial.segment_tokens={segment_tokens}",
                                                   f"rollout.partial.max_segments={-(-recipe.rollout.max_tokens // segment_tokens)}"])
    own_run = type(run)(out_dir, run.base_model, run.tokenizer, run.train_rows, run.heldout_rows)
    own_run.dir.mkdir(parents=True, exist_ok=True)
    contender = ThinkrlLoop(own, own_run, sft_dir, 10)
    loop, s = contender.loop, contender.loop.settings

    def start_update(samples, group_ids, iteration):
        shards, plans = plan_update([len(x.prompt_ids) + len(x.response_ids) for x in samples], group_ids,
                                    mini_batches=s.mini_batches, num_ranks=s.num_trainers,
                                    max_tokens_per_micro_batch=s.max_tokens_per_micro_batch, seed=iteration)
        return [t.update.remote([samples[i] for i in shard], plan, s.pmd)
                for t, shard, plan in zip(loop.trainers, shards, plans, strict=True)]

    iteration = 0
    for _ in range(3):  # first calls, and a buffer that holds continued samples
        iteration += 1
        run_iteration(loop, iteration)
    pairs = []
    for rep in range(reps):
        iteration += 1
        start = time.perf_counter()
        finished, _ = roll_out(loop, iteration)
        rolled = time.perf_counter()
        samples, group_ids, _ = make_samples(loop, score(loop, finished, iteration))
        updating = time.perf_counter()
        ray.get(start_update(samples, group_ids, iteration))
        sequential = {"rollout_s": rolled - start, "update_s": time.perf_counter() - updating}
        sync_weights(loop.trainers, loop.engines)
        iteration += 1  # the same samples' update again, now while the next roll-out decodes
        start = time.perf_counter()
        refs = start_update(samples, group_ids, iteration)
        roll_out(loop, iteration)
        rolled = time.perf_counter()
        ray.get(refs)
        overlapped = {"rollout_s": rolled - start, "both_s": time.perf_counter() - start}
        sync_weights(loop.trainers, loop.engines)
        pairs.append({"sequential": sequential, "overlapped": overlapped,
                      "ratio": (sequential["rollout_s"] + sequential["update_s"]) / overlapped["both_s"]})
        print(f"[bench] pair {rep + 1}: one after the other {sequential['rollout_s']:.2f} + {sequential['update_s']:.2f} s, "
              f"overlapped {overlapped['both_s']:.2f} s (its roll-out {overlapped['rollout_s']:.2f} s)", flush=True)
    contender.close()
    return {"segment_tokens": segment_tokens, "pairs": pairs,
            "speedup_of_overlap": spread([p["ratio"] for p in pairs]),
            "sequential_s": spread([p["sequential"]["rollout_s"] + p["sequential"]["update_s"] for p in pairs]),
            "overlapped_s": spread([p["overlapped"]["both_s"] for p in pairs]),
            "rollout_alone_s": spread([p["sequential"]["rollout_s"] for p in pairs]),
            "rollout_beside_update_s": spread([p["overlapped"]["rollout_s"] for p in pairs])}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_env()
    if args.part == "engine" and args.model and args.out:
        with open(args.out, "w") as f:
            json.dump(engine_costs(args.model), f)
        return 0
    recipe, run, sft_dir, _ = tiny_run("tiny-dense", None, ("rollout.num_engines=2",), recipe_file=RECIPE)
    result: dict = {"recipe": RECIPE}
    if args.part in ("engine", "all"):
        out = WORK_DIR / "rollout-costs-engine.json"
        # a process of its own: the engine and its workers are gone before the loop's start
        subprocess.run([sys.executable, __file__, "--part", "engine", "--model", str(sft_dir), "--out", str(out)],
                       check=True)
        result["engine"] = json.loads(out.read_text())
        for c, fit in result["engine"]["fit"].items():
            print(f"[bench] context {c}: a decode step costs {fit['fixed_ms']:.2f} ms + {fit['per_sequence_ms']:.3f} ms "
                  "per sequence", flush=True)
    if args.part in ("loop", "all"):
        result["loop"] = overlap_costs(recipe, run, sft_dir, args.segment_tokens, args.reps)
    path = write_result("rollout_costs", result, command_line())
    print(f"[bench] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
