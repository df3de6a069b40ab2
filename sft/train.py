"""Long-CoT SFT warmup: `python -m sft.train recipe.yaml [key=value ...]` (or as the first stage of rl.train).

Reads ChatML conversations, trains the full model through DeepSpeed on assistant tokens only, and writes
a Hugging Face checkpoint atomically to `<output_dir>/checkpoints/sft`. The warmup is short on the tiny
recipe, so a killed warmup restarts from its beginning; a finished one is never redone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rl.config import Recipe, SFTConfig
from thinkrl.fileio import atomic_directory


def run_sft(sft: SFTConfig, examples, model_path: str, out_dir: Path, seed: int,
            num_trainers: int = 1, zero_stage: int = 1, gpus_per_trainer: float = 0.0,
            log=print) -> dict[str, float]:
    """Train on `examples` (EncodedConversation list) and save the result to `out_dir`. Returns stats."""
    import ray

    from sft.data import batch_stream
    from sft.worker import SFTWorker
    from thinkrl.cluster import trainer_group
    from thinkrl.train_engine import DistConfig, OptimConfig

    optim = OptimConfig(lr=sft.lr, weight_decay=sft.weight_decay, grad_clip=sft.grad_clip,
                        warmup_steps=sft.warmup_steps, total_steps=sft.steps, min_lr_ratio=sft.min_lr_ratio)
    workers = trainer_group(
        SFTWorker, num_trainers,
        lambda rank, addr, port: (model_path, optim, DistConfig(rank, num_trainers, addr, port, zero_stage), seed),
        gpus_per_rank=gpus_per_trainer,
    )
    per_rank = max(1, sft.batch_size // num_trainers)
    stream = batch_stream(examples, per_rank * num_trainers, seed)
    start = time.time()
    tokens = 0
    losses: list[float] = []
    for step in range(1, sft.steps + 1):
        batch = next(stream)
        results = ray.get([w.train_step.remote(batch[r * per_rank : (r + 1) * per_rank])
                           for r, w in enumerate(workers)])
        losses.append(sum(r["loss"] for r in results) / len(results))
        tokens += sum(r["tokens"] for r in results)
        if step % sft.log_every == 0 or step == sft.steps:
            elapsed = time.time() - start
            recent = losses[-sft.log_every:]
            log(f"[sft] step {step}/{sft.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {results[0]['lr']:.2e}  {tokens / elapsed:,.0f} tok/s  {elapsed:.0f}s")
    with atomic_directory(out_dir) as tmp:
        ray.get([w.save_hf.remote(str(tmp)) for w in workers])
    for w in workers:
        ray.kill(w)
    return {"sft_final_loss": losses[-1], "sft_tokens_per_s": tokens / (time.time() - start)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML (its sft, model, data and run sections are used)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.steps=100")
    args = parser.parse_args(argv)

    from rl.train import prepare_run
    from thinkrl.cluster import init_ray
    from thinkrl.config import load_recipe

    recipe = load_recipe(Recipe, args.recipe, args.overrides)
    run = prepare_run(recipe)
    init_ray()
    out = run.dir / "checkpoints" / "sft"
    stats = run_sft(recipe.sft, run.sft_examples, str(run.base_model), out, recipe.run.seed,
                    recipe.rl.num_trainers, recipe.rl.zero_stage, recipe.rl.gpus_per_trainer)
    print(stats)
    print(out)


if __name__ == "__main__":
    sys.exit(main())
