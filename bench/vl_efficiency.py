"""Benchmark 8: the vision-language path: rollout and trainer tokens/s with images.

    .venv/bin/python bench/vl_efficiency.py --reps 5

Two measurements in one process, one after the other, on the tiny Kimi-VL (`thinkrl.models`: a MoonViT
and projector over the tiny MoE; random weights by default, so nearly every response runs to max
tokens; `--model` takes a trained checkpoint folder instead) and the shapes task's prompts (one 56 px
image each: one placeholder in the prompt, four image tokens once expanded). Every repetition has new
prompts and new images, so no image is served from a cache of an earlier repetition.

1. Rollout: tokens/s of `rl.generation.generate` through a `RolloutEngine` Ray actor divided by a bare
   in-process `vllm.LLM.generate` on the same request: the same prompt ids, the same images (decoded from
   their PNG bytes inside the timed call on both sides), n, max tokens, temperature, the engine options
   thinkrl's engines get (`thinkrl.inference`: dtype, the CPU kernels, `vl_engine_options`) and the
   sampled tokens' log-probs (`logprobs=0`); otherwise vLLM's default output settings. Goal >= 0.95.
2. Trainer: `rl.trainer.PMDWorker.update` in this process (world size 1, gloo) on thinkrl's rollouts of
   the same repetition, as the RL loop builds them (prompt ids expanded as the engine ran them, the PNG
   bytes), against the same samples text-only: every image token replaced by an ordinary text token and
   no images, so lengths, micro-batches and optimizer steps are identical. Tokens/s = (prompt + response
   tokens) / s; ratio image / text. 1 - ratio is the share of the image update that images cost (the
   processor, the tower and projector forward and backward, the scatter into the embeddings); the
   processor (`VisionInputs.batch`) and the tower + projector forward (`image_features`) are also timed
   directly, as shares of the image update.

Batch, engine and loss settings are recipes/tiny-vl.yaml's (one RL iteration's update: prompts x k,
mini-batches, micro-batch budget, lr, tau, old log-probs), except max tokens (64 by default, to keep the
run short). What this leaves out: the trainer runs in-process, so the Ray hop that ships samples (and
their image bytes, a few hundred bytes each) to a trainer actor is not counted; the trainer's batch is
cut from the rollout's groups, so --train-prompts <= --prompts.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, WORK_DIR, command_line, init_ray, interleave, setup_env, spread, write_result

RECIPE = ROOT / "recipes" / "tiny-vl.yaml"

Requests = tuple[list[list[int]], list[list[bytes]]]  # prompt ids (one placeholder per image), image bytes


def shapes_requests(tokenizer, sets: int, prompts: int, image_dir: Path, seed: int = 0) -> list[Requests]:
    """`sets` disjoint sets of `prompts` shapes prompts (no layout twice)."""
    from thinkrl.chat import row_prompt_ids
    from thinkrl.tasks.shapes import make_rows

    rows = make_rows(sets * prompts, seed, image_dir)
    out = []
    for s in range(sets):
        mine = rows[s * prompts:(s + 1) * prompts]
        out.append(([row_prompt_ids(tokenizer, r) for r in mine],
                    [[Path(p).read_bytes() for p in r["images"]] for r in mine]))
    return out


def rollout_comparison(model_path: Path, rollout, requests: list[Requests], k: int, max_tokens: int,
                       reps: int) -> tuple[dict, list[list]]:
    """thinkrl's `generate` vs raw `vllm.LLM.generate` on `requests` (one warm-up call each on the first set,
    then `reps` alternated repetitions). Returns the comparison and thinkrl's groups of every set."""
    import ray

    from rl.generation import generate
    from rollout.engine import EngineSettings, RolloutEngine, RolloutSettings
    from thinkrl.cluster import actor_env, remote_actor

    os.environ.update(actor_env())  # the in-process engine gets the actor's thread settings
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from thinkrl.inference import cpu_engine_options, on_cpu, resolve_dtype, vl_engine_options
    from thinkrl.vl.inputs import decode

    engine = remote_actor(RolloutEngine).remote(EngineSettings(
        model_path=str(model_path), seed=0, max_model_len=rollout.max_model_len, enforce_eager=True,
        gpu_memory_utilization=rollout.gpu_memory_utilization, cpu_kv_cache_gb=rollout.cpu_kv_cache_gb))
    dtype = resolve_dtype("auto")  # what build_llm gives thinkrl's engine, option for option
    raw = LLM(model=str(model_path), seed=0, dtype=dtype, max_model_len=rollout.max_model_len, enforce_eager=True,
              gpu_memory_utilization=rollout.gpu_memory_utilization,
              **(cpu_engine_options(dtype) if on_cpu() else {}), **vl_engine_options(str(model_path)))
    ray.get(engine.__ray_ready__.remote())
    groups_by_set: list[list] = []

    def record(tokens: int, wall: float, samples: int) -> dict:
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "mean_response_tokens": tokens / samples}

    def thinkrl_call(prompts: list[list[int]], images: list[list[bytes]]) -> dict:
        settings = RolloutSettings(n=k, temperature=1.0, top_p=1.0, max_tokens=max_tokens)
        start = time.perf_counter()
        groups = generate([engine], prompts, settings, images)
        wall = time.perf_counter() - start
        groups_by_set.append(groups)
        return record(sum(len(c.token_ids) for g in groups for c in g), wall, len(prompts) * k)

    def raw_call(prompts: list[list[int]], images: list[list[bytes]]) -> dict:
        params = SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=max_tokens, logprobs=0)
        start = time.perf_counter()
        request = [TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": [decode(d) for d in own]})
                   for ids, own in zip(prompts, images, strict=True)]
        outs = raw.generate(request, params, use_tqdm=False)
        wall = time.perf_counter() - start
        return record(sum(len(c.token_ids) for o in outs for c in o.outputs), wall, len(prompts) * k)

    calls = {"thinkrl": thinkrl_call, "raw_vllm": raw_call}
    for call in calls.values():  # warm-up, not counted
        call(*requests[0])
    contenders = {name: _rotating(call, requests[1:]) for name, call in calls.items()}
    compared = interleave(contenders, reps, "tokens_per_s")
    ray.kill(engine)
    raw.llm_engine.engine_core.shutdown()  # its engine process and threads stop before the trainer starts
    runs = compared["runs"]
    return {"ratio": compared["ratios"]["raw_vllm"], "runs": runs,
            "tokens_per_s": {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in runs.items()},
            "mean_response_tokens": statistics.mean(r["mean_response_tokens"] for rs in runs.values() for r in rs)
            }, groups_by_set


def _rotating(call, requests: list[Requests]):
    """A no-argument contender for `interleave`: repetition r calls `call` on `requests[r]`."""
    remaining = iter(requests)
    return lambda: call(*next(remaining))


def image_samples(groups: list, images: list[list[bytes]], seed: int) -> list:
    """The trainer's samples of rolled-out groups, as the RL loop makes them (the prompt as the engine ran it);
    the advantages are random 0/1 rewards minus their group's mean (their values cost nothing)."""
    from rl.trainer import Sample

    rng = random.Random(seed)
    samples = []
    for group, own in zip(groups, images, strict=True):
        rewards = [float(rng.random() < 0.5) for _ in group]
        baseline = sum(rewards) / len(rewards)
        for c, r in zip(group, rewards, strict=True):
            if c.prompt_ids is None:
                raise RuntimeError("the engine returned no expanded prompt for an image prompt")
            samples.append(Sample(c.prompt_ids, c.token_ids, r - baseline, c.logprobs, own))
    return samples


def text_only(samples: list, image_token: int, text_token: int) -> list:
    """The same samples without images: each image token becomes `text_token` (same lengths, same plan)."""
    from rl.trainer import Sample

    return [Sample([text_token if t == image_token else t for t in s.prompt_ids], s.response_ids, s.advantage,
                   s.rollout_logprobs, None) for s in samples]


def _add_time(owner, name: str, totals: dict[str, float]) -> None:
    """Wrap `owner.name` so that the seconds of its calls add up in `totals[name]`."""
    inner = getattr(owner, name)

    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(owner, name, timed_call)


def trainer_comparison(model_path: Path, recipe, batches: list[list], k: int, old_logprobs: str, reps: int) -> dict:
    """PMDWorker.update on each batch of image samples (groups of `k` in a row) and on the same batch text-only
    (one warm-up update each on the first batch, then `reps` alternated repetitions on the others)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from rl.batching import plan_update
    from rl.trainer import PMDSettings, PMDWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    rl = recipe.rl
    worker = PMDWorker(str(model_path), OptimConfig(lr=rl.lr, weight_decay=rl.weight_decay, grad_clip=rl.grad_clip,
                                                    frozen=recipe.model.frozen),
                       DistConfig(master_port=free_port(), zero_stage=rl.zero_stage,
                                  gradient_checkpointing=rl.gradient_checkpointing), seed=0)
    settings = PMDSettings(tau=rl.tau, log_ratio_norm=rl.log_ratio_norm, reset_optimizer=rl.reset_optimizer,
                           old_logprobs=old_logprobs)
    totals = {"batch": 0.0, "image_features": 0.0}
    _add_time(worker.vision, "batch", totals)  # the processor (cached by image content)
    _add_time(worker.engine.module, "image_features", totals)  # the tower + projector, forward
    text_token = worker.engine.tokenizer("x", add_special_tokens=False)["input_ids"][0]

    def planned(samples: list, seed: int) -> tuple[list, list]:
        shards, plans = plan_update([len(s.prompt_ids) + len(s.response_ids) for s in samples],
                                    [i // k for i in range(len(samples))], mini_batches=rl.mini_batches, num_ranks=1,
                                    max_tokens_per_micro_batch=rl.max_tokens_per_micro_batch, seed=seed)
        return [samples[i] for i in shards[0]], plans[0]

    def update(samples: list, plans: list) -> dict:
        totals.update(batch=0.0, image_features=0.0)
        start = time.perf_counter()
        stats = worker.update(samples, plans, settings)
        wall = time.perf_counter() - start
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
        return {"tokens": tokens, "samples": len(samples), "steps": stats["steps"], "wall_s": wall,
                "tokens_per_s": tokens / wall, "processor_s": totals["batch"], "tower_forward_s": totals["image_features"]}

    image_batches = [planned(samples, seed) for seed, samples in enumerate(batches)]
    text_batches = [(text_only(samples, worker.vision.token_id, text_token), plans) for samples, plans in image_batches]
    for samples, plans in (image_batches[0], text_batches[0]):  # warm-up, not counted
        update(samples, plans)
    contenders = {"image": _rotating(update, image_batches[1:]), "text": _rotating(update, text_batches[1:])}
    compared = interleave(contenders, reps, "tokens_per_s")
    runs, ratio = compared["runs"], compared["ratios"]["text"]
    images = runs["image"]
    first = image_batches[0][0]
    return {"ratio": ratio, "images_share": spread([1 - v for v in ratio["values"]]),
            "processor_share": spread([r["processor_s"] / r["wall_s"] for r in images]),
            "tower_forward_share": spread([r["tower_forward_s"] / r["wall_s"] for r in images]),
            "tokens_per_s": {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in runs.items()},
            "runs": runs, "samples": len(first), "optimizer_steps": len(image_batches[0][1]),
            "image_tokens_per_sample": first[0].prompt_ids.count(worker.vision.token_id),
            "mean_tokens_per_sample": statistics.mean(len(s.prompt_ids) + len(s.response_ids) for s in first)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", default="tiny-vl", help="'tiny-vl' (random weights, built offline) or a Kimi-VL "
                   "checkpoint folder")
    p.add_argument("--prompts", type=int, default=32, help="rollout: prompts per call")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--train-prompts", type=int, default=None,
                   help="trainer: prompt groups per update (default: the recipe's prompts_per_iteration)")
    p.add_argument("--old-logprobs", choices=("trainer", "rollout"), default=None,
                   help="where the update takes log pi_theta_i (default: the recipe's)")
    p.add_argument("--name", default="vl_efficiency")
    args = p.parse_args(argv)
    setup_env()

    from rl.config import Recipe
    from thinkrl.config import load_recipe
    from thinkrl.models import load_tokenizer, resolve_model
    from thinkrl.vl import is_vl

    recipe = load_recipe(Recipe, str(RECIPE))
    train_prompts = args.train_prompts or recipe.rl.prompts_per_iteration
    if train_prompts > args.prompts:
        p.error(f"--train-prompts {train_prompts} > --prompts {args.prompts}: the trainer's batch is cut from the "
                "rollout's groups")
    old_logprobs = args.old_logprobs or recipe.rl.old_logprobs
    model_path = resolve_model(args.model, Path(os.environ["THINKRL_CACHE"]) / "models")
    if not is_vl(model_path):
        p.error(f"--model {args.model}: {model_path} is not a vision-language model folder (config.json model_type)")
    requests = shapes_requests(load_tokenizer(model_path), args.reps + 1, args.prompts, WORK_DIR / "vl_images")
    init_ray()

    print(f"[bench] rollout: {args.prompts} prompts x n={args.k}, max {args.max_tokens} tokens", flush=True)
    rollout, groups = rollout_comparison(model_path, recipe.rollout, requests, args.k, args.max_tokens, args.reps)
    batches = [image_samples(g[:train_prompts], images[:train_prompts], seed)
               for seed, (g, (_, images)) in enumerate(zip(groups, requests, strict=True))]
    print(f"[bench] trainer: {train_prompts} prompts x {args.k} samples per update", flush=True)
    trainer = trainer_comparison(model_path, recipe, batches, args.k, old_logprobs, args.reps)

    settings = {"model": args.model, "prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens,
                "temperature": 1.0, "train_prompts": train_prompts, "mini_batches": recipe.rl.mini_batches,
                "max_tokens_per_micro_batch": recipe.rl.max_tokens_per_micro_batch, "lr": recipe.rl.lr,
                "tau": recipe.rl.tau, "old_logprobs": old_logprobs, "reps": args.reps,
                "recipe": str(RECIPE.relative_to(ROOT))}
    write_result(args.name, {"settings": settings, "rollout": rollout, "trainer": trainer}, command_line())
    r, t = rollout["ratio"], trainer["ratio"]
    print(f"[bench] VL rollout layer / raw vLLM, tokens/s: median {r['median']:.3f} (min {r['min']:.3f}, "
          f"max {r['max']:.3f})")
    print(f"[bench] trainer tokens/s image {trainer['tokens_per_s']['image']:.0f}, text {trainer['tokens_per_s']['text']:.0f}; "
          f"image / text median {t['median']:.3f} (min {t['min']:.3f}, max {t['max']:.3f}); images' share "
          f"{trainer['images_share']['median']:.1%}, tower forward {trainer['tower_forward_share']['median']:.1%}, "
          f"processor {trainer['processor_share']['median']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
