"""Long2short (Kimi k1.5): shorten a long-CoT model's answers, `thinkrl long2short RECIPE --method M --model DIR --out DIR`.

    thinkrl long2short recipes/tiny-long2short.yaml --method shortest --model runs/tiny-long2short/checkpoints/sft --out short-sft
    thinkrl long2short recipes/tiny-long2short.yaml --method dpo --model runs/tiny-long2short/checkpoints/sft --out short-dpo
    thinkrl eval recipes/tiny-long2short.yaml --model short-dpo --out short-dpo.json

k1.5 lists four long2short methods; `thinkrl merge` is model merging, RL with the length penalty is a recipe
(`reward.rewards: [math, {name: length, ...}]`), and this command runs the other two on any model folder:
- `shortest` (shortest rejection sampling): SFT (`sft.train.run_sft`: DeepSpeed, the recipe's packing,
  resume) on the shortest correct response of each prompt;
- `dpo`: DPO (`sft.dpo.run_dpo`) on pairs that prefer each prompt's shortest correct response to each
  longer correct one and each incorrect one (`sft.dpo.preference_pairs`).

Both start from the same sampling stage: `long2short.prompts` of the recipe's train prompts (a seeded draw),
k = `long2short.k` responses each from the model, on the recipe's vLLM engines with its RL decoding
(`rollout.temperature`, `top_p`, `max_tokens`, repeat stopping) and its prompt rendering, each verified by the
recipe's correctness reward. That is the dataset builder (`sft.build_cot.build_dataset`, keep="every": every
response with its verdict) with the engines as its teacher (`EngineTeacher`): the samples are written in
resumable chunks and the lengths are the builder's token counts. The trainer group is the recipe's
(`rl.num_trainers`, resources, ZeRO stage, as for the warmup); SFT's packing from `sft.*`.

Settings: the recipe's `long2short` section (`Long2ShortConfig`) or the flags --k, --prompts, --steps, --lr,
--batch-size, --beta (its keys). Files: `<out>` (the model, written atomically), `<out>-work/` (samples/: the
builder's output; metrics.jsonl: the training steps; report.json), `<out>-state/` (resumable trainer state,
removed when done). The same command again resumes: finished chunks are not sampled again (no engine starts
when all are done), training continues from its last state, and a finished stage only prints its report.
The report (also the last line of stdout) holds what a comparison table wants: the samples' pass rate and
length, the kept (chosen) length, the training data's size, the final training numbers, wall seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rl.config import Recipe

METHODS = ("shortest", "dpo")
FLAG_KEYS = {"k": "long2short.k", "prompts": "long2short.prompts", "steps": "long2short.steps",
             "lr": "long2short.lr", "batch_size": "long2short.batch_size", "beta": "long2short.beta"}


def load_model_recipe(recipe_path: str, overrides: list[str], flags: dict, model: str) -> tuple[Recipe, Path]:
    """(recipe, model folder) of a command that runs a recipe on a given model: `flags` ({recipe key: value or
    None}, the command's flags that are recipe keys) become overrides, so both spellings are validated alike;
    `model` is a folder (or a tiny kind's name). Raises RecipeError or ValueError naming the key or folder."""
    import os

    from thinkrl.config import load_recipe
    from thinkrl.models import resolve_model

    given = [f"{key}={value}" for key, value in flags.items() if value is not None]
    recipe = load_recipe(Recipe, recipe_path, [*overrides, *given])
    cache = Path(os.environ.get("THINKRL_CACHE", recipe.run.cache_dir)).expanduser()
    return recipe, resolve_model(model, cache / "models", seed=recipe.run.seed)


# ---- sampling ------------------------------------------------------------------------------------------


class EngineTeacher:
    """The dataset builder's `Teacher` (`sft.build_cot.Teacher`) backed by vLLM engines (Ray actors).

    Prompts are rendered by the model's chat template as RL renders them (`thinkrl.chat.prompt_ids`; image
    parts become placeholders, `sft.build_cot.split_images`) and decoded with `settings` (n = k and the seed
    per call). `start()` gives the engines; it runs at the first `sample`, so a stage whose chunks are all
    done starts none. `close` releases them.
    """

    def __init__(self, start: Callable[[], list], tokenizer, settings) -> None:
        self._start, self.tokenizer, self.settings = start, tokenizer, settings
        self.engines: list | None = None

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        from rl.generation import generate
        from sft.build_cot import split_images
        from thinkrl.chat import prompt_ids

        if self.engines is None:
            self.engines = self._start()
        ids, images = [], []
        for p, messages in enumerate(prompts):
            text_messages, own = split_images(messages, p)
            ids.append(prompt_ids(self.tokenizer, text_messages))
            images.append(own)
        settings = dataclasses.replace(self.settings, n=k, seed=seed)
        groups = generate(self.engines, ids, settings, images if any(images) else None)
        return [[c.text for c in group] for group in groups]

    def close(self) -> None:
        from thinkrl.cluster import release

        if self.engines:
            release(self.engines)
        self.engines = None


def draw_prompts(recipe: Recipe, data_dir: Path) -> list[dict]:
    """`long2short.prompts` rows of the recipe's train split (all if it has fewer), a draw seeded by run.seed."""
    from thinkrl.run import load_prompts

    train, _ = load_prompts(recipe.data, recipe.run.seed, data_dir)
    n = min(recipe.long2short.prompts, len(train))
    return [train[i] for i in random.Random(recipe.run.seed).sample(range(len(train)), n)]


def correctness_spec(recipe: Recipe) -> str:
    """The recipe's correctness reward as the dataset builder names it (`rewards.combine.correctness_reward`'s
    choice). Raises ValueError when it has options (the builder takes a reward by name only) or is missing."""
    from rewards.combine import correctness_reward
    from rewards.config import resolve_specs

    resolved = resolve_specs(recipe.reward.rewards, where="reward.rewards")
    name = correctness_reward(resolved)
    spec = next((r.spec for r in resolved if r.name == name), None)
    if spec is None:
        raise ValueError("reward.rewards: long2short needs a per-sample reward to judge correctness (math, code, ...)")
    if spec.options:
        raise ValueError(f"reward.rewards: {spec.name}: long2short verifies with the dataset builder, which takes a "
                         f"reward by name: its options {spec.options} would be lost")
    return spec.name


def sample_responses(recipe: Recipe, model: Path, tokenizer, work: Path, log=print) -> tuple[list[dict], dict]:
    """Every non-empty response of the sampling stage (the builder's rows: `id`, `sample_index`, `messages`,
    `num_tokens`, `verified`, ...) and the builder's stats. Resumable in `work/samples`."""
    from rl.setup import start_engines
    from rollout.engine import RolloutSettings
    from rollout.repeat import repeat_settings_of
    from sft.build_cot import Question, build_dataset
    from thinkrl.fileio import atomic_write_text, read_jsonl

    l2s, ro = recipe.long2short, recipe.rollout
    rows = draw_prompts(recipe, work / "data")
    check_context(recipe, rows, tokenizer, ro.max_tokens, "rollout.max_tokens")
    questions = [Question(f"p{i}", r["prompt"], r["answer"], list(r.get("images") or []),
                          {k: v for k, v in r.items() if k not in ("id", "prompt", "answer", "images")})
                 for i, r in enumerate(rows)]
    # the builder's templates: the bare prompt as RL shows it, under the recipe's system prompt
    atomic_write_text(work / "templates" / "system.txt", recipe.data.system_prompt or "")
    atomic_write_text(work / "templates" / "user.txt", "{question}")
    settings = RolloutSettings(temperature=ro.temperature, top_p=ro.top_p, max_tokens=ro.max_tokens,
                               repeat=repeat_settings_of(ro.repeat))
    teacher = EngineTeacher(lambda: start_engines(recipe, model), tokenizer, settings)
    fingerprint = {"model": str(model.resolve()), "prompts": len(rows), "data": recipe.data.model_dump(mode="json"),
                   "decoding": dataclasses.asdict(settings)}
    try:
        stats = build_dataset(questions, work / "samples", teacher, k=l2s.k, keep="every", reward=correctness_spec(recipe),
                              seed=recipe.run.seed, chunk_size=l2s.chunk_size, reward_workers=recipe.reward.num_workers,
                              reward_timeout_s=recipe.reward.timeout_s, tokenizer=tokenizer,
                              system_template=work / "templates" / "system.txt",
                              user_template=work / "templates" / "user.txt", fingerprint=fingerprint,
                              progress=sys.stderr.isatty(), log=log)  # a bar on a terminal
    finally:
        teacher.close()
    if not stats["traces_kept"]:
        raise ValueError(f"{model}: every one of the {stats['traces_sampled']} sampled responses is empty")
    return read_jsonl(work / "samples" / "data.jsonl"), stats


def check_context(recipe: Recipe, rows: list[dict], tokenizer, max_tokens: int, key: str) -> None:
    """The longest prompt plus `max_tokens` must fit the engines' context (rollout.max_model_len); ValueError
    naming `key` otherwise, before any engine starts."""
    from thinkrl.chat import row_prompt_ids

    longest = max(len(row_prompt_ids(tokenizer, r, recipe.data.system_prompt)) for r in rows)
    if longest + max_tokens > recipe.rollout.max_model_len:
        raise ValueError(f"{key} ({max_tokens}) + the longest prompt ({longest} tokens) exceed rollout.max_model_len "
                         f"({recipe.rollout.max_model_len})")


# ---- training data -------------------------------------------------------------------------------------


def by_prompt(rows: list[dict]) -> list[list[int]]:
    """Indices of `rows` grouped by prompt (`id`), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["id"], []).append(i)
    return list(groups.values())


def shortest_rows(rows: list[dict]) -> list[int]:
    """The shortest verified response of each prompt (indices of `rows`): shortest rejection sampling's data,
    and DPO's chosen responses (`sft.dpo.shortest_correct`)."""
    from sft.dpo import shortest_correct

    out = []
    for group in by_prompt(rows):
        best = shortest_correct([rows[i]["num_tokens"] for i in group], [rows[i]["verified"] for i in group])
        if best is not None:
            out.append(group[best])
    return out


def pair_rows(rows: list[dict]) -> list[tuple[int, int]]:
    """DPO's (chosen, rejected) pairs over all prompts, as indices of `rows` (`sft.dpo.preference_pairs`)."""
    from sft.dpo import preference_pairs

    out = []
    for group in by_prompt(rows):
        pairs = preference_pairs([rows[i]["num_tokens"] for i in group], [rows[i]["verified"] for i in group])
        out += [(group[c], group[r]) for c, r in pairs]
    return out


def encode(rows: list[dict], indices: list[int], recipe: Recipe, tokenizer, model: Path, source: str,
           log) -> dict[int, object]:
    """{row index: EncodedConversation} of the chosen rows as conversations (the recipe's system prompt, the
    prompt, the response), loss on the response; a row over rollout.max_model_len tokens is left out (logged)."""
    from sft.data import encode_rows
    from thinkrl.vl import is_vl

    vision = None
    if is_vl(model):
        from thinkrl.vl.inputs import VisionInputs

        vision = VisionInputs(model)
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    conversations = [{"messages": system + rows[i]["messages"], "images": rows[i].get("images") or []} for i in indices]
    encoded = encode_rows(tokenizer, conversations, source, recipe.rollout.max_model_len, bad_rows="skip", vision=vision)
    skipped = {row - 1 for row, _ in encoded.skipped}
    if skipped:
        log(f"[long2short] {len(skipped)} responses left out: {encoded.skipped[0][1]} (the first)")
    kept = [i for n, i in enumerate(indices) if n not in skipped]
    return dict(zip(kept, encoded.examples, strict=True))


# ---- the stage -----------------------------------------------------------------------------------------


def trainer_args(recipe: Recipe) -> dict:
    """The trainer group of the recipe (as the warmup uses it): run_sft / run_dpo keyword arguments."""
    from thinkrl.cluster import Resources

    rl, sft = recipe.rl, recipe.sft
    return dict(num_trainers=rl.num_trainers, resources=Resources(rl.cpus_per_trainer, rl.gpus_per_trainer,
                                                                  dict(rl.trainer_resources)),
                zero_stage=sft.zero_stage if sft.zero_stage is not None else rl.zero_stage,
                gradient_checkpointing=(sft.gradient_checkpointing if sft.gradient_checkpointing is not None
                                        else rl.gradient_checkpointing), frozen=recipe.model.frozen)


def data_summary(method: str, rows: list[dict]) -> dict:
    """What a method trains on, from the sampled rows: the examples or pairs, and the chosen responses' mean
    length (the length the method teaches), before any is left out for length (`encode`)."""
    if method == "shortest":
        chosen = shortest_rows(rows)
        summary = {"train_examples": len(chosen)}
    else:
        pairs = pair_rows(rows)
        chosen = sorted({c for c, _ in pairs})
        summary = {"pairs": len(pairs), "pair_prompts": len(chosen),
                   "rejected_mean_tokens": sum(rows[r]["num_tokens"] for _, r in pairs) / len(pairs) if pairs else None}
    mean = sum(rows[i]["num_tokens"] for i in chosen) / len(chosen) if chosen else None
    return {**summary, "chosen_mean_tokens": mean}


def fine_tune_config(recipe: Recipe):
    """The recipe's `sft` section with the fine-tune's schedule (`long2short.*`): what both methods train with
    (SFT directly; DPO through its optimizer, `sft.train.optim_config`). One stage, at the engines' context."""
    l2s = recipe.long2short
    return recipe.sft.model_copy(update=dict(
        steps=l2s.steps, batch_size=l2s.batch_size, lr=l2s.lr, warmup_steps=l2s.warmup_steps,
        min_lr_ratio=l2s.min_lr_ratio, micro_batches=l2s.micro_batches, save_every=l2s.save_every,
        log_every=l2s.log_every, eval_every=l2s.steps, max_seq_len=recipe.rollout.max_model_len, second_stage=None))


def train_shortest(recipe: Recipe, rows: list[dict], model: Path, out: Path, tokenizer, work: Path,
                   log) -> dict:
    """SFT (`sft.train.run_sft`) on each prompt's shortest correct response, into `out`; run_sft's stats."""
    from sft.train import run_sft

    l2s = recipe.long2short
    chosen = shortest_rows(rows)
    if not chosen:
        raise ValueError(f"{model}: no prompt has a correct response among its {l2s.k} samples: nothing to train on")
    examples = encode(rows, chosen, recipe, tokenizer, model, str(work / "samples" / "data.jsonl"), log)
    log(f"[long2short] shortest: SFT on the shortest correct response of {len(examples)} prompts, {l2s.steps} steps")
    return run_sft(fine_tune_config(recipe), list(examples.values()), str(model), out, recipe.run.seed, log=log,
                   metrics_file=work / "metrics.jsonl", **trainer_args(recipe))


def train_dpo(recipe: Recipe, rows: list[dict], model: Path, out: Path, tokenizer, work: Path,
              log) -> dict:
    """DPO (`sft.dpo.run_dpo`) on (shortest correct, longer or incorrect) pairs, into `out`; run_dpo's stats."""
    from sft.dpo import DPOSettings, run_dpo
    from sft.train import optim_config

    l2s = recipe.long2short
    pairs = pair_rows(rows)
    if not pairs:
        raise ValueError(f"{model}: no prompt has a correct response and a longer or incorrect one among its {l2s.k} "
                         "samples: no preference pair")
    encoded = encode(rows, sorted({i for pair in pairs for i in pair}), recipe, tokenizer, model,
                     str(work / "samples" / "data.jsonl"), log)
    index = {row: n for n, row in enumerate(encoded)}
    pairs = [(index[c], index[r]) for c, r in pairs if c in index and r in index]
    settings = DPOSettings(steps=l2s.steps, batch_size=l2s.batch_size, beta=l2s.beta, micro_batches=l2s.micro_batches,
                           save_every=l2s.save_every, log_every=l2s.log_every)
    trainers = trainer_args(recipe)
    optim = optim_config(fine_tune_config(recipe), trainers.pop("frozen"))
    log(f"[long2short] dpo: {len(pairs)} pairs, beta {l2s.beta}, {l2s.steps} steps")
    return run_dpo(settings, optim, list(encoded.values()), pairs, str(model), out, recipe.run.seed, log=log,
                   metrics_file=work / "metrics.jsonl", **trainers)


def run_stage(recipe: Recipe, method: str, model: Path, out: Path, log=print) -> dict:
    """Sample, then train with `method` (see the module docstring); returns the report (`<out>-work/report.json`).

    Ray must be initialised. A stage that trained before is not trained again (its report is written if a
    kill came between the two); one that finished returns its report at once. ValueError when `out` holds
    the other method's stage.
    """
    from thinkrl.fileio import atomic_write_json
    from thinkrl.models import load_tokenizer

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "dpo" and recipe.long2short.k < 2:
        raise ValueError("long2short.k: dpo pairs responses to one prompt: it needs k >= 2")
    work = out.with_name(out.name + "-work")
    done = work / "train.json"  # {method, stats}: written once the model is
    if done.is_file() and (earlier := json.loads(done.read_text())["method"]) != method:
        raise ValueError(f"--out {out} holds a finished '{earlier}' stage, not '{method}': choose another --out")
    if (out / "config.json").is_file() and (work / "report.json").is_file():
        log(f"[long2short] {out}: finished before; nothing to do")
        return json.loads((work / "report.json").read_text())
    t0 = time.time()
    tokenizer = load_tokenizer(model)
    rows, stats = sample_responses(recipe, model, tokenizer, work, log)
    sampling, t1 = time.time() - t0, time.time()
    if not (done.is_file() and (out / "config.json").is_file()):
        train = train_shortest if method == "shortest" else train_dpo
        atomic_write_json(done, {"method": method, "stats": train(recipe, rows, model, out, tokenizer, work, log)})
    l2s = recipe.long2short
    report = {"method": method, "model": str(model), "out": str(out), "k": l2s.k, "prompts": stats["questions_in"],
              "sample_pass_rate": stats["pass_rate_mean"], "sample_mean_tokens": stats["lengths_sampled"].get("mean"),
              "prompts_with_correct": sum(1 for g in by_prompt(rows) if any(rows[i]["verified"] for i in g)),
              **data_summary(method, rows), "train": json.loads(done.read_text())["stats"],
              "settings": l2s.model_dump(),
              "wall_seconds": {"sampling": sampling, "training": time.time() - t1, "total": time.time() - t0}}
    atomic_write_json(work / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML: prompts, reward, decoding, engines, trainer group, long2short")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. long2short.save_every=10")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="shortest: SFT on the shortest correct samples; dpo: DPO, shortest correct preferred")
    parser.add_argument("--model", required=True, help="the long model: a Hugging Face folder")
    parser.add_argument("--out", required=True, help="the shortened model's folder (written atomically)")
    parser.add_argument("--k", type=int, help="long2short.k: responses sampled per prompt")
    parser.add_argument("--prompts", type=int, help="long2short.prompts: train prompts sampled from")
    parser.add_argument("--steps", type=int, help="long2short.steps: optimizer steps")
    parser.add_argument("--lr", type=float, help="long2short.lr: peak learning rate")
    parser.add_argument("--batch-size", type=int, help="long2short.batch_size: examples or pairs per step")
    parser.add_argument("--beta", type=float, help="long2short.beta: DPO's beta")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides

    from thinkrl.cluster import ClusterTooSmall, StorageNotShared, init_ray
    from thinkrl.config import RecipeError
    from thinkrl.fileio import DataError

    out = Path(args.out).expanduser()
    try:
        recipe, model = load_model_recipe(args.recipe, args.overrides,
                                          {key: getattr(args, name) for name, key in FLAG_KEYS.items()}, args.model)
        check_out(out, model)
    except (RecipeError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_ray()
    import ray

    from rewards.types import RewardPluginError

    try:
        report = run_stage(recipe, args.method, model, out, log=lambda msg: print(msg, flush=True))
    except (ClusterTooSmall, StorageNotShared, DataError, RewardPluginError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()  # before the report: actors' late log lines must not follow it
    print(json.dumps(report), flush=True)
    return 0


def check_out(out: Path, model: Path) -> None:
    """`--out` must be a folder of its own: not the model, not inside it or around it, and if it exists and is
    not empty, this command's earlier output (its `<out>-work` folder is there). ValueError otherwise."""
    out_real, model_real = out.resolve(), model.resolve()
    if out_real == model_real or model_real in out_real.parents or out_real in model_real.parents:
        raise ValueError(f"--out {out} overlaps --model {model}: write the shortened model to a folder of its own")
    work = out_real.with_name(out_real.name + "-work")
    if out_real.exists() and (not out_real.is_dir() or any(out_real.iterdir())) and not work.is_dir():
        raise ValueError(f"--out {out} exists and is not empty, and it is no earlier output of this command "
                         f"(there is no {work}): choose another --out")


if __name__ == "__main__":
    sys.exit(main())
