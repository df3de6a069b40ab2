"""Benchmarks 1 and 6: RL iteration throughput and learning per sample, thinkrl vs TRL's GRPOTrainer.

    .venv/bin/python bench/rl_vs_trl.py --model tiny-dense --reps 5 --eval-every 3

Both loops start from the same SFT checkpoint of the tiny recipe (its warmup, cached under
bench/results/work), see the same prompts, k, max tokens, learning rate and optimizer steps per
iteration, and are stepped alternately, one iteration each, in one process (see bench/contenders.py).
Throughput = response tokens generated and trained per wall-second of an iteration; the ratio
thinkrl / TRL is taken per adjacent pair and reported as min / median / max. One warm-up iteration of
each is run first and not counted (first-call costs: vLLM's and HF's caches, DeepSpeed's buffers).

With --eval-every N, both policies are evaluated on the same held-out problems through the same vLLM
engine (TRL's weights are loaded into it for its turn, then thinkrl's restored) before the first and
after every N iterations: held-out accuracy vs cumulative generated tokens (benchmark 6).

TRL's vLLM mode (`use_vllm=True, vllm_mode="colocate"`) is tried with --try-trl-vllm; where it cannot
run here, the exact error is recorded instead of a ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from common import WORK_DIR, command_line, init_ray, setup_env, spread, tiny_run, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dense", choices=["tiny-dense", "tiny-moe"])
    p.add_argument("--reps", type=int, default=5, help="counted iterations of each loop (>= 5 for a median)")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT warmup steps of the shared starting point (default: the tiny recipe's)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per iteration (tiny recipe: 32)")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (tiny recipe: 8)")
    p.add_argument("--max-tokens", type=int, default=160, help="response budget (tiny recipe: 160)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate both every N iterations (0: never)")
    p.add_argument("--heldout", type=int, default=100, help="held-out problems per evaluation")
    p.add_argument("--try-trl-vllm", action="store_true", help="also try TRL's vLLM colocate mode")
    p.add_argument("--name", default=None, help="result name (default rl_throughput_<model>)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more recipe overrides for both loops, e.g. rollout.num_engines=1")
    return p.parse_args(argv)


def error_text(e: BaseException) -> str:
    """The exception and its cause, as the report quotes them."""
    lines = traceback.format_exception_only(type(e), e)
    cause = e.__cause__ or e.__context__
    if cause is not None:
        lines += ["caused by: ", *traceback.format_exception_only(type(cause), cause)]
    return "".join(lines).strip()[-2000:]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_env()
    from contenders import ThinkrlLoop, TrlLoop

    # TRL draws prompts uniformly at random: thinkrl does too here, so both see the same prompt
    # distribution (the tiny recipe's curriculum is compared with uniform sampling in bench/samplers.py)
    overrides = (f"rl.prompts_per_iteration={args.prompts}", f"rl.samples_per_prompt={args.k}",
                 f"rollout.max_tokens={args.max_tokens}", f"eval.max_tokens={args.max_tokens}", "sampler.kind=uniform")
    if args.model == "tiny-moe":
        # vLLM's CPU MLA attention differs from transformers' by ~1e-2 per token on the tiny MoE (the dense
        # model: ~5e-7), so the trainer recomputes log pi_theta_i and the sync probe gets a wider margin
        overrides += ("rl.old_logprobs=trainer", "rl.probe_tolerance=0.05")
    overrides += tuple(args.set)
    # the engine as the recipe builds it (the tiny recipe: without torch.compile; TRL's vLLM mode likewise,
    # bench/contenders.py)
    t0 = time.time()
    recipe, run, sft_dir, _ = tiny_run(args.model, args.sft_steps, overrides)
    init_ray()
    print(f"[bench] {args.model}: SFT checkpoint ready ({time.time() - t0:.0f}s)", flush=True)
    iterations = args.reps + 2
    thinkrl = ThinkrlLoop(recipe, run, sft_dir, args.heldout)
    loops = {"thinkrl": thinkrl}
    errors: dict[str, str] = {}
    curve: dict[str, list[dict]] = {"thinkrl": [], "trl_hf": []}
    tokens_seen: dict[str, float] = {"thinkrl": 0.0}
    runs: dict[str, list[dict]] = {"thinkrl": []}
    warm: dict[str, dict | None] = {}

    def evaluate(done: int, trl) -> None:
        first = thinkrl.evaluate()
        # before any update both hold the same weights: one evaluation is the start of both curves
        second = first if done == 0 else thinkrl.evaluate_weights(trl.state_dict())
        for name, result in (("thinkrl", first), ("trl_hf", second)):
            curve[name].append({"iteration": done, "generated_tokens": tokens_seen[name], **result})
            print(f"[eval] {name} after {done} iterations: accuracy {result['accuracy']:.3f}", flush=True)

    def step(name: str) -> dict | None:
        if name not in loops:  # it failed before
            return None
        try:
            record = loops[name].iteration()
        except Exception as e:  # a contender that breaks mid-run leaves the others measured
            errors[name] = error_text(e)
            print(f"[bench] {name} failed: {errors[name]}", flush=True)
            loops.pop(name).close()
            return None
        tokens_seen[name] += record["tokens"]
        return record

    def save() -> dict:
        """Write what has been measured so far (after each phase: a later failure keeps the earlier ones)."""
        runs_done = {k: v for k, v in runs.items() if k != "thinkrl"}
        ratios, stage_share = {}, {}
        for other, _ in phases:
            pairs = list(zip(runs_done.get(f"thinkrl_vs_{other}", []), runs_done.get(other, []), strict=False))
            if pairs:
                values = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs]
                ratios[other] = {"values": values, **spread(values)}
        for name, records in runs_done.items():
            names = sorted({s for r in records for s in r["stages_s"]})
            stage_share[name] = {s: spread([r["stages_s"].get(s, 0.0) / r["wall_s"] for r in records]) for s in names}
        result = {
            "model": args.model,
            "settings": {"prompts": args.prompts, "k": args.k, "max_tokens": args.max_tokens,
                         "optimizer_steps_per_iteration": recipe.rl.mini_batches, "lr": recipe.rl.lr,
                         "sft_steps": args.sft_steps, "reps": args.reps},
            "ratios": ratios,
            "stage_share": stage_share,
            "errors": errors,
            "runs": runs_done,
            "warmup": warm,
        }
        name = args.name or f"rl_throughput_{args.model}"
        write_result(name, result, command_line())
        if args.eval_every:
            write_result(f"learning_{args.model}", {"model": args.model, "curve": curve, "settings": result["settings"],
                                                    "heldout": args.heldout,
                                                    "eval_decoding": recipe.eval.model_dump()}, command_line())
        return ratios

    # One TRL trainer at a time (two in one process share accelerate's global state): thinkrl is
    # interleaved with TRL+HF first (with the learning curve), then with TRL+vLLM.
    phases = [("trl_hf", False)] + ([("trl_vllm", True)] if args.try_trl_vllm else [])
    try:
        for other, use_vllm in phases:
            try:
                loops[other] = TrlLoop(recipe, run, sft_dir, WORK_DIR / f"{other}-{args.model}",
                                       iterations=iterations, use_vllm=use_vllm)
            except Exception as e:
                errors[other] = error_text(e)
                print(f"[bench] {other} cannot start here: {errors[other]}", flush=True)
                continue
            tokens_seen[other], runs[other] = 0.0, []
            learning = other == "trl_hf" and args.eval_every > 0
            if learning:
                evaluate(0, loops[other])
            print(f"[bench] thinkrl vs {other}: warm-up iteration of each (not counted)", flush=True)
            warm[f"{other}/thinkrl"], warm[other] = step("thinkrl"), step(other)
            for rep in range(args.reps):
                if other not in loops:
                    break
                # A B, B A, ...: neither always runs first, or right after an evaluation
                for name in ((["thinkrl", other]) if rep % 2 == 0 else [other, "thinkrl"]):
                    record = step(name)
                    if record is None:
                        break
                    (runs[name] if name == other else runs["thinkrl"]).append(record)
                    print(f"  rep {rep + 1}/{args.reps} {name}: {record['tokens_per_s']:.1f} tokens/s "
                          f"({record['wall_s']:.1f}s)", flush=True)
                if learning and (rep + 2) % args.eval_every == 0:
                    evaluate(rep + 2, loops[other])
            if learning and (args.reps + 1) % args.eval_every:
                evaluate(args.reps + 1, loops[other])
            if other in loops:
                loops.pop(other).close()
            runs[f"thinkrl_vs_{other}"] = runs.pop("thinkrl")
            runs["thinkrl"] = []
            save()
    finally:
        for name in list(loops):
            loops.pop(name).close()
    ratios = save()
    for other, r in ratios.items():
        print(f"[bench] thinkrl / {other} tokens/s: median {r['median']:.2f} (min {r['min']:.2f}, max {r['max']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
