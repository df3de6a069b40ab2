"""Benchmark 2: rollout efficiency, thinkrl's rollout layer vs raw `vllm.LLM.generate`.

    .venv/bin/python bench/rollout_efficiency.py --reps 5

thinkrl's side is what the RL driver calls: `rl.generation.generate` over the `RolloutEngine` Ray actor, k
samples per prompt with per-token log-probs, results shipped back to the driver as `Completion`s. The
baseline is a bare `vllm.LLM` in this process on the same checkpoint (the tiny recipe's SFT warmup, so
lengths are the real ones), the same prompts, n, max tokens, temperature and engine settings, called
with vLLM's default output settings, twice: asking for the sampled tokens' log-probs as thinkrl does
(`logprobs=0`: the same request, so the ratio is what thinkrl's layer adds or saves: Ray hop,
conversion, its own output settings), and asking for none (the ratio then also charges thinkrl for the
log-probs themselves). All three are called in rotation while every engine is alive.

The prompt and response lengths of the samples are saved too; bench/trainer_efficiency.py uses them as
the tiny recipe's real length distribution.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import command_line, setup_env, spread, tiny_run, write_result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sft-steps", type=int, default=None, help="SFT warmup of the checkpoint used (shared, cached) (default: the tiny recipe's)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--name", default="rollout_efficiency")
    args = p.parse_args(argv)
    setup_env()

    recipe, run, sft_dir, _ = tiny_run("tiny-dense", args.sft_steps, ("rollout.enforce_eager=true",))
    import ray

    from rl.generation import generate
    from rollout.engine import EngineSettings, RolloutEngine, RolloutSettings
    from thinkrl.chat import prompt_ids
    from thinkrl.cluster import actor_env, remote_actor

    os.environ.update(actor_env())  # the in-process engine gets the actor's thread settings
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thinkrl.inference import cpu_engine_options

    ro = recipe.rollout
    engine_settings = EngineSettings(model_path=str(sft_dir), seed=0, max_model_len=ro.max_model_len,
                                     enforce_eager=True, gpu_memory_utilization=ro.gpu_memory_utilization,
                                     cpu_kv_cache_gb=ro.cpu_kv_cache_gb)
    engine = remote_actor(RolloutEngine).remote(engine_settings)  # starts while the raw engine does
    # raw vLLM, with only the options this machine needs (thinkrl.inference: the reference MLA kernel on AMX CPUs)
    raw = LLM(model=str(sft_dir), seed=0, dtype="float32", max_model_len=ro.max_model_len, enforce_eager=True,
              gpu_memory_utilization=ro.gpu_memory_utilization, **cpu_engine_options("float32"))
    ray.get(engine.__ray_ready__.remote())
    tok = run.tokenizer
    prompt_sets = [[prompt_ids(tok, r["prompt"]) for r in run.train_rows[i * args.prompts:(i + 1) * args.prompts]]
                   for i in range(args.reps + 1)]
    lengths: list[list[int]] = []

    def thinkrl_call(prompts) -> dict:
        settings = RolloutSettings(n=args.k, temperature=ro.temperature, top_p=ro.top_p, max_tokens=args.max_tokens)
        start = time.perf_counter()
        groups = generate([engine], prompts, settings)
        wall = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        lengths.extend([len(pr), len(c.token_ids)] for pr, g in zip(prompts, groups, strict=True) for c in g)
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}

    def raw_call(prompts, logprobs: bool) -> dict:
        params = SamplingParams(n=args.k, temperature=ro.temperature, top_p=ro.top_p, max_tokens=args.max_tokens,
                                logprobs=0 if logprobs else None)
        start = time.perf_counter()
        outs = raw.generate([TokensPrompt(prompt_token_ids=pr) for pr in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}

    calls = {"thinkrl": thinkrl_call, "raw_vllm_logprobs": lambda pr: raw_call(pr, True),
             "raw_vllm": lambda pr: raw_call(pr, False)}
    for fn in calls.values():  # warm-up, not counted
        fn(prompt_sets[0])
    lengths.clear()
    runs: dict[str, list[dict]] = {name: [] for name in calls}
    for rep in range(args.reps):
        order = list(calls.items())
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            runs[name].append(fn(prompt_sets[rep + 1]))
            print(f"  rep {rep + 1}/{args.reps} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)

    def ratios(baseline: str) -> dict:
        values = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["thinkrl"], runs[baseline], strict=True)]
        return {"values": values, **spread(values)}

    result = {"settings": {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens,
                           "temperature": ro.temperature, "sft_steps": args.sft_steps, "reps": args.reps},
              "ratio": ratios("raw_vllm_logprobs"), "ratio_vs_no_logprobs": ratios("raw_vllm"), "runs": runs,
              "lengths_prompt_response": lengths}
    write_result(args.name, result, command_line())
    ray.kill(engine)
    for key, label in (("ratio", "raw vLLM with log-probs"), ("ratio_vs_no_logprobs", "raw vLLM without log-probs")):
        r = result[key]
        print(f"[bench] rollout layer / {label}, tokens/s: median {r['median']:.3f} (min {r['min']:.3f}, "
              f"max {r['max']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
