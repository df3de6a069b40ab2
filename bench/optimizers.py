"""AdamW vs Muon (`sft.optimizer`, `rl.optimizer`) on the tiny recipe, each pair from the same start.

    .venv/bin/python bench/optimizers.py --part warmup                 # (a) the recipe's 500 warm-up steps
    .venv/bin/python bench/optimizers.py --part rl                     # (b) two 40-iteration RL runs
    .venv/bin/python bench/optimizers.py --part warmup --sft-steps 5 --eval-every 5 --name optimizers_smoke

(a) Warm-up: recipes/tiny.yaml's SFT warm-up data, batches and schedule (`sft.steps` = --sft-steps),
    trained from the same initial weights by two `sft.worker.SFTWorker` ranks in this process (no Ray),
    one with AdamW and one with Muon, on the same batches. Their steps alternate (A B, B A, ...) so that
    drift of a shared machine hits both alike; each records its training loss per step and its own wall
    seconds (its steps only, evaluation excluded), and both are evaluated on the recipe's held-out
    conversations every --eval-every steps. Muon's first step includes torch.compile of DeepSpeed's
    Newton-Schulz kernels (tens of seconds on 2 cores, cached on disk afterwards): it stays in the
    seconds and is also reported alone (`first_step_seconds`).
(b) RL: `python -m rl.train recipes/tiny.yaml` with rl.optimizer=adamw and with rl.optimizer=muon, both
    from the tiny recipe's (AdamW) warm-up checkpoint (`common.tiny_run`, cached in bench/results/work
    and shared with the other benchmarks), `sft.enabled=false model.name_or_path=<checkpoint>`: the same
    weights, prompts, iterations and held-out problems. Reported: held-out accuracy before and after RL
    and the gain per RL sample (iterations x prompts_per_iteration x samples_per_prompt). --reps repeats
    the pair (order flipped every repetition); a finished run directory is reused, so a killed bench
    started again continues.

One `lr` serves both optimizers (Muon's step is scaled to AdamW's RMS: `thinkrl.train_engine.muon_lr_scale`);
--muon-lr-factor multiplies the Muon runs' lr to test that claim.

Writes bench/results/<name>.json (both parts' results, merged into what an earlier run of the other part
left) and bench/results/<name>_warmup.png (training and held-out loss against step and against seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, WORK_DIR, command_line, setup_env, tiny_run, write_result

OPTIMIZERS = ("adamw", "muon")
RECIPE = ROOT / "recipes" / "tiny.yaml"


def warmup_part(sft_steps: int | None, eval_every: int, muon_lr_factor: float, log=print) -> dict:
    """(a): both optimizers' loss per step and seconds over the tiny recipe's warm-up, from the same start."""
    from rl.config import Recipe
    from rl.setup import prepare
    from sft.data import batch_stream, split_heldout
    from sft.train import optim_config
    from sft.worker import SFTWorker
    from thinkrl.cluster import free_port
    from thinkrl.config import load_recipe
    from thinkrl.train_engine import DistConfig

    overrides = [f"run.output_dir={WORK_DIR / 'optimizers-warmup'}"]
    recipe = load_recipe(Recipe, str(RECIPE), overrides + ([f"sft.steps={sft_steps}"] if sft_steps else []))
    sft, seed = recipe.sft, recipe.run.seed
    run, warmup = prepare(recipe)  # the warm-up data, built once into the run directory
    examples, heldout = split_heldout(warmup.examples, sft.eval_fraction, seed, cap=sft.eval_max_examples)
    examples = [e for e in examples if len(e.input_ids) <= sft.max_seq_len]  # the warm-up's first stage
    steps, budget = sft.steps, sft.max_seq_len if sft.packing else None
    stream = batch_stream(examples, sft.batch_size, seed)  # the stream sft.train's first stage draws
    batches = [next(stream) for _ in range(steps)]
    log(f"[bench] warm-up: {len(examples)} conversations, {steps} steps of {sft.batch_size}, "
        f"{len(heldout)} held out, lr {sft.lr:g}")
    workers, curves = {}, {}
    for name in OPTIMIZERS:
        lr = sft.lr * (muon_lr_factor if name == "muon" else 1.0)
        optim = optim_config(sft.model_copy(update={"optimizer": name, "lr": lr}))
        workers[name] = SFTWorker(str(run.base_model), optim, DistConfig(master_port=free_port()), seed, sft.micro_batches)
        curves[name] = {"lr": lr, "steps": [], "evals": []}
    seconds = dict.fromkeys(OPTIMIZERS, 0.0)

    def evaluate(step: int) -> None:
        for name, worker in workers.items():
            nll, tokens = 0.0, 0
            for start in range(0, len(heldout), sft.batch_size):
                s, n = worker.eval_sums(heldout[start:start + sft.batch_size], budget, sft.packing_layout)
                nll, tokens = nll + s, tokens + n
            curves[name]["evals"].append({"step": step, "seconds": seconds[name], "loss": nll / max(1, tokens)})

    evaluate(0)
    for step, batch in enumerate(batches, 1):
        for name in (OPTIMIZERS if step % 2 else OPTIMIZERS[::-1]):
            start = time.perf_counter()
            result = workers[name].train_step(batch, budget, sft.packing_layout, SFTWorker.loss_tokens(batch))
            seconds[name] += time.perf_counter() - start
            curves[name]["steps"].append({"step": step, "seconds": seconds[name], "loss": result["loss"],
                                          "lr": result["lr"]})
        if step % eval_every == 0 or step == steps:
            evaluate(step)
            log(f"[bench] step {step}/{steps}  " + "  ".join(
                f"{n}: loss {c['steps'][-1]['loss']:.4f} eval {c['evals'][-1]['loss']:.4f} {seconds[n]:.0f}s"
                for n, c in curves.items()))
    for curve in curves.values():
        step_seconds = [b["seconds"] - a["seconds"] for a, b in zip(curve["steps"], curve["steps"][1:], strict=False)]
        curve.update(first_step_seconds=curve["steps"][0]["seconds"], median_step_seconds=(
            statistics.median(step_seconds) if step_seconds else None), final_eval_loss=curve["evals"][-1]["loss"])
    return {"recipe": str(RECIPE.relative_to(ROOT)), "steps": steps, "batch_size": sft.batch_size,
            "muon_lr_factor": muon_lr_factor, "heldout_conversations": len(heldout), "curves": curves}


def plot_warmup(result: dict, out_png: Path) -> None:
    """Training (thin) and held-out (markers) loss of both optimizers against step and against seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, x in zip(axes, ("step", "seconds"), strict=True):
        for name, curve in result["curves"].items():
            line, = ax.plot([r[x] for r in curve["steps"]], [r["loss"] for r in curve["steps"]], lw=0.8, alpha=0.6,
                            label=f"{name} train")
            ax.plot([r[x] for r in curve["evals"]], [r["loss"] for r in curve["evals"]], "o-", ms=3,
                    color=line.get_color(), label=f"{name} held-out")
        ax.set_xlabel("optimizer step" if x == "step" else "wall seconds (training steps only)")
        ax.set_ylabel("loss (mean NLL per assistant token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tiny recipe warm-up, AdamW vs Muon, same start ({result['steps']} steps)", fontsize=10)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out_png)
    plt.close(fig)


def rl_part(name: str, warmup_steps: int | None, iterations: int | None, reps: int, muon_lr_factor: float,
            overrides: list[str], log=print) -> dict:
    """(b): RL runs with each optimizer from the same warm-up checkpoint; held-out gain per RL sample."""
    import ray

    from rl.config import Recipe
    from thinkrl.config import load_recipe

    _, _, sft_dir, _ = tiny_run("tiny-dense", warmup_steps, log=log)

    ray.shutdown()  # the runs below start their own clusters
    common = [*overrides, "sft.enabled=false", f"model.name_or_path={sft_dir}",
              *([f"rl.iterations={iterations}"] if iterations is not None else [])]
    recipe = load_recipe(Recipe, str(RECIPE), common)
    rl = recipe.rl
    samples = rl.iterations * rl.prompts_per_iteration * rl.samples_per_prompt
    runs: dict[str, list] = {o: [] for o in OPTIMIZERS}
    for rep in range(reps):
        for optimizer in (OPTIMIZERS if rep % 2 == 0 else OPTIMIZERS[::-1]):
            lr = rl.lr * (muon_lr_factor if optimizer == "muon" else 1.0)
            run_dir = WORK_DIR / f"{name}-rl-{optimizer}-rep{rep}"
            if not (run_dir / "report.json").exists():
                cmd = [sys.executable, "-m", "rl.train", str(RECIPE), f"run.output_dir={run_dir}", *common,
                       f"rl.optimizer={optimizer}", f"rl.lr={lr}"]
                log(f"[bench] rep {rep + 1}/{reps} {optimizer}: $ {' '.join(cmd)}")
                with open(WORK_DIR / f"{run_dir.name}.log", "a") as out:
                    code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "local"}, stdout=out,
                                          stderr=subprocess.STDOUT).returncode
                if code != 0:
                    raise SystemExit(f"{optimizer} RL run failed (exit {code}); see {WORK_DIR / f'{run_dir.name}.log'}")
            report = json.loads((run_dir / "report.json").read_text())
            gain = report["accuracy_after_rl"] - report["accuracy_before_rl"]
            runs[optimizer].append({"run_dir": str(run_dir), "lr": lr, "accuracy_before_rl": report["accuracy_before_rl"],
                                    "accuracy_after_rl": report["accuracy_after_rl"], "gain": gain,
                                    "gain_per_1k_samples": 1000 * gain / samples,
                                    "rl_wall_seconds": report["wall_seconds"].get("rl")})
            log(f"[bench] {optimizer}: held-out {report['accuracy_before_rl']:.3f} -> {report['accuracy_after_rl']:.3f} "
                f"({1000 * gain / samples:+.4f} per 1k RL samples)")
    summary = {o: {"median_gain": statistics.median(r["gain"] for r in rs),
                   "median_gain_per_1k_samples": statistics.median(r["gain_per_1k_samples"] for r in rs)}
               for o, rs in runs.items()}
    return {"warmup_checkpoint": str(sft_dir), "overrides": common, "iterations": rl.iterations,
            "rl_samples_per_run": samples, "muon_lr_factor": muon_lr_factor, "runs": runs, "summary": summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("warmup", "rl", "both"), default="both")
    p.add_argument("--sft-steps", type=int, default=None, help="(a) warm-up steps (default: the recipe's, 500)")
    p.add_argument("--eval-every", type=int, default=25, help="(a) steps between held-out losses")
    p.add_argument("--warmup-checkpoint-steps", type=int, default=None,
                   help="(b) warm-up steps of the shared checkpoint RL starts from (default: the recipe's)")
    p.add_argument("--iterations", type=int, default=None, help="(b) RL iterations per run (default: the recipe's, 40)")
    p.add_argument("--reps", type=int, default=1, help="(b) repetitions of the AdamW / Muon pair")
    p.add_argument("--muon-lr-factor", type=float, default=1.0, help="the Muon runs' lr over the recipe's")
    p.add_argument("--name", default="optimizers")
    p.add_argument("overrides", nargs="*", help="(b) recipe overrides for every RL run, e.g. rl.prompts_per_iteration=8")
    args = p.parse_args(argv)
    setup_env()
    path = RESULTS_DIR / f"{args.name}.json"
    result = {k: v for k, v in json.loads(path.read_text()).items() if k in ("warmup", "rl")} if path.exists() else {}
    if args.part in ("warmup", "both"):
        result["warmup"] = warmup_part(args.sft_steps, args.eval_every, args.muon_lr_factor)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot_warmup(result["warmup"], RESULTS_DIR / f"{args.name}_warmup.png")
        print("[bench] warm-up: " + "  ".join(
            f"{n}: held-out {c['final_eval_loss']:.4f} after {c['steps'][-1]['seconds']:.0f}s "
            f"(median step {c['median_step_seconds'] or float('nan'):.2f}s)" for n, c in result["warmup"]["curves"].items()))
    if args.part in ("rl", "both"):
        result["rl"] = rl_part(args.name, args.warmup_checkpoint_steps, args.iterations, args.reps,
                               args.muon_lr_factor, args.overrides)
    print(write_result(args.name, result, command_line()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
