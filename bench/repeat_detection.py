"""Benchmark: what repeat stopping at decode time (rollout.repeat) costs when nothing repeats.

    .venv/bin/python bench/repeat_detection.py --reps 8

The tiny recipe's SFT checkpoint (its real, mostly non-looping samples) rolled out through
`rl.generation.generate` and the `RolloutEngine` Ray actor, k samples per prompt at the recipe's
temperature, by three contenders called in rotation while both engines are alive:

- `on`: an engine with the repeat logits processor, every request tracked (`RolloutSettings.repeat`);
- `off`: an engine without the processor (`EngineSettings.stop_repeats=False`): vLLM as it ships;
- `idle`: the processor's engine with no request tracked (what registering it costs a run that never asks).

Ratios are tokens/s of `on` over each other contender, per repetition (common.interleave). On a shared
2-core machine they swing by +-20% from one pair to the next, far more than the cost measured, so the
processor's own time is measured too, in place: the seconds the engine's workers spent in it during each
call (`RolloutEngine.repeat_seconds`) over the call's wall time. The share of samples `on` stopped is
recorded: the workload is meant not to loop, so it should be about 0. And, without vLLM, the processor's
work per decode step (`BatchRows.apply`) for 32 and 256 tracked rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import command_line, interleave, setup_env, spread, tiny_run, write_result


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def apply_cost_us(rows: int, steps: int = 400) -> float:
    """Microseconds of `BatchRows.apply` per decode step with `rows` tracked, non-repeating rows, on one
    thread (as vLLM-CPU's worker runs torch)."""
    import random
    from types import SimpleNamespace

    import torch

    torch.set_num_threads(1)

    from rollout.repeat import BatchRows, RepeatSettings

    rng = random.Random(0)
    proc = BatchRows(max_rows=rows)
    args = RepeatSettings().extra_args(eos=0)
    outputs = [[] for _ in range(rows)]
    added = [(r, SimpleNamespace(extra_args=args), None, outputs[r]) for r in range(rows)]
    proc.update_state(SimpleNamespace(batch_size=rows, removed=[], added=added, moved=[]))
    logits = torch.zeros(rows, 1000)
    draws = [[rng.randrange(1, 30000) for _ in range(rows)] for _ in range(steps)]
    spent = 0.0
    for step in draws:
        for out, token in zip(outputs, step, strict=True):  # vLLM's sampler appends; not timed
            out.append(token)
        start = time.perf_counter()
        proc.apply(logits)
        spent += time.perf_counter() - start
    return spent / steps * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--sft-steps", type=int, default=None, help="SFT warmup of the checkpoint (default: the recipe's)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--name", default="repeat_detection")
    args = p.parse_args(argv)
    setup_env()
    t0 = time.time()

    recipe, run, sft_dir, _ = tiny_run("tiny-dense", args.sft_steps, ("rollout.enforce_eager=true",))
    import ray

    from rl.generation import generate
    from rollout.engine import EngineSettings, RolloutEngine, RolloutSettings
    from rollout.repeat import RepeatSettings
    from thinkrl.chat import prompt_ids
    from thinkrl.cluster import remote_actor

    ro = recipe.rollout
    common = dict(model_path=str(sft_dir), seed=0, max_model_len=ro.max_model_len, enforce_eager=True,
                  gpu_memory_utilization=ro.gpu_memory_utilization, cpu_kv_cache_gb=ro.cpu_kv_cache_gb)
    with_processor = remote_actor(RolloutEngine).remote(EngineSettings(**common))
    without = remote_actor(RolloutEngine).remote(EngineSettings(**common, stop_repeats=False))
    ray.get([with_processor.__ray_ready__.remote(), without.__ray_ready__.remote()])
    print(f"[bench] engines ready after {time.time() - t0:.0f} s", flush=True)

    tok = run.tokenizer
    prompt_sets = [[prompt_ids(tok, r["prompt"]) for r in run.train_rows[i * args.prompts:(i + 1) * args.prompts]]
                   for i in range(args.reps + 1)]
    plain = RolloutSettings(n=args.k, temperature=ro.temperature, top_p=ro.top_p, max_tokens=args.max_tokens)
    watched = RolloutSettings(n=args.k, temperature=ro.temperature, top_p=ro.top_p, max_tokens=args.max_tokens,
                              repeat=RepeatSettings())
    calls = {"on": 0, "off": 0, "idle": 0}

    def contender(name, engine, settings):
        def call() -> dict:
            prompts = prompt_sets[min(calls[name], args.reps)]
            calls[name] += 1
            spent = ray.get(engine.repeat_seconds.remote())
            start = time.perf_counter()
            groups = generate([engine], prompts, settings)
            wall = time.perf_counter() - start
            spent = ray.get(engine.repeat_seconds.remote()) - spent
            samples = [c for g in groups for c in g]
            tokens = sum(len(c.token_ids) for c in samples)
            return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "processor_s": spent,
                    "processor_share": spent / wall,
                    "repeat_share": sum(c.finish_reason == "repeat" for c in samples) / len(samples)}
        return call

    contenders = {"on": contender("on", with_processor, watched), "off": contender("off", without, plain),
                  "idle": contender("idle", with_processor, plain)}
    for name, fn in contenders.items():  # warm-up on the spare prompt set, not counted
        calls[name] = args.reps
        fn()
        calls[name] = 0
    result = interleave(contenders, args.reps, "tokens_per_s")
    micro = {rows: apply_cost_us(rows) for rows in (32, 256)}
    cpu = cpu_model()
    summary = {
        "settings": {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens, "reps": args.reps,
                     "temperature": ro.temperature, "sft_steps": args.sft_steps, "repeat": vars(RepeatSettings())},
        "cpu_model_lscpu": cpu,
        "ratio_on_over_off": result["ratios"]["off"],
        "ratio_on_over_idle": result["ratios"]["idle"],
        "repeat_share_on": spread([r["repeat_share"] for r in result["runs"]["on"]]),
        "processor_share_on": spread([r["processor_share"] for r in result["runs"]["on"]]),
        "processor_share_idle": spread([r["processor_share"] for r in result["runs"]["idle"]]),
        "apply_us_per_step": micro,
        "runs": result["runs"],
        "wall_s": time.time() - t0,
    }
    write_result(args.name, summary, command_line())
    ray.kill(with_processor)
    ray.kill(without)
    for key, label in (("ratio_on_over_off", "no processor"), ("ratio_on_over_idle", "processor, nothing tracked")):
        r = summary[key]
        print(f"[bench] detection on / {label}, tokens/s: median {r['median']:.3f} (min {r['min']:.3f}, "
              f"max {r['max']:.3f})")
    print(f"[bench] samples stopped as loops (on): median share {summary['repeat_share_on']['median']:.3f}")
    for name in ("on", "idle"):
        r = summary[f"processor_share_{name}"]
        print(f"[bench] time in the processor / generate wall time ({name}): median {r['median']:.4f} "
              f"(min {r['min']:.4f}, max {r['max']:.4f})")
    print(f"[bench] BatchRows.apply per step: {micro[32]:.0f} us (32 rows), {micro[256]:.0f} us (256 rows)")
    print(f"[bench] CPU: {cpu} ({os.cpu_count()} cores); {summary['wall_s']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
