"""Set-up of an RL run: validate everything before anything starts, then start the actors and build the loop.

`prepare` fails in seconds on a bad recipe, data file or sampler label (naming the file, row and key);
`start_actors` starts the DeepSpeed trainer ranks and the vLLM engines together; `build_loop` resolves
the recipe into the plain `rl.loop.Loop` the iterations use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rewards.combine import RewardSet
    from rl.config import Recipe
    from rl.loop import Loop
    from sft.train import Warmup
    from thinkrl.run import Run


def prepare(recipe: Recipe) -> tuple[Run, Warmup | None]:
    """The run directory, prompts and model (`thinkrl.run.prepare_run`), the sampler checked on the train
    rows, the SFT warmup's data (built once), and the resolved recipe written to `config.yaml`."""
    from sft.train import prepare_warmup
    from thinkrl.config import dump_recipe
    from thinkrl.run import prepare_run

    run = prepare_run(recipe.run, recipe.model, recipe.data)
    check_sampler(recipe, run.train_rows)
    warmup = prepare_warmup(recipe.sft, recipe.data, recipe.run.seed, run)
    dump_recipe(recipe, run.dir / "config.yaml")
    return run, warmup


def check_sampler(recipe: Recipe, train: list[dict]) -> None:
    """Build the sampler once here so missing or bad difficulty labels fail before any actor starts."""
    from samplers import SamplerSetupError, build_sampler

    try:
        build_sampler(recipe.sampler, train, recipe.run.seed)
    except SamplerSetupError as e:
        source = recipe.data.train_file if recipe.data.task == "files" else "the arithmetic task's train split"
        raise ValueError(f"{source}: sampler.kind={recipe.sampler.kind}: {e}") from None


# the roles as a message names them: the recipe keys that size them
TRAINER_ROLE = "rl trainer ranks (rl.num_trainers x rl.cpus_per_trainer, gpus_per_trainer, trainer_resources)"
ENGINE_ROLE = "rollout engines (rollout.num_engines x rollout.cpus_per_engine, gpus_per_engine, engine_resources)"


def check_cluster(recipe: Recipe) -> None:
    """Both roles against the cluster's nodes, before anything starts (`thinkrl.cluster.check_fits`)."""
    from thinkrl.cluster import check_fits, cluster_nodes

    nodes = cluster_nodes()
    check_fits(TRAINER_ROLE, recipe.rl.num_trainers, trainer_resources(recipe), nodes)
    check_fits(ENGINE_ROLE, recipe.rollout.num_engines, engine_resources(recipe), nodes)


def start_actors(recipe: Recipe, model: Path, resume: Path | None, run_dir: Path) -> tuple[list, list]:
    """The DeepSpeed trainer ranks (restored from checkpoint `resume` if given) and the vLLM engines, on
    `model`; every rank must see `run_dir` (`check_shared_storage`)."""
    import ray

    from rl.trainer import PMDWorker
    from thinkrl.cluster import check_shared_storage, place, trainer_group
    from thinkrl.train_engine import DistConfig, OptimConfig

    rl, ro = recipe.rl, recipe.rollout
    # both roles are checked against the cluster before either starts
    engine_group = place(ENGINE_ROLE, ro.num_engines, engine_resources(recipe),
                         "SPREAD" if ro.placement == "spread" else "PACK")
    optim = OptimConfig(lr=rl.lr, weight_decay=rl.weight_decay, grad_clip=rl.grad_clip, frozen=recipe.model.frozen,
                        optimizer=rl.optimizer)
    trainers = trainer_group(
        PMDWorker, rl.num_trainers,
        lambda rank, addr, port: (str(model), optim, DistConfig(rank, rl.num_trainers, addr, port, rl.zero_stage,
                                                                rl.gradient_checkpointing), recipe.run.seed),
        resources=trainer_resources(recipe), wait=False, role=TRAINER_ROLE,
    )  # the engines start meanwhile
    engines = [start_engine(recipe, model, e, engine_group, wait=False) for e in range(ro.num_engines)]
    ray.get([a.__ray_ready__.remote() for a in trainers + engines])
    check_shared_storage(trainers, run_dir, "rl trainer rank")
    if resume:
        ray.get([t.load_state.remote(str(resume / "trainer")) for t in trainers])
    return trainers, engines


def trainer_resources(recipe: Recipe):
    """What each trainer rank reserves (`thinkrl.cluster.Resources`)."""
    from thinkrl.cluster import Resources

    rl = recipe.rl
    return Resources(rl.cpus_per_trainer, rl.gpus_per_trainer, dict(rl.trainer_resources))


def engine_resources(recipe: Recipe):
    """What each engine reserves (`thinkrl.cluster.Resources`)."""
    from thinkrl.cluster import Resources

    ro = recipe.rollout
    return Resources(ro.cpus_per_engine, ro.gpus_per_engine, dict(ro.engine_resources))


def start_engine(recipe: Recipe, model: Path, index: int, group=None, wait: bool = True):
    """vLLM engine number `index` of the recipe's engines, on `model`, in bundle `index` of the engines'
    placement group `group` if there is one (ready, unless `wait` is False)."""
    import ray

    from rollout.engine import EngineSettings, RolloutEngine
    from thinkrl.cluster import in_group, remember_group, remote_actor

    ro = recipe.rollout
    engine = remote_actor(RolloutEngine, resources=engine_resources(recipe)).options(**in_group(group, index)).remote(EngineSettings(
        model_path=str(model), seed=recipe.run.seed + index, max_model_len=ro.max_model_len,
        tensor_parallel_size=ro.tensor_parallel_size, enforce_eager=ro.enforce_eager,
        gpu_memory_utilization=ro.gpu_memory_utilization, cpu_kv_cache_gb=ro.cpu_kv_cache_gb,
        cpu_share=(index, ro.num_engines) if ro.num_engines > 1 else None, cpu_weights=ro.cpu_weights,
    ))
    remember_group(engine, group)
    if wait:
        ray.get(engine.__ray_ready__.remote())
    return engine


def start_engines(recipe: Recipe, model: Path) -> list:
    """All the recipe's vLLM engines on `model` (`start_engine` each, in one placement group), ready: for the
    commands that only generate (`thinkrl eval`, `thinkrl long2short`). Free them with `thinkrl.cluster.release`."""
    import ray

    from thinkrl.cluster import place

    ro = recipe.rollout
    group = place(ENGINE_ROLE, ro.num_engines, engine_resources(recipe), "SPREAD" if ro.placement == "spread" else "PACK")
    engines = [start_engine(recipe, model, e, group, wait=False) for e in range(ro.num_engines)]
    ray.get([e.__ray_ready__.remote() for e in engines])
    return engines


def heldout_prompts(recipe: Recipe, run: Run) -> list[list[int]]:
    from thinkrl.chat import row_prompt_ids

    return [row_prompt_ids(run.tokenizer, r, recipe.data.system_prompt) for r in run.heldout_rows]


def build_loop(recipe: Recipe, run: Run, trainers: list, engines: list, reward_set: RewardSet, state: dict) -> Loop:
    """The loop's settings and inputs, the sampler (restored from `state`), and the probe measured on the
    identical weights the trainer and the engines start from."""
    from rl.loop import Loop, LoopSettings
    from rl.sync import Probe, check_image_expansion, check_old_logprobs, probe_gap
    from samplers import build_sampler
    from thinkrl.chat import row_prompt_ids
    from thinkrl.vl.inputs import ImageStore

    tok, rl = run.tokenizer, recipe.rl
    images = ImageStore()
    # the probe's prompt: the first held-out row with images if there is one (the vision path is then
    # checked at start-up and after every sync), else the first
    row = next((r for r in run.heldout_rows if r.get("images")), run.heldout_rows[0])
    probe_prompt = row_prompt_ids(tok, row, recipe.data.system_prompt)
    probe_images = images.get(row.get("images") or []) or None
    if probe_images:
        check_image_expansion(trainers, engines, probe_prompt, probe_images)
    probe_ids = probe_prompt + tok("<think>Plan: check.</think>\\boxed{0}", add_special_tokens=False)["input_ids"]
    # kernels differ between engine and trainer: ~1e-6 per token for the dense float32 model on CPU, ~1e-7 for the MoE
    baseline = probe_gap(trainers, engines, probe_ids, len(probe_prompt), probe_images)
    probe = Probe(probe_ids, len(probe_prompt), baseline, rl.probe_tolerance, probe_images)
    check_old_logprobs(rl.old_logprobs, probe.baseline, rl.probe_tolerance)
    sampler = build_sampler(recipe.sampler, run.train_rows, recipe.run.seed)
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    settings = LoopSettings.from_recipe(recipe)
    buffer = settings.replay_buffer()
    if "replay_buffer" in state:  # the unfinished trajectories of the checkpoint continue
        buffer.load_state_dict(state["replay_buffer"])
    return Loop(settings, trainers, engines, reward_set, sampler, run.train_rows,
                [row_prompt_ids(tok, r, recipe.data.system_prompt) for r in run.train_rows], probe,
                run.dir / "samples.jsonl", images, buffer,
                lambda ids: tok.batch_decode(ids, skip_special_tokens=True))
