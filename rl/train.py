"""RL post-training driver: `ray job submit -- python -m rl.train recipe.yaml [key=value ...]`.

The run, top to bottom (`rl_loop`): SFT warmup (unless done) -> start trainer ranks and vLLM engines
(from the last checkpoint, if any) -> evaluate -> iterations (`rl.loop.run_iteration`), a checkpoint
every `rl.checkpoint_every` -> evaluate -> final checkpoint, curves and `report.json`. Where things are:
set-up in `rl.setup`, one iteration in `rl.loop`, the trainer rank in `rl.trainer`, its step plan in
`rl.batching`, the loss in `rl.loss`, weight sync and probe in `rl.sync`, checkpoints in `rl.checkpoint`.

Everything a run writes lives in its output directory; submitting again with the same directory
resumes from the last checkpoint (a finished SFT warmup or evaluation is never redone).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rl.checkpoint import latest_checkpoint, save_checkpoint, save_final
from rl.config import Recipe
from rl.loop import Loop, run_iteration
from thinkrl.fileio import atomic_write_json

EVAL_SEED = 10**6  # every evaluation decodes with the same seed: before and after RL compare alike

if TYPE_CHECKING:
    from rewards.combine import RewardSet
    from rl.recovery import EngineRestarts
    from sft.train import Warmup
    from thinkrl.metrics import MetricsLogger
    from thinkrl.run import Run


def rl_loop(recipe: Recipe, run: Run, warmup: Warmup | None, log=print) -> dict:
    """SFT warmup (if needed), evaluation, RL iterations, final evaluation; returns the report."""
    from rl.setup import build_loop, check_cluster, heldout_prompts, start_actors
    from sft.train import run_warmup
    from thinkrl.cluster import node_addresses, release
    from thinkrl.metrics import MetricsLogger, truncate_jsonl

    check_cluster(recipe)
    start_model, sft_seconds = run_warmup(recipe.sft, recipe.rl, warmup, run, recipe.run.seed, log,
                                          frozen=recipe.model.frozen)
    resume, state = latest_checkpoint(run.dir)
    t0 = time.time()
    trainers, engines = start_actors(recipe, resume / "hf" if resume else start_model, resume, run.dir)
    if resume:
        log(f"[rl] resumed from {resume} (iteration {state['iteration']})")
    wall = {"sft": sft_seconds, "startup": time.time() - t0}
    log(f"[rl] {recipe.rl.num_trainers} trainer rank(s) and {recipe.rollout.num_engines} vLLM engine(s) ready "
        f"in {wall['startup']:.0f}s (trainer ranks on {', '.join(node_addresses(trainers))}; engines on "
        f"{', '.join(node_addresses(engines))})")
    start_iter = state.get("iteration", 0)
    # the final evaluation is logged at the last iteration's step, after its checkpoint: a run killed
    # during it evaluates again, so a record of it left from before the kill goes
    # the final evaluation is the only one logged at a checkpoint's step after the checkpoint (a periodic one,
    # eval.every, comes before its iteration's checkpoint and stays)
    final_step = resume and start_iter == recipe.rl.iterations
    metrics = MetricsLogger(run.dir, resume_step=start_iter if resume else None,
                            redone=("eval/accuracy",) if final_step else ())
    truncate_jsonl(run.dir / "samples.jsonl", "iteration", start_iter if resume else None)
    heldout = heldout_prompts(recipe, run)
    with reward_set_of(recipe, log) as reward_set:
        loop = build_loop(recipe, run, trainers, engines, reward_set, state)
        loop.restarts = engine_restarts(recipe, run.dir, start_model, loop, log)
        log(f"[rl] probe gap on identical weights: {loop.probe.baseline:.1e} (a sync may add at most "
            f"{recipe.rl.probe_tolerance:.0e})")
        if "eval_before" not in state:
            state["eval_before"] = evaluate_policy(recipe, loop, heldout, run, metrics, 0, log, "before RL")
        periodic = lambda i: evaluate_policy(recipe, loop, heldout, run, metrics, i, log, f"iteration {i}")  # noqa: E731
        wall["rl"] = iterate(recipe, loop, run.dir, state, metrics, log, periodic)
        state["eval_after"] = evaluate_policy(recipe, loop, heldout, run, metrics, recipe.rl.iterations, log,
                                              "after RL")
        state["test_time_scaling"] = test_time_scaling(recipe, loop, heldout, run, state["eval_after"], log)
    with trainers_alive(trainers, run.dir, "writing the final checkpoint"):
        report = finish(recipe, run, trainers, metrics, state, wall)
    release([*trainers, *engines])
    return report


def reward_set_of(recipe: Recipe, log) -> RewardSet:
    """The recipe's rewards, scored by worker processes beside the driver or, with `reward.hosts`, by reward
    hosts on the cluster's nodes (`rewards.cluster_pool`); closing the set closes its pool."""
    from rewards.combine import RewardSet, preload_of
    from rewards.config import resolve_specs

    rc = recipe.reward
    if not rc.hosts:
        return RewardSet(rc.rewards, rc.num_workers, rc.timeout_s, rc.max_consecutive_failures)
    from rewards.cluster_pool import ClusterRewardPool
    from thinkrl.cluster import actor_env

    pool = ClusterRewardPool(rc.hosts, rc.num_workers, rc.timeout_s, preload_of(resolve_specs(rc.rewards)),
                             dict(rc.host_resources), rc.cpus_per_host, actor_env())
    log(f"[rl] reward workers: {rc.hosts} host(s) of {rc.num_workers} on {', '.join(pool.nodes())}")
    return RewardSet(rc.rewards, rc.num_workers, rc.timeout_s, rc.max_consecutive_failures, pool=pool, close_pool=True)


def engine_restarts(recipe: Recipe, run_dir: Path, start_model: Path, loop: Loop, log) -> EngineRestarts:
    """How a dead engine is replaced: a new one on the newest model folder on disk (the last checkpoint's,
    else the run's start), then the trainer's current weights pushed into it."""
    from rl.recovery import EngineRestarts
    from rl.setup import start_engine
    from rl.sync import sync_weights
    from thinkrl.cluster import group_of

    def start(index: int):  # into the dead engine's place (its bundle of the engines' placement group)
        latest, _ = latest_checkpoint(run_dir)
        return start_engine(recipe, latest / "hf" if latest else start_model, index, group_of(loop.engines[index]))

    return EngineRestarts(start, lambda engine: sync_weights(loop.trainers, [engine]),
                          recipe.rollout.max_engine_restarts, log)


@contextmanager
def trainers_alive(trainers: list, run_dir: Path, when: str):
    """Turn the death of a trainer rank inside the block into `ActorLost`, naming the checkpoint to resume from."""
    import ray

    from rl.recovery import ActorLost, cause_of, dead_index

    try:
        yield
    except ray.exceptions.RayActorError as error:
        rank = dead_index(error, trainers)
        if rank is None:
            raise
        last = latest_checkpoint(run_dir)[1].get("iteration", 0)
        raise ActorLost(f"trainer rank {rank} died {when} ({cause_of(error)}); the run stops. Its last checkpoint is "
                        f"iteration {last}: submit the same command to resume from it") from None


def iterate(recipe: Recipe, loop: Loop, run_dir: Path, state: dict, metrics: MetricsLogger, log,
            evaluate=None) -> float:
    """The iterations after the last checkpoint, a checkpoint every `rl.checkpoint_every`; the RL wall time.

    `evaluate(iteration)` runs every `eval.every` iterations (not at the last: the final evaluation is
    that one), before the iteration's checkpoint, so a run killed after it does it again on resume.
    A trainer rank that dies ends the run with `ActorLost`, naming the checkpoint to resume from.
    """
    rl = recipe.rl
    start, before = time.time(), state.get("rl_wall_seconds", 0.0)
    for iteration in range(state.get("iteration", 0) + 1, rl.iterations + 1):
        with trainers_alive(loop.trainers, run_dir, f"in iteration {iteration}"):
            record = run_iteration(loop, iteration)
            metrics.log(iteration, record)
            log(f"[rl] iter {iteration}/{rl.iterations}  reward {record['train/reward_mean']:.3f}  "
                f"len {record['train/response_tokens_mean']:.0f}  loss {record.get('losses/loss', 0):.4f}  "
                f"kl {record.get('losses/kl_to_prev_est', 0):.2e}  gap {record['sync/probe_gap_after_sync']:.1e}  "
                f"{record['time/iteration']:.1f}s")
            every = recipe.eval.every
            if evaluate and every and iteration % every == 0 and iteration < rl.iterations:
                evaluate(iteration)
            if iteration % rl.checkpoint_every == 0 or iteration == rl.iterations:
                state.update(sampler=loop.sampler.state_dict(), replay_buffer=loop.buffer.state_dict(),
                             rl_wall_seconds=before + time.time() - start)
                save_checkpoint(run_dir, loop.trainers, iteration, state, rl.keep_checkpoints)
    return before + time.time() - start


def evaluate_policy(recipe: Recipe, loop: Loop, heldout: list[list[int]], run: Run, metrics: MetricsLogger | None,
                    step: int, log, when: str, max_tokens: int | None = None) -> dict:
    """Held-out accuracy and length with the recipe's eval decoding (the same seed every time), logged
    (`metrics` None: not logged; `max_tokens`: another budget than `eval.max_tokens`)."""
    from rl.generation import evaluate
    from rollout.engine import RolloutSettings
    from rollout.repeat import repeat_settings_of

    ev = recipe.eval
    settings = RolloutSettings(n=ev.samples_per_prompt, temperature=ev.temperature, top_p=ev.top_p,
                               max_tokens=max_tokens or ev.max_tokens, seed=EVAL_SEED,
                               repeat=repeat_settings_of(recipe.rollout.repeat))
    t0 = time.time()
    images = [loop.images.get(r.get("images") or []) for r in run.heldout_rows]
    result = loop.with_engines(lambda: evaluate(loop.engines, loop.rewards, heldout, run.heldout_rows, settings,
                                                iteration=recipe.rl.iterations, images=images), "evaluation")
    result["wall_seconds"] = time.time() - t0
    log(f"[eval] {when}: accuracy {result['accuracy']:.3f}  mean length {result['mean_response_tokens']:.1f} tokens")
    if metrics is None:
        return result
    by_task = result.get("accuracy_by_task", {})
    if by_task:
        log("[eval]   by task: " + "  ".join(f"{t} {a:.3f}" for t, a in by_task.items()))
    metrics.log(step, {"eval/accuracy": result["accuracy"], "eval/mean_response_tokens": result["mean_response_tokens"],
                       **{f"eval/accuracy/{t}": a for t, a in by_task.items()}})
    return result

def test_time_scaling(recipe: Recipe, loop: Loop, heldout: list[list[int]], run: Run, final: dict, log) -> list[dict]:
    """The policy evaluated at each of `eval.test_time_budgets` (max tokens; the final evaluation serves for
    its own budget): `[{max_tokens, accuracy, mean_response_tokens}]`, by budget."""
    points = []
    for budget in recipe.eval.test_time_budgets:
        result = final if budget == recipe.eval.max_tokens else evaluate_policy(
            recipe, loop, heldout, run, None, recipe.rl.iterations, log, f"budget {budget} tokens", max_tokens=budget)
        points.append({"max_tokens": budget, "accuracy": result["accuracy"],
                       "mean_response_tokens": result["mean_response_tokens"], "wall_seconds": result["wall_seconds"]})
    return points


def finish(recipe: Recipe, run: Run, trainers: list, metrics: MetricsLogger, state: dict, wall: dict) -> dict:
    """The final checkpoint, the curves (tts.png too with test-time budgets) and `report.json`; returns the report."""
    from thinkrl.metrics import plot_curves, plot_test_time_scaling

    final = save_final(run.dir, trainers)
    records = metrics.records()
    metrics.close()
    plot_curves(records, run.dir / "curves.png", "iteration", {
        "reward / accuracy": ["train/reward_mean", "eval/accuracy"],
        "response length (tokens)": ["train/response_tokens_mean", "eval/mean_response_tokens"],
    }, marks=level_changes(records))
    if state["test_time_scaling"]:
        plot_test_time_scaling(state["test_time_scaling"], run.dir / "tts.png",
                               f"{recipe.eval.samples_per_prompt} samples per problem, {state['eval_after']['n_prompts']} "
                               "held-out problems, after RL")
    report = make_report(recipe, state, wall, final, run.dir)
    atomic_write_json(run.dir / "report.json", report)
    return report


def make_report(recipe: Recipe, state: dict, wall: dict, final: Path, run_dir: Path) -> dict:
    before, after = state["eval_before"], state["eval_after"]
    return {
        "accuracy_before_rl": before["accuracy"],
        "accuracy_after_rl": after["accuracy"],
        "mean_response_tokens_before_rl": before["mean_response_tokens"],
        "mean_response_tokens_after_rl": after["mean_response_tokens"],
        "n_heldout": before["n_prompts"],
        **({"accuracy_by_task_before_rl": before["accuracy_by_task"], "accuracy_by_task_after_rl": after["accuracy_by_task"],
            "n_heldout_by_task": before["n_prompts_by_task"]} if "accuracy_by_task" in before else {}),
        "eval_decoding": {"samples_per_prompt": recipe.eval.samples_per_prompt, "temperature": recipe.eval.temperature,
                          "top_p": recipe.eval.top_p, "max_tokens": recipe.eval.max_tokens, "seed": EVAL_SEED},
        "test_time_scaling": state["test_time_scaling"],
        "rl_iterations": recipe.rl.iterations,
        "wall_seconds": {**{k: v for k, v in wall.items() if v is not None},
                         "eval_before": before["wall_seconds"], "eval_after": after["wall_seconds"]},
        "final_checkpoint": str(final),
        "run_dir": str(run_dir),
    }


def level_changes(records: list[dict]) -> list[tuple[int, str]]:
    """(iteration, "level L") where the curriculum's level differs from the iteration before (the first too)."""
    marks, previous = [], None
    for r in records:
        level = r.get("sampler/curriculum/level")
        if level is not None and level != previous:
            marks.append((r["iteration"], f"level {level:g}"))
            previous = level
    return marks


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

    from rl.setup import prepare
    from thinkrl.cluster import init_ray
    from thinkrl.config import RecipeError, load_recipe
    from thinkrl.fileio import DataError

    try:
        recipe = load_recipe(Recipe, args.recipe, args.overrides)
        run, warmup = prepare(recipe)
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
    from rl.recovery import ActorLost
    from thinkrl.cluster import ClusterTooSmall, StorageNotShared

    failure = lost = None
    try:
        report = rl_loop(recipe, run, warmup, log=lambda msg: print(msg, flush=True))
    except RewardPluginError as e:
        failure = e
    except ActorLost as e:
        lost = e
    except (ClusterTooSmall, StorageNotShared) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
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
    if lost:
        print(f"error: {lost}", file=sys.stderr)
        return 4
    print(f"[done] held-out accuracy {report['accuracy_before_rl']:.3f} -> {report['accuracy_after_rl']:.3f}  "
          f"mean length {report['mean_response_tokens_before_rl']:.1f} -> {report['mean_response_tokens_after_rl']:.1f} "
          f"tokens  ({report['n_heldout']} problems)  total {time.time() - start:.0f}s", flush=True)
    print(run.dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
