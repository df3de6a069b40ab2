"""RL post-training driver: `ray job submit -- python -m rl.train recipe.yaml [key=value ...]`.

The driver owns the data, the sampler, the loop and the logs; the heavy work runs in Ray actors:
DeepSpeed trainer ranks (`rl.trainer.PMDWorker`), vLLM engines (`rollout.engine.RolloutEngine`) and
the reward set's worker processes (`rewards.combine.RewardSet`). One iteration reads top to bottom in `rl_loop`:

    sample prompts -> roll out k responses each -> score -> PMD update -> sync weights -> probe -> log

Everything a run writes lives in its output directory; submitting again with the same directory
resumes from the last checkpoint (a finished SFT warmup or evaluation is never redone).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.config import Recipe
from thinkrl.fileio import atomic_directory, atomic_write_json

CHECKPOINT_STATE = "state.json"


@dataclass
class Run:
    """What `prepare_run` resolved: directories, validated data, the starting model."""

    dir: Path
    base_model: Path
    tokenizer: object
    train_rows: list[dict]
    heldout_rows: list[dict]
    sft_examples: list = field(default_factory=list)
    sft_heldout: list | None = None
    sft_data_file: Path | None = None  # the warmup's data (given, or built into the run), None without warmup


def prepare_run(recipe: Recipe) -> Run:
    """Validate data and build/resolve the model before any actor starts (bad input fails here)."""
    from thinkrl.config import dump_recipe
    from thinkrl.fileio import read_jsonl, write_jsonl
    from thinkrl.models import load_tokenizer, resolve_model
    from thinkrl.tasks import arithmetic

    run_dir = Path(recipe.run.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("THINKRL_CACHE", recipe.run.cache_dir)).expanduser()
    data = recipe.data
    if data.task == "arithmetic":
        heldout = arithmetic.make_rows(data.n_heldout, seed=recipe.run.seed + 1, min_ops=data.min_ops, max_ops=data.max_ops)
        train = arithmetic.make_rows(data.n_train, seed=recipe.run.seed, min_ops=data.min_ops, max_ops=data.max_ops,
                                     exclude={r["prompt"] for r in heldout})
        write_jsonl(run_dir / "data" / "train.jsonl", train)
        write_jsonl(run_dir / "data" / "heldout.jsonl", heldout)
    else:
        fields = (data.prompt_field, data.answer_field)
        train = read_jsonl(data.train_file, required=fields)
        heldout = read_jsonl(data.heldout_file, required=fields)
        # the row's own fields first, so a numeric "answer" field still ends up as the string rewards expect
        train = [{**r, "prompt": r[data.prompt_field], "answer": str(r[data.answer_field])} for r in train]
        heldout = [{**r, "prompt": r[data.prompt_field], "answer": str(r[data.answer_field])} for r in heldout]
    _check_sampler(recipe, train)
    base_model = resolve_model(recipe.model.name_or_path, cache / "models", seed=recipe.run.seed)
    tokenizer = load_tokenizer(base_model)
    run = Run(run_dir, base_model, tokenizer, train, heldout)
    sft = recipe.sft
    if sft.enabled and not sft.data_file and data.task != "arithmetic":
        raise ValueError(f"{recipe.run.output_dir}: sft.enabled needs sft.data_file when data.task is 'files'")
    if sft.enabled:
        # without a data file, the warmup data is built into the run (below, once)
        run.sft_data_file = Path(sft.data_file) if sft.data_file else run_dir / "data" / "sft-cot" / "data.jsonl"
    if sft.enabled and not (run_dir / "checkpoints" / "sft" / "config.json").exists():
        from sft.train import build_arithmetic_sft_data, load_sft_examples

        if not sft.data_file:
            # the warmup data goes through the dataset builder (python -m sft.build_cot) with the
            # programmatic teacher, unverified: its slips are part of the recipe
            sft_prompts = arithmetic.make_rows(sft.n_examples, seed=recipe.run.seed + 2, min_ops=data.min_ops,
                                               max_ops=data.max_ops, exclude={r["prompt"] for r in heldout})
            run.sft_data_file = build_arithmetic_sft_data(sft_prompts, run.sft_data_file.parent, recipe.run.seed,
                                                          sft.slip_rate, sft.fix_rate, log=print)
        sft = sft.model_copy(update={"data_file": str(run.sft_data_file)})
        run.sft_examples, run.sft_heldout = load_sft_examples(sft, tokenizer, log=print)
    dump_recipe(recipe, run_dir / "config.yaml")
    return run


def _check_sampler(recipe: Recipe, train: list[dict]) -> None:
    """Build the sampler once here so missing or bad difficulty labels fail before any actor starts."""
    from samplers import SamplerSetupError, build_sampler

    try:
        build_sampler(recipe.sampler, train, recipe.run.seed)
    except SamplerSetupError as e:
        source = recipe.data.train_file if recipe.data.task == "files" else "the arithmetic task's train split"
        raise ValueError(f"{source}: sampler.kind={recipe.sampler.kind}: {e}") from None


# ---- evaluation ------------------------------------------------------------------------------------


def evaluate(engines, reward_set, prompts_ids: list[list[int]], rows: list[dict], recipe: Recipe, seed: int) -> dict:
    """Held-out accuracy (the reward set's correctness verdict, averaged over `eval.samples_per_prompt`
    samples per prompt) and mean response length."""
    from rollout.engine import RolloutSettings

    ev = recipe.eval
    settings = RolloutSettings(n=ev.samples_per_prompt, temperature=ev.temperature, top_p=ev.top_p,
                               max_tokens=ev.max_tokens, seed=seed)
    groups = generate(engines, prompts_ids, settings)
    verdicts = [v for g in reward_set.verdicts(reward_inputs(rows, groups), iteration=recipe.rl.iterations) for v in g]
    lengths = [len(c.token_ids) for g in groups for c in g]
    return {
        "accuracy": sum(verdicts) / len(verdicts),
        "mean_response_tokens": sum(lengths) / len(lengths),
        "n_prompts": len(prompts_ids),
        "samples_per_prompt": ev.samples_per_prompt,
    }


def reward_inputs(rows: list[dict], groups: list[list]) -> list[list]:
    """What the rewards see of each completion: its row's prompt, answer and other fields, the text, the length."""
    from rewards.types import RewardInput

    out = []
    for row, group in zip(rows, groups, strict=True):
        metadata = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        out.append([RewardInput(row["prompt"], c.text, row["answer"], len(c.token_ids), metadata) for c in group])
    return out


def generate(engines, prompts_ids: list[list[int]], settings) -> list[list]:
    """Spread prompts over the engines (contiguous shards), gather results in prompt order."""
    import dataclasses

    import ray

    shard = -(-len(prompts_ids) // len(engines))
    futures = []
    for e, engine in enumerate(engines):
        part = prompts_ids[e * shard : (e + 1) * shard]
        if part:
            seed = None if settings.seed is None else settings.seed + e * shard
            futures.append(engine.generate.remote(part, dataclasses.replace(settings, seed=seed)))
    return [group for part in ray.get(futures) for group in part]


# ---- weight sync -----------------------------------------------------------------------------------


def sync_weights(trainers, engines, sync_file: Path) -> float:
    """Push the trainer's weights into every engine; returns seconds taken."""
    import ray

    start = time.time()
    path = ray.get(trainers[0].export_weights.remote(str(sync_file)))
    ray.get([e.load_weights.remote(path) for e in engines])
    return time.time() - start


def check_old_logprobs(rl, probe_baseline: float) -> None:
    """`rl.old_logprobs=rollout` trusts vLLM's log-probs as the trainer's: refuse it where they differ."""
    if rl.old_logprobs == "rollout" and probe_baseline > rl.probe_tolerance:
        raise ValueError(
            f"rl.old_logprobs=rollout uses vLLM's log-probs as log pi_theta_i, but on identical weights they differ "
            f"from the trainer's by {probe_baseline:.1e} per token (more than rl.probe_tolerance="
            f"{rl.probe_tolerance:.0e}): set rl.old_logprobs=trainer for this model/dtype")


def probe_gap(trainers, engines, probe_ids: list[int], prompt_len: int) -> float:
    """Max over engines of the mean |vLLM - trainer| log-prob on a fixed probe sequence."""
    import ray

    trainer_lp = ray.get(trainers[0].probe_logprobs.remote(probe_ids, prompt_len))
    gaps = []
    for engine_lp in ray.get([e.prompt_logprobs.remote(probe_ids, prompt_len) for e in engines]):
        gaps.append(sum(abs(a - b) for a, b in zip(engine_lp, trainer_lp, strict=True)) / len(trainer_lp))
    return max(gaps)


# ---- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, trainers, iteration: int, state: dict) -> Path:
    """checkpoints/rl/iter_N/{hf, trainer, state.json}, written atomically; then `latest` points at it."""
    import ray

    final = run_dir / "checkpoints" / "rl" / f"iter_{iteration:06d}"
    with atomic_directory(final) as tmp:
        (tmp / "hf").mkdir()
        ray.get(trainers[0].save_hf.remote(str(tmp / "hf")))
        worker_states = ray.get([t.save_state.remote(str(tmp / "trainer")) for t in trainers])
        atomic_write_json(tmp / CHECKPOINT_STATE, {**state, "iteration": iteration, "workers": worker_states})
    atomic_write_json(run_dir / "checkpoints" / "rl" / "latest.json", {"iteration": iteration, "path": final.name})
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    import json

    pointer = run_dir / "checkpoints" / "rl" / "latest.json"
    if not pointer.exists():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["path"]
    return path if (path / CHECKPOINT_STATE).exists() else None


# ---- the loop --------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What every iteration uses: the actors, the reward set, the sampler and the fixed inputs."""

    recipe: Recipe
    run: Run
    trainers: list
    engines: list
    rewards: object
    sampler: object
    train_prompts: list[list[int]]
    settings: object
    probe_ids: list[int]
    probe_prompt_len: int
    sync_file: Path
    # the probe gap on identical weights (start-up): kernels differ between the engine and the trainer
    # (about 1e-6 for the dense float32 model on CPU, about 7e-3 for the MoE), stale weights add to it
    probe_baseline: float = 0.0

    def __post_init__(self) -> None:
        check_old_logprobs(self.recipe.rl, self.probe_baseline)


def warmup(recipe: Recipe, run: Run, log) -> tuple[Path, float | None]:
    """Run the SFT warmup unless it finished before; returns the model RL starts from and its wall time."""
    import json

    sft_dir = run.dir / "checkpoints" / "sft"
    if not recipe.sft.enabled:
        return run.base_model, None
    if not (sft_dir / "config.json").exists():
        from sft.train import run_sft

        rl = recipe.rl
        log(f"[sft] warmup: {len(run.sft_examples)} conversations, {recipe.sft.steps} steps")
        t0 = time.time()
        stats = run_sft(recipe.sft, run.sft_examples, str(run.base_model), sft_dir, recipe.run.seed,
                        rl.num_trainers, rl.zero_stage, rl.gpus_per_trainer, log=log,
                        heldout=run.sft_heldout, metrics_file=run.dir / "sft_metrics.jsonl",
                        gradient_checkpointing=rl.gradient_checkpointing)
        atomic_write_json(run.dir / "sft_stats.json", {**stats, "wall_seconds": time.time() - t0})
    stats_file = run.dir / "sft_stats.json"
    return sft_dir, json.loads(stats_file.read_text())["wall_seconds"] if stats_file.exists() else None


def start_actors(recipe: Recipe, model: Path, resume: Path | None, state: dict, log) -> tuple[list, list]:
    """The DeepSpeed trainer ranks (restored from `resume` if given) and the vLLM engines, both on `model`."""
    import ray

    from rl.trainer import PMDWorker
    from rollout.engine import EngineSettings, RolloutEngine
    from thinkrl.cluster import remote_actor, trainer_group
    from thinkrl.train_engine import DistConfig, OptimConfig

    rl, ro = recipe.rl, recipe.rollout
    optim = OptimConfig(lr=rl.lr, weight_decay=rl.weight_decay, grad_clip=rl.grad_clip)
    trainers = trainer_group(
        PMDWorker, rl.num_trainers,
        lambda rank, addr, port: (str(model), optim,
                                  DistConfig(rank, rl.num_trainers, addr, port, rl.zero_stage, rl.micro_batches_per_step,
                                             rl.gradient_checkpointing),
                                  recipe.run.seed),
        gpus_per_rank=rl.gpus_per_trainer, wait=False,  # the engines start meanwhile
    )
    engine_cls = remote_actor(RolloutEngine, num_gpus=ro.gpus_per_engine)
    engines = [
        engine_cls.remote(EngineSettings(
            model_path=str(model), seed=recipe.run.seed + e, max_model_len=ro.max_model_len,
            tensor_parallel_size=ro.tensor_parallel_size, enforce_eager=ro.enforce_eager,
            gpu_memory_utilization=ro.gpu_memory_utilization, cpu_kv_cache_gb=ro.cpu_kv_cache_gb,
            cpu_share=(e, ro.num_engines) if ro.num_engines > 1 else None,
        ))
        for e in range(ro.num_engines)
    ]
    ray.get([a.__ray_ready__.remote() for a in trainers + engines])
    if resume:
        ray.get([t.load_state.remote(str(resume / "trainer"), ws) for t, ws in zip(trainers, state["workers"], strict=True)])
        log(f"[rl] resumed from {resume} (iteration {state['iteration']})")
    return trainers, engines


def run_iteration(loop: Loop, iteration: int) -> dict:
    """One PMD iteration: sample, roll out, score, update, sync, probe. Returns the metrics record."""

    from rl.trainer import Sample
    from rollout.engine import RolloutSettings

    rl, ro, rows = loop.recipe.rl, loop.recipe.rollout, loop.run.train_rows
    times: dict[str, float] = {}

    t = time.time()
    batch = loop.sampler.next(rl.prompts_per_iteration)
    groups = generate(loop.engines, [loop.train_prompts[i] for i in batch],
                      RolloutSettings(n=rl.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                                      max_tokens=ro.max_tokens, seed=loop.recipe.run.seed * 10**7 + iteration * 10**4))
    times["time/rollout"] = time.time() - t

    t = time.time()
    scored = loop.rewards.score_groups(reward_inputs([rows[i] for i in batch], groups), iteration)
    rewards = [[s.total for s in g] for g in scored]
    correct = [[float(s.correct) for s in g] for g in scored]
    loop.sampler.observe(batch, correct)  # the samplers track success rates: correctness, not the total
    times["time/reward"] = time.time() - t

    t = time.time()
    uniform = [len(set(r)) == 1 for r in rewards]
    kept = [j for j in range(len(batch)) if not (rl.drop_uniform_groups and uniform[j])]
    samples = [Sample(loop.train_prompts[batch[j]], c.token_ids, rewards[j][s], n, c.logprobs)
               for n, j in enumerate(kept) for s, c in enumerate(groups[j])]
    stats_per_rank = update_policy(loop.trainers, samples, len(kept), loop.settings, rl)
    times["time/update"] = time.time() - t

    times["time/weight_sync"] = sync_weights(loop.trainers, loop.engines, loop.sync_file)
    t = time.time()
    gap = probe_gap(loop.trainers, loop.engines, loop.probe_ids, loop.probe_prompt_len)
    times["time/probe"] = time.time() - t
    if gap > loop.probe_baseline + rl.probe_tolerance:
        raise RuntimeError(f"after the weight sync of iteration {iteration}, vLLM's log-probs differ from "
                           f"the trainer's by {gap:.2e} on the probe: more than the {loop.probe_baseline:.1e} "
                           f"measured on identical weights at start-up + tolerance {rl.probe_tolerance:.0e} "
                           "(the engine is not serving the new weights)")

    _log_samples(loop.run.dir / "samples.jsonl", iteration, batch, groups, rewards, loop.run, rl.samples_to_log)
    flat_rewards = [r for g in rewards for r in g]
    lengths = [len(c.token_ids) for g in groups for c in g]
    stats = {k: sum(s[k] for s in stats_per_rank) / len(stats_per_rank) for k in stats_per_rank[0]} if stats_per_rank else {}
    return {
        "train/reward_mean": sum(flat_rewards) / len(flat_rewards),
        "train/accuracy": sum(c for g in correct for c in g) / len(flat_rewards),
        "train/response_tokens_mean": sum(lengths) / len(lengths),
        "train/response_tokens_max": max(lengths),
        "train/truncated_share": sum(c.finish_reason == "length" for g in groups for c in g) / len(lengths),
        **loop.rewards.metrics(),
        **{f"losses/{k}": v for k, v in stats.items()
           if k not in ("lr", "grad_norm", "logprob_gap_vllm_trainer", "time_logprobs", "time_in_trainer")},
        "optim/lr": stats.get("lr", rl.lr),
        "optim/grad_norm": stats.get("grad_norm", float("nan")),
        "sync/logprob_gap_rollout_vs_trainer": stats.get("logprob_gap_vllm_trainer", float("nan")),
        "train/uniform_reward_groups": sum(uniform),
        "train/groups_in_update": len(kept),
        "sync/probe_gap_after_sync": gap,
        **loop.sampler.metrics(),
        **times,
        "time/iteration": sum(times.values()),
        # the part of time/update spent recomputing log pi_theta_i (not added to time/iteration again)
        "time/update_logprobs": stats.get("time_logprobs", float("nan")),
        # the part of time/update the trainer ranks spend in their update call (mean over ranks)
        "time/update_in_trainer": stats.get("time_in_trainer", float("nan")),
    }


def update_policy(trainers, samples: list, num_groups: int, settings, rl) -> list[dict]:
    """PMD update on every trainer rank (each gets whole prompt groups); [] when no group is left.

    Dropping uniform-reward groups can leave fewer groups than `mini_batches` steps need: the steps
    shrink to what the groups can fill rather than failing the iteration.
    """
    import dataclasses

    import ray

    per_step = rl.micro_batches_per_step * rl.num_trainers
    steps = min(settings.mini_batches, num_groups // per_step)
    if steps == 0:
        return []
    settings = dataclasses.replace(settings, mini_batches=steps)
    shards = [[s for s in samples if s.group % rl.num_trainers == r] for r in range(rl.num_trainers)]
    return ray.get([tr.update.remote(shard, settings) for tr, shard in zip(trainers, shards, strict=True)])


def rl_loop(recipe: Recipe, run: Run, log=print) -> dict:
    """SFT warmup (if needed), evaluation, RL iterations, final evaluation; returns the report."""
    import json

    import ray

    from rewards.combine import RewardSet
    from rl.trainer import PMDSettings
    from samplers import build_sampler
    from thinkrl.chat import prompt_ids
    from thinkrl.metrics import MetricsLogger, plot_curves, truncate_jsonl

    rl, wall = recipe.rl, {}
    start_model, wall["sft"] = warmup(recipe, run, log)
    resume = latest_checkpoint(run.dir)
    state = json.loads((resume / CHECKPOINT_STATE).read_text()) if resume else {}
    t0 = time.time()
    trainers, engines = start_actors(recipe, resume / "hf" if resume else start_model, resume, state, log)
    wall["startup"] = time.time() - t0
    log(f"[rl] {rl.num_trainers} trainer rank(s) and {recipe.rollout.num_engines} vLLM engine(s) ready "
        f"in {wall['startup']:.0f}s")

    tok, system = run.tokenizer, recipe.data.system_prompt
    heldout_prompts = [prompt_ids(tok, r["prompt"], system) for r in run.heldout_rows]
    probe_ids = heldout_prompts[0] + tok("<think>Plan: check.</think>\\boxed{0}", add_special_tokens=False)["input_ids"]
    sync_dir = Path("/dev/shm") if Path("/dev/shm").is_dir() else run.dir
    sampler = build_sampler(recipe.sampler, run.train_rows, recipe.run.seed)
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    start_iter = state.get("iteration", 0)
    metrics = MetricsLogger(run.dir, resume_step=start_iter if resume else None)
    truncate_jsonl(run.dir / "samples.jsonl", "iteration", start_iter if resume else None)

    rc = recipe.reward
    with RewardSet(rc.rewards, rc.num_workers, rc.timeout_s, rc.max_consecutive_failures) as reward_set:
        loop = Loop(recipe, run, trainers, engines, reward_set, sampler,
                    [prompt_ids(tok, r["prompt"], system) for r in run.train_rows],
                    PMDSettings.from_recipe(rl),
                    probe_ids, len(heldout_prompts[0]), sync_dir / f"thinkrl-{os.getpid()}-weights.safetensors",
                    probe_gap(trainers, engines, probe_ids, len(heldout_prompts[0])))
        log(f"[rl] probe gap on identical weights: {loop.probe_baseline:.1e} (a sync may add at most "
            f"{rl.probe_tolerance:.0e})")
        if "eval_before" not in state:
            t0 = time.time()
            state["eval_before"] = evaluate(engines, reward_set, heldout_prompts, run.heldout_rows, recipe, seed=10**6)
            state["eval_before"]["wall_seconds"] = time.time() - t0
            log(f"[eval] before RL: accuracy {state['eval_before']['accuracy']:.3f}  "
                f"mean length {state['eval_before']['mean_response_tokens']:.1f} tokens")
            metrics.log(0, {"eval/accuracy": state["eval_before"]["accuracy"],
                            "eval/mean_response_tokens": state["eval_before"]["mean_response_tokens"]})
        rl_start, rl_wall = time.time(), state.get("rl_wall_seconds", 0.0)
        for iteration in range(start_iter + 1, rl.iterations + 1):
            record = run_iteration(loop, iteration)
            metrics.log(iteration, record)
            log(f"[rl] iter {iteration}/{rl.iterations}  reward {record['train/reward_mean']:.3f}  "
                f"len {record['train/response_tokens_mean']:.0f}  loss {record.get('losses/loss', 0):.4f}  "
                f"kl {record.get('losses/kl_to_prev_est', 0):.2e}  gap {record['sync/probe_gap_after_sync']:.1e}  "
                f"{record['time/iteration']:.1f}s")
            if iteration % rl.checkpoint_every == 0 or iteration == rl.iterations:
                state.update(sampler=sampler.state_dict(), rl_wall_seconds=rl_wall + time.time() - rl_start)
                save_checkpoint(run.dir, trainers, iteration, state)
        wall["rl"] = rl_wall + time.time() - rl_start
        t0 = time.time()
        state["eval_after"] = evaluate(engines, reward_set, heldout_prompts, run.heldout_rows, recipe, seed=10**6)
        state["eval_after"]["wall_seconds"] = time.time() - t0
    loop.sync_file.unlink(missing_ok=True)
    metrics.log(rl.iterations, {"eval/accuracy": state["eval_after"]["accuracy"],
                                "eval/mean_response_tokens": state["eval_after"]["mean_response_tokens"]})
    final = run.dir / "checkpoints" / "final"
    with atomic_directory(final) as tmp:
        ray.get(trainers[0].save_hf.remote(str(tmp)))
    records = metrics.records()
    metrics.close()
    plot_curves(records, run.dir / "curves.png", "iteration", {
        "reward / accuracy": ["train/reward_mean", "eval/accuracy"],
        "response length (tokens)": ["train/response_tokens_mean", "eval/mean_response_tokens"],
    })
    report = make_report(recipe, state, wall, final, run.dir)
    atomic_write_json(run.dir / "report.json", report)
    for actor in [*trainers, *engines]:
        ray.kill(actor)
    return report


def make_report(recipe: Recipe, state: dict, wall: dict, final: Path, run_dir: Path) -> dict:
    before, after = state["eval_before"], state["eval_after"]
    return {
        "accuracy_before_rl": before["accuracy"],
        "accuracy_after_rl": after["accuracy"],
        "mean_response_tokens_before_rl": before["mean_response_tokens"],
        "mean_response_tokens_after_rl": after["mean_response_tokens"],
        "n_heldout": before["n_prompts"],
        "eval_decoding": {"samples_per_prompt": recipe.eval.samples_per_prompt, "temperature": recipe.eval.temperature,
                          "top_p": recipe.eval.top_p, "max_tokens": recipe.eval.max_tokens, "seed": 10**6},
        "rl_iterations": recipe.rl.iterations,
        "wall_seconds": {**{k: v for k, v in wall.items() if v is not None},
                         "eval_before": before["wall_seconds"], "eval_after": after["wall_seconds"]},
        "final_checkpoint": str(final),
        "run_dir": str(run_dir),
    }


def _log_samples(path: Path, iteration: int, batch, groups, rewards, run: Run, n: int) -> None:
    import json

    rng = random.Random(iteration)
    with open(path, "a") as f:
        for j in rng.sample(range(len(batch)), min(n, len(batch))):
            row = run.train_rows[batch[j]]
            f.write(json.dumps({"iteration": iteration, "prompt": row["prompt"], "answer": row["answer"],
                                "response": groups[j][0].text, "reward": rewards[j][0]}) + "\n")


_TERMINATED: list[int] = []  # the signal that stopped the run, if one did


def _exit_on_sigterm(signum, frame):
    _TERMINATED.append(signum)
    print("[rl] terminated (SIGTERM): shutting down; the last checkpoint is intact, submit again to resume",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)  # inside ray.get, Ray turns any signal into SystemExit(1): main maps it back


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="thinkrl RL run (SFT warmup, then policy mirror descent)")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.iterations=10")
    args = parser.parse_args(argv)

    from thinkrl.cluster import init_ray
    from thinkrl.config import RecipeError, load_recipe
    from thinkrl.fileio import DataError

    try:
        recipe = load_recipe(Recipe, args.recipe, args.overrides)
        run = prepare_run(recipe)
    except (RecipeError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray()
    # a kill (SIGTERM: `ray job stop`, a scheduler, `kill`) unwinds like an exception: the reward pool
    # closes and ray.shutdown() below takes the actors (vLLM, trainers) and a local cluster down with it.
    # Set after ray.init, which installs a handler of its own that aborts the process.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    start = time.time()
    import ray

    from rewards.types import RewardPluginError

    failure = None
    try:
        report = rl_loop(recipe, run, log=lambda msg: print(msg, flush=True))
    except RewardPluginError as e:
        failure = e
    except SystemExit:
        if not _TERMINATED:
            raise
        return 128 + _TERMINATED[0]  # after the finally clause's shutdown
    finally:
        # disconnect first: log lines of the killed actors (vLLM's shutdown warnings) are forwarded
        # asynchronously and must not land after the run directory, which is the output's last line
        ray.shutdown()
    if failure:
        print(f"error: {failure} (the last checkpoint is intact; fix the reward and submit again to resume)",
              file=sys.stderr)
        return 3
    print(f"[done] held-out accuracy {report['accuracy_before_rl']:.3f} -> {report['accuracy_after_rl']:.3f}  "
          f"mean length {report['mean_response_tokens_before_rl']:.1f} -> {report['mean_response_tokens_after_rl']:.1f} "
          f"tokens  ({report['n_heldout']} problems)  total {time.time() - start:.0f}s", flush=True)
    print(run.dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
