"""Uniform vs curriculum+prioritized sampling on the tiny task, from the same SFT checkpoint.

    python bench/samplers.py --out runs/bench-samplers                       # SFT once, then both RL runs
    python bench/samplers.py --out runs/bench-samplers --sft-checkpoint DIR  # reuse a warmed-up model
    python bench/samplers.py --out /tmp/smoke --smoke                        # minutes-long plumbing check

Each variant is one `python -m rl.train recipes/tiny.yaml` run with `sft.enabled=false
model.name_or_path=<SFT checkpoint>` and its `sampler.*` overrides, so both start from identical
weights, see the same training prompts, the same iteration count and batch size, and are evaluated on
the same held-out problems with the same decoding. Generated tokens are counted from each run's
metrics (mean response length x prompts x samples, per iteration); the comparison printed is held-out
accuracy after RL against the tokens each run generated to get there. Both runs do the same number of
iterations, so their token counts differ only through response lengths; the table shows both numbers
rather than pretending they are equal.

Writes `<out>/bench_samplers.json` and prints a table. The runs resume if the script is started again
with the same `--out` (each is an ordinary run directory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "uniform": ["sampler.kind=uniform"],
    # three levels (1-3 operations): a quarter of the run on each of the two easy ones, then the hardest,
    # with a quarter of every later batch reviewing the easier levels; prioritized inside each level
    "curriculum+prioritized": ["sampler.kind=curriculum+prioritized", "sampler.schedule=iterations",
                               "sampler.review_share=0.25", "sampler.floor=0.05"],
}
SMOKE = ["sft.steps=15", "sft.n_examples=300", "data.n_train=64", "data.n_heldout=12", "rl.prompts_per_iteration=4",
         "rl.samples_per_prompt=4", "rl.mini_batches=2", "eval.samples_per_prompt=2", "rollout.max_tokens=64",
         "eval.max_tokens=64", "rollout.enforce_eager=true"]


def _env() -> dict[str, str]:
    # a private local Ray cluster unless the caller names one
    return {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")}


def _train(run_dir: Path, overrides: list[str], log_file: Path) -> None:
    cmd = [sys.executable, "-m", "rl.train", "recipes/tiny.yaml", f"run.output_dir={run_dir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    with open(log_file, "a") as log:
        code = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"run failed (exit {code}); see {log_file}")


def _sft_checkpoint(out: Path, extra: list[str]) -> Path:
    sft_dir = out / "sft" / "checkpoints" / "sft"
    if not (sft_dir / "config.json").exists():
        cmd = [sys.executable, "-m", "sft.train", "recipes/tiny.yaml", f"run.output_dir={out / 'sft'}", *extra]
        print("$", " ".join(cmd), flush=True)
        with open(out / "sft.log", "a") as log:
            if subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                sys.exit(f"SFT failed; see {out / 'sft.log'}")
    return sft_dir


def summarise(run_dir: Path) -> dict:
    """Accuracy before/after RL and generated tokens of one finished run directory."""
    import yaml

    report = json.loads((run_dir / "report.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    per_iteration = config["rl"]["prompts_per_iteration"] * config["rl"]["samples_per_prompt"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/response_tokens_mean" in r]
    uniform_share = [r["sampler/uniform_group_share"] for r in train if "sampler/uniform_group_share" in r]
    return {
        "accuracy_before_rl": report["accuracy_before_rl"],
        "accuracy_after_rl": report["accuracy_after_rl"],
        "generated_tokens": round(sum(r["train/response_tokens_mean"] * per_iteration for r in train)),
        "iterations": len(train),
        "mean_train_reward": sum(r["train/reward_mean"] for r in train) / len(train) if train else None,
        "mean_uniform_group_share": sum(uniform_share) / len(uniform_share) if uniform_share else None,
        "rl_wall_seconds": report["wall_seconds"].get("rl"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="uniform vs curriculum+prioritized sampling, same SFT start")
    parser.add_argument("--out", required=True, help="bench directory (one run directory per variant inside)")
    parser.add_argument("--sft-checkpoint", help="a warmed-up Hugging Face folder (default: run the tiny SFT once)")
    parser.add_argument("--iterations", type=int, default=40, help="RL iterations of each run (default 40)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and budgets: checks the plumbing only")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run, e.g. rl.lr=5e-5")
    args = parser.parse_args(argv)

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = (SMOKE if args.smoke else []) + args.overrides
    sft = Path(args.sft_checkpoint).resolve() if args.sft_checkpoint else _sft_checkpoint(out, extra)
    per_level = max(1, args.iterations // 4)
    results = {}
    for name, variant in VARIANTS.items():
        run_dir = out / name.replace("+", "_")
        overrides = [*extra, "sft.enabled=false", f"model.name_or_path={sft}", f"rl.iterations={args.iterations}",
                     f"sampler.iterations_per_level={per_level}", *variant]
        start = time.time()
        if not (run_dir / "report.json").exists():
            _train(run_dir, overrides, out / f"{run_dir.name}.log")
        results[name] = {**summarise(run_dir), "overrides": overrides, "bench_wall_seconds": time.time() - start}

    from thinkrl.fileio import atomic_write_json

    atomic_write_json(out / "bench_samplers.json", {"sft_checkpoint": str(sft), "results": results})
    print(f"\n{'sampler':<24}{'acc before':>11}{'acc after':>11}{'gen tokens':>12}{'uniform groups':>16}")
    for name, r in results.items():
        share = r["mean_uniform_group_share"]
        print(f"{name:<24}{r['accuracy_before_rl']:>11.3f}{r['accuracy_after_rl']:>11.3f}{r['generated_tokens']:>12,}"
              f"{share if share is not None else float('nan'):>16.2f}")
    print(out / "bench_samplers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
