"""Benchmark 3: weight sync, trainer -> vLLM engine, against this machine's memory-copy bandwidth.

    .venv/bin/python bench/weight_sync.py --models tiny-dense tiny-moe large --reps 5

For each model a real DeepSpeed `PMDWorker` actor and a real `RolloutEngine` actor are started, and the
driver's own path is timed (`rl.sync.sync_weights`: the trainer puts its weights into Ray's object store
bucket by bucket, the engine stages them into the shared memory its vLLM worker maps and the worker loads
them in place, then the prefix cache is dropped), split into publish and load. GB/s = parameter bytes /
seconds.

The limit: the bytes cross memory at least twice (out of the trainer's parameters, into the engine's;
today: trainer -> object store -> the engine's arena -> vLLM's parameters, and on CPU vLLM also repacks
linear weights for oneDNN), so the memory-copy bound of a sync is 2 x bytes / memcpy bandwidth. The memcpy bandwidth is measured here (a 1 GiB `Tensor.copy_`, median of
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


def measure(model_path: Path, reps: int) -> dict:
    import ray

    from rl.sync import sync_weights
    from rl.trainer import PMDWorker
    from rollout.engine import EngineSettings, RolloutEngine
    from thinkrl.cluster import remote_actor, trainer_group
    from thinkrl.train_engine import DistConfig, OptimConfig

    trainers = trainer_group(PMDWorker, 1, lambda r, a, p: (str(model_path), OptimConfig(lr=1e-5),
                                                             DistConfig(r, 1, a, p, 1), 0), wait=False)
    engine = remote_actor(RolloutEngine).remote(EngineSettings(model_path=str(model_path), enforce_eager=True,
                                                               max_model_len=512, gpu_memory_utilization=0.15))
    ray.get([a.__ray_ready__.remote() for a in [*trainers, engine]])  # both start at once, as in rl.train
    totals, exports, loads = [], [], []
    try:
        sync_weights(trainers, [engine])  # warm-up: the first sync allocates the engine's arena
        for _ in range(reps):
            totals.append(sync_weights(trainers, [engine]))
            start = time.perf_counter()
            refs = ray.get(trainers[0].publish_weights.remote())
            exports.append(time.perf_counter() - start)
            nbytes = sum(b.nbytes for b in ray.get(refs))
            start = time.perf_counter()
            ray.get(engine.load_weights.remote(refs))
            loads.append(time.perf_counter() - start)
            del refs
    finally:
        for actor in [*trainers, engine]:
            ray.kill(actor)
    return {"transport": "Ray object store -> memfd arena -> vLLM reload_weights",
            "bytes": nbytes, "sync_s": spread(totals), "export_s": spread(exports), "load_s": spread(loads),
            "gb_per_s": spread([nbytes / t / 1e9 for t in totals])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-dense", "tiny-moe", "large"])
    p.add_argument("--large-params", type=float, default=0.5e9, help="parameters of the 'large' random model")
    p.add_argument("--reps", type=int, default=5)
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
            r = measure(path, args.reps)
        except Exception as e:  # one model's failure is a result too; the others are still measured
            cause = e.__cause__ or e
            results[name] = {"error": f"{type(e).__name__}: {str(e)[-800:]}" + (
                f" (caused by {type(cause).__name__}: {str(cause)[-400:]})" if cause is not e else "")}
            print(f"[bench] {name}: sync failed: {results[name]['error']}", flush=True)
            continue
        bound = 2 * r["bytes"] / (bandwidth["gb_per_s"] * 1e9)
        r["memcpy_bound_s"] = bound
        r["sync_over_bound"] = spread([t / bound for t in [r["sync_s"]["median"]]])["median"]
        results[name] = r
        print(f"[bench] {name}: {r['bytes'] / 1e9:.3f} GB, sync {r['sync_s']['median']:.3f}s "
              f"({r['gb_per_s']['median']:.2f} GB/s; memcpy bound {bound:.3f}s)", flush=True)
    write_result(args.name, {"memcpy": bandwidth, "models": results, "reps": args.reps}, command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
