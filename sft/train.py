"""Long-CoT SFT warmup: `python -m sft.train recipe.yaml [key=value ...]` (or as the first stage of rl.train).

Reads ChatML conversations, trains the full model through DeepSpeed (ZeRO stage from the recipe) on
assistant tokens only, and writes a Hugging Face checkpoint atomically to `<output_dir>/checkpoints/sft`.

The loop, top to bottom: for each step take the next `batch_size` examples of a seeded stream, pack
them (or pad them) on every rank, accumulate gradients over micro-batches, clip, step the schedule;
every `eval_every` steps compute the held-out loss; every `save_every` steps write a resumable DeepSpeed
checkpoint to `<out_dir>-state/step_N` (atomically; the previous one is removed after). A killed warmup
restarts from its last checkpoint and continues the same example stream by step number; a finished
one (the HF folder exists) is never redone. An optional second stage re-warms the learning rate and
trains at a longer context (the k1.5 recipe's 32K -> 128K), with its own packing budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sft.config import SFTConfig, TrainerResources
from thinkrl.fileio import atomic_directory, atomic_write_json
from thinkrl.metrics import truncate_jsonl
from thinkrl.tasks.arithmetic import NO_RECHECKS, Rechecks


def optim_config(sft: SFTConfig, frozen: tuple[str, ...] = ()):
    """The TrainEngine optimizer/schedule of a warmup (both stages); `frozen`: parameter prefixes not trained."""
    from thinkrl.train_engine import OptimConfig

    s2 = sft.second_stage
    return OptimConfig(lr=sft.lr, weight_decay=sft.weight_decay, grad_clip=sft.grad_clip,
                       warmup_steps=sft.warmup_steps, total_steps=sft.steps, min_lr_ratio=sft.min_lr_ratio,
                       decay=sft.schedule,
                       stages=((s2.steps, s2.lr, s2.min_lr, s2.warmup_steps),) if s2 else (), frozen=frozen,
                       optimizer=sft.optimizer)


def _latest_state(state_root: Path) -> tuple[int, Path] | None:
    pointer = state_root / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    path = state_root / info["path"]
    return (int(info["step"]), path) if path.is_dir() else None


def _save_state(workers, state_root: Path, step: int) -> None:
    import ray

    previous = _latest_state(state_root)
    final = state_root / f"step_{step:07d}"
    with atomic_directory(final) as tmp:
        ray.get([w.save_state.remote(str(tmp)) for w in workers])
    atomic_write_json(state_root / "latest.json", {"step": step, "path": final.name})
    if previous and previous[1] != final:
        shutil.rmtree(previous[1], ignore_errors=True)


def _heldout_loss(workers, heldout, per_rank: int, budget: int | None, layout: str) -> float:
    import ray

    nll, tokens = 0.0, 0
    for start in range(0, len(heldout), per_rank * len(workers)):
        chunk = heldout[start : start + per_rank * len(workers)]
        parts = [chunk[r * per_rank : (r + 1) * per_rank] for r in range(len(workers))]
        # every rank runs a forward (ZeRO-3 gathers parameters collectively); a rank past the end of the
        # held-out set repeats the first example and its numbers are dropped
        results = ray.get([w.eval_sums.remote(p or chunk[:1], budget, layout) for w, p in zip(workers, parts, strict=True)])
        for part, (s, n) in zip(parts, results, strict=True):
            if part:
                nll, tokens = nll + s, tokens + n
    return nll / max(1, tokens)


@dataclass
class _Progress:
    """What the warmup has done so far: losses, tokens, padding, the last held-out loss."""

    start: float
    losses: list[float]
    loss_tokens: int = 0
    input_tokens: int = 0
    slots: int = 0
    eval_loss: float = float("nan")

    def add(self, results: list[dict]) -> None:
        self.losses.append(sum(r["loss"] for r in results) / len(results))
        self.loss_tokens += sum(r["tokens"] for r in results)
        self.input_tokens += sum(r["input_tokens"] for r in results)
        self.slots += sum(r["slots"] for r in results)

    def record(self, step: int, stage: int, lr: float, every: int, evaluated: bool) -> dict:
        recent = self.losses[-every:]
        record = {"step": step, "stage": stage, "loss": sum(recent) / len(recent), "lr": lr,
                  "tokens_per_s": self.input_tokens / (time.time() - self.start),
                  "non_padding_share": self.input_tokens / max(1, self.slots)}
        return {**record, "eval_loss": self.eval_loss} if evaluated else record

    def stats(self, start_step: int) -> dict[str, float]:
        elapsed = max(1e-9, time.time() - self.start)
        return {"sft_final_loss": self.losses[-1] if self.losses else float("nan"), "sft_eval_loss": self.eval_loss,
                "sft_tokens_per_s": self.input_tokens / elapsed, "sft_loss_tokens_per_s": self.loss_tokens / elapsed,
                "sft_non_padding_share": self.input_tokens / max(1, self.slots), "sft_resumed_from_step": start_step}


def run_sft(sft, examples, model_path: str, out_dir: Path, seed: int,
            num_trainers: int = 1, zero_stage: int = 1, resources=None,
            log=print, *, heldout: list | None = None, metrics_file: Path | None = None,
            gradient_checkpointing: bool = False, frozen: tuple[str, ...] = ()) -> dict[str, float]:
    """Train on `examples` (EncodedConversation list) and save the result to `out_dir`. Returns stats.

    `heldout`: examples for the periodic eval loss (default: a seeded `sft.eval_fraction` of `examples`).
    Resumes from `<out_dir>-state` if a previous run of the same warmup left a checkpoint there.
    `metrics_file`: JSONL of per-log-step records (appended). Returns final loss, eval loss, tokens/s,
    the non-padding share of the batches, and the step it resumed from.
    """
    import ray

    from sft.data import batch_stream
    from sft.worker import SFTWorker
    from thinkrl.cluster import check_shared_storage, release

    out_dir, state_root = Path(out_dir), Path(out_dir).with_name(Path(out_dir).name + "-state")
    stages, heldout = _stages(sft, examples, heldout, seed)
    zero = sft.zero_stage if sft.zero_stage is not None else zero_stage
    checkpointing = sft.gradient_checkpointing if sft.gradient_checkpointing is not None else gradient_checkpointing
    workers = _start_workers(sft, model_path, seed, num_trainers, zero, resources, checkpointing, frozen)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_shared_storage(workers, out_dir.parent, "sft trainer rank")
    start_step = _resume(workers, state_root, log)
    if metrics_file:  # what was logged after the state it resumes from is logged again
        truncate_jsonl(Path(metrics_file), "step", start_step or None)
    per_rank = max(sft.micro_batches, sft.batch_size // num_trainers)
    progress, step, offset = _Progress(time.time(), []), start_step, 0
    for stage, (stage_steps, max_len, chosen) in enumerate(stages, 1):
        budget = max_len if sft.packing else None
        first = max(0, step - offset)
        stream = batch_stream(chosen, per_rank * num_trainers, seed + stage - 1, start_step=first)
        for _ in range(first, stage_steps):
            batch, step = next(stream), step + 1
            step_tokens = SFTWorker.loss_tokens(batch)  # the loss is the mean over all ranks' assistant tokens
            results = ray.get([w.train_step.remote(batch[r * per_rank : (r + 1) * per_rank], budget, sft.packing_layout,
                                                   step_tokens) for r, w in enumerate(workers)])
            progress.add(results)
            evaluated = bool(heldout) and (step % sft.eval_every == 0 or step == sft.total_steps)
            if evaluated:
                progress.eval_loss = _heldout_loss(workers, heldout, per_rank, budget, sft.packing_layout)
            if step % sft.log_every == 0 or step == sft.total_steps or evaluated:
                _log_step(progress.record(step, stage, results[0]["lr"], sft.log_every, evaluated), sft.total_steps,
                          progress.start, metrics_file, log)
            if step % sft.save_every == 0 and step < sft.total_steps:
                _save_state(workers, state_root, step)
        offset += stage_steps
    with atomic_directory(out_dir) as tmp:
        ray.get([w.save_hf.remote(str(tmp)) for w in workers])
    release(workers)
    shutil.rmtree(state_root, ignore_errors=True)  # the finished warmup is never redone
    return progress.stats(start_step)


def _stages(sft: SFTConfig, examples: list, heldout: list | None, seed: int) -> tuple[list, list]:
    """[(steps, max_seq_len, the examples that fit)] per stage, and the held-out examples."""
    from sft.data import split_heldout

    if heldout is None:
        examples, heldout = split_heldout(examples, sft.eval_fraction, seed, cap=sft.eval_max_examples)
    specs = [(sft.steps, sft.max_seq_len)]
    if sft.second_stage:
        specs.append((sft.second_stage.steps, sft.second_stage.max_seq_len))
    stages = [(steps, max_len, [e for e in examples if len(e.input_ids) <= max_len]) for steps, max_len in specs]
    for _, max_len, chosen in stages:
        if not chosen:
            raise ValueError(f"no SFT example fits max_seq_len={max_len}")
    return stages, heldout[: sft.eval_max_examples]


def _start_workers(sft: SFTConfig, model_path: str, seed: int, num_trainers: int, zero: int,
                   resources, checkpointing: bool, frozen: tuple[str, ...] = ()) -> list:
    from sft.worker import SFTWorker
    from thinkrl.cluster import trainer_group
    from thinkrl.train_engine import DistConfig

    optim = optim_config(sft, frozen)
    return trainer_group(
        SFTWorker, num_trainers,
        lambda rank, addr, port: (model_path, optim, DistConfig(rank, num_trainers, addr, port, zero, checkpointing),
                                  seed, sft.micro_batches),
        resources=resources, role="sft trainer ranks (rl.num_trainers x rl.cpus_per_trainer, rl.gpus_per_trainer, "
        "rl.trainer_resources)",
    )


def _resume(workers: list, state_root: Path, log, tag: str = "sft") -> int:
    """Restore the last resumable state, if any; the step it was saved at (0: a fresh stage)."""
    import ray

    latest = _latest_state(state_root)
    if not latest:
        return 0
    step, path = latest
    ray.get([w.load_state.remote(str(path)) for w in workers])
    log(f"[{tag}] resumed from {path} (step {step})")
    return step


def _log_step(record: dict, total_steps: int, start: float, metrics_file: Path | None, log) -> None:
    if metrics_file:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    log(f"[sft] step {record['step']}/{total_steps}  loss {record['loss']:.4f}"
        + (f"  eval {record['eval_loss']:.4f}" if "eval_loss" in record else "")
        + f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        f"  fill {record['non_padding_share']:.3f}  {time.time() - start:.0f}s")


def load_sft_examples(sft, tokenizer, log=print, vision=None) -> tuple[list, list | None]:
    """(train, heldout or None) examples of `sft.data_file` / `sft.eval_file`, under the bad-row policy.

    Skipped rows are logged by row with their reason (the first 20) and counted. Examples are encoded
    up to the longest stage's `max_seq_len`; `run_sft` gives each stage the ones that fit it. `vision`
    (`thinkrl.vl.inputs.VisionInputs`): the model's processor, for rows with images.
    """
    from sft.data import encode_rows, load_rows

    longest = max(sft.max_seq_len, sft.second_stage.max_seq_len if sft.second_stage else 0)
    out = []
    for path in (sft.data_file, sft.eval_file):
        if path is None:
            out.append(None)
            continue
        encoded = encode_rows(tokenizer, load_rows(path), str(path), longest, bad_rows=sft.bad_rows,
                              messages_field=sft.messages_field, image_field=sft.image_field, vision=vision)
        if encoded.skipped:
            log(f"[sft] {path}: skipped {len(encoded.skipped)} bad rows (bad_rows=skip)")
            for row, reason in encoded.skipped[:20]:
                log(f"[sft]   row {row}: {reason}")
        out.append(encoded.examples)
    return out[0], out[1]


def build_task_sft_data(prompt_rows: list[dict], out_dir: Path, seed: int, slip_rate: float,
                        fix_rate: float, samples_per_row: int = 1, verify: bool = False,
                        log=print, rechecks: Rechecks = NO_RECHECKS, task: str = "arithmetic") -> Path:
    """An embedded task's warmup data through the dataset builder with the task's programmatic teacher.

    `prompt_rows` are `arithmetic.make_rows` rows, `shapes.make_rows` rows (with `images`: the shapes
    teacher) or, with `task="reasoning_gym"`, `reasoning_gym.make_rows` rows (its teachers, for the tasks
    they know). `verify=False` keeps every trace (reward 'none'): the teacher's slips are part of the
    recipe. `rechecks`: the arithmetic teacher's re-check loops (the other teachers have none: ValueError).
    Returns the `data.jsonl` path (`sft.data_file`); resumable and idempotent like every build.
    """
    from sft.build_cot import ArithmeticTeacher, Question, build_dataset
    from thinkrl.tasks.reasoning_gym import ReasoningGymTeacher
    from thinkrl.tasks.shapes import ShapesTeacher

    questions = [Question(r["id"], r["prompt"], r["answer"], list(r.get("images") or []),
                          {k: v for k, v in r.items() if k not in ("id", "prompt", "answer", "images")})
                 for r in prompt_rows]
    if rechecks.on and (task == "reasoning_gym" or any(q.images for q in questions)):
        raise ValueError(f"sft.recheck_rate, sft.teacher_mode: only the arithmetic teacher re-checks; set recheck_rate "
                         f"to 0 and teacher_mode to plain for the {task} task")
    if task == "reasoning_gym":
        teacher = ReasoningGymTeacher(slip_rate, fix_rate)
    elif any(q.images for q in questions):
        teacher = ShapesTeacher(slip_rate, fix_rate)
    else:
        teacher = ArithmeticTeacher(slip_rate, fix_rate, rechecks)
    build_dataset(questions, out_dir, teacher, k=samples_per_row, keep="all",
                  reward="math" if verify else "none", seed=seed, chunk_size=1000, reward_workers=1,
                  progress=False, log=log)
    return Path(out_dir) / "data.jsonl"


@dataclass
class Warmup:
    """The warmup's data: its file (given, or built into the run) and, unless it finished, its examples."""

    data_file: Path
    examples: list
    heldout: list | None


def prepare_warmup(sft: SFTConfig, data, seed: int, run, log=print) -> Warmup | None:
    """Validate (and for the arithmetic task, build once) the warmup's data; None when `sft.enabled` is off.

    `data` is the recipe's data section and `run` a prepared `thinkrl.run.Run`. A finished warmup (its
    Hugging Face folder exists) is not read again: its examples come back empty.
    """
    from thinkrl.tasks import arithmetic, shapes
    from thinkrl.vl import is_vl

    if not sft.enabled:
        return None
    if not sft.data_file and data.task == "files":
        raise ValueError(f"{run.dir}: sft.enabled needs sft.data_file when data.task is 'files'")
    data_file = Path(sft.data_file) if sft.data_file else run.dir / "data" / "sft-cot" / "data.jsonl"
    if (run.dir / "checkpoints" / "sft" / "config.json").exists():
        return Warmup(data_file, [], None)
    if not sft.data_file:
        # the warmup data goes through the dataset builder (python -m sft.build_cot) with the
        # programmatic teacher, unverified: its slips are part of the recipe
        if data.task == "arithmetic":
            prompts = arithmetic.make_rows(sft.n_examples, seed=seed + 2, min_ops=data.min_ops, max_ops=data.max_ops,
                                           long=data.long_problems(), exclude={r["prompt"] for r in run.heldout_rows})
        elif data.task == "reasoning_gym":
            from thinkrl.tasks import reasoning_gym

            prompts = reasoning_gym.make_rows([d.spec() for d in data.reasoning_gym.datasets], sft.n_examples, seed,
                                              "sft", exclude={r["prompt"] for r in run.heldout_rows})
        else:
            prompts = shapes.make_rows(sft.n_examples, seed=seed + 2, image_dir=run.dir / "data" / "images",
                                       min_count=data.min_count, max_count=data.max_count,
                                       max_distractors=data.max_distractors,
                                       exclude={shapes.row_key(r) for r in run.heldout_rows})
        data_file = build_task_sft_data(prompts, data_file.parent, seed, sft.slip_rate, sft.fix_rate, log=log,
                                        rechecks=sft.rechecks, task=data.task)
    vision = None
    if is_vl(run.base_model):
        from thinkrl.vl.inputs import VisionInputs

        vision = VisionInputs(run.base_model)
    examples, heldout = load_sft_examples(sft.model_copy(update={"data_file": str(data_file)}), run.tokenizer, log=log,
                                          vision=vision)
    return Warmup(data_file, examples, heldout)


def run_warmup(sft: SFTConfig, trainers: TrainerResources, warmup: Warmup | None, run, seed: int,
               log=print, frozen: tuple[str, ...] = ()) -> tuple[Path, float | None]:
    """Run the warmup unless it finished before; returns the model RL starts from and the warmup's wall time."""
    from thinkrl.cluster import Resources

    sft_dir = run.dir / "checkpoints" / "sft"
    if warmup is None:
        return run.base_model, None
    if not (sft_dir / "config.json").exists():
        log(f"[sft] warmup: {len(warmup.examples)} conversations, {sft.steps} steps")
        t0 = time.time()
        stats = run_sft(sft, warmup.examples, str(run.base_model), sft_dir, seed, trainers.num_trainers,
                        trainers.zero_stage,
                        Resources(trainers.cpus_per_trainer, trainers.gpus_per_trainer, dict(trainers.trainer_resources)),
                        log=log, heldout=warmup.heldout,
                        metrics_file=run.dir / "sft_metrics.jsonl",
                        gradient_checkpointing=trainers.gradient_checkpointing, frozen=frozen)
        atomic_write_json(run.dir / "sft_stats.json", {**stats, "wall_seconds": time.time() - t0})
    stats_file = run.dir / "sft_stats.json"
    return sft_dir, json.loads(stats_file.read_text())["wall_seconds"] if stats_file.exists() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML (its run, model, data and sft sections, and rl's trainer group)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.steps=100")
    args = parser.parse_args(argv)

    from sft.config import SFTRecipe
    from thinkrl.cluster import init_ray
    from thinkrl.config import RecipeError, dump_recipe, load_recipe
    from thinkrl.fileio import DataError
    from thinkrl.run import prepare_run

    try:
        recipe = load_recipe(SFTRecipe, args.recipe, args.overrides)
        run = prepare_run(recipe.run, recipe.model, recipe.data)
        warmup = prepare_warmup(recipe.sft, recipe.data, recipe.run.seed, run)
    except (RecipeError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warmup is None:
        print("error: sft.enabled is false: nothing to do", file=sys.stderr)
        return 2
    out = run.dir / "checkpoints" / "sft"
    if (out / "config.json").exists():
        print(f"{out}: the warmup finished before; nothing to do")
        return 0
    dump_recipe(recipe, run.dir / "sft_config.yaml")
    init_ray()
    run_warmup(recipe.sft, recipe.rl, warmup, run, recipe.run.seed, frozen=recipe.model.frozen)
    print(json.dumps(json.loads((run.dir / "sft_stats.json").read_text())))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
