"""GPU figures: DeepSpeed training throughput and MFU of thinkrl's trainer, and the log-prob head's memory.

    python bench/gpu_trainer.py --out bench/gpu_results/h100.json

Needs CUDA (it is not part of `make bench`, which runs on the CPU machine); its JSON is committed under
bench/gpu_results/ and bench/report.py renders every file there into docs/benchmarks.md.

1. Training throughput: `thinkrl.train_engine.TrainEngine` (DeepSpeed, bf16 with fp32 master weights,
   ZeRO stage --zero-stage, NCCL, torch AdamW) on a random Qwen2-shaped model of 0.5B or 1.5B
   parameters (Qwen2.5-0.5B / -1.5B shapes, tied embeddings), full rows of tokens, loss = mean token
   log-prob through `TrainEngine.token_logprobs` (the path the SFT and RL workers take). --runs lists
   the configurations, SIZE:SEQ_LENxROWS[:gc] (gc: gradient checkpointing), each in a fresh process.
   Tokens/s is the median over --steps timed optimizer steps after --warmup. MFU = tokens/s x training
   FLOPs per token / the GPU's dense bf16 peak, with FLOPs per token = 6 x (weights of every matmul,
   the output head included) + 6 x layers x seq_len x attention width (causal attention, forward and
   backward). Also reported against this GPU's measured large bf16 matmul rate.
2. Log-prob head memory: peak extra GPU memory (torch.cuda.max_memory_allocated) of the log-probs of
   one long sequence through a 151936-token head: the whole [T, V] logits at once, a chunked loop that
   autograd differentiates (chunks' logits all kept for backward), and `head_logprobs` (chunked in the
   forward and the backward pass), without gradients and with backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Qwen2.5 shapes (https://huggingface.co/Qwen: config.json of the 0.5B and 1.5B models)
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}
VOCAB = 151936
# dense bf16 tensor-core peak (no sparsity), TFLOP/s, from NVIDIA's data sheets
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4,
               "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def measured_matmul_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def build_model(size: str, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from thinkrl.models import build_tokenizer

    tokenizer = build_tokenizer()  # the char tokenizer: the ids fed here are random, only the folder needs one
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1_000_000.0, **SHAPES[size])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


def flops_per_token(model, seq_len: int) -> tuple[float, int]:
    import torch

    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * head_dim
    return 6 * matmul_weights + attention, matmul_weights


def parse_run(spec: str) -> tuple[str, int, int, bool]:
    parts = spec.split(":")
    seq_len, rows = (int(x) for x in parts[1].split("x"))
    if parts[0] not in SHAPES or parts[2:] not in ([], ["gc"]):
        raise ValueError(f"--runs: {spec!r} is not SIZE:SEQ_LENxROWS[:gc] with SIZE in {sorted(SHAPES)}")
    return parts[0], seq_len, rows, parts[2:] == ["gc"]


def throughput(spec: str, args, log) -> dict:
    import torch

    from thinkrl.train_engine import DistConfig, OptimConfig, TrainEngine

    size, seq_len, rows, checkpointing = parse_run(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(size, Path(tmp) / size)
        engine = TrainEngine(path, OptimConfig(lr=1e-5), DistConfig(zero_stage=args.zero_stage,
                             gradient_checkpointing=checkpointing), logprob_chunk_tokens=args.chunk)
    params = sum(p.numel() for p in engine.module.parameters())
    per_token, matmul_weights = flops_per_token(engine.module, seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (rows, seq_len), generator=gen)
    attn = torch.ones_like(ids)
    target = torch.ones_like(ids)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step([ids], lambda batch: -engine.token_logprobs(batch, attn, target).sum() / target[:, 1:].sum())
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = rows * seq_len
    step_s = statistics.median(times)
    tok_s = tokens / step_s
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    achieved = tok_s * per_token / 1e12
    out = {
        "run": spec, "size": size, "parameters": params, "matmul_weights": matmul_weights, "seq_len": seq_len,
        "rows": rows, "gradient_checkpointing": checkpointing, "tokens_per_step": tokens,
        "zero_stage": args.zero_stage,
        "step_seconds": {"min": min(times), "median": step_s, "max": max(times), "n": len(times)},
        "tokens_per_s": tok_s, "tflops_per_s": achieved, "flops_per_token": per_token,
        "mfu": achieved / peak if peak else None,
        "mfu_vs_measured_matmul": achieved / args.matmul_tflops,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    log(f"[gpu] {spec}: {tok_s:,.0f} tokens/s, {achieved:.0f} TFLOP/s, MFU {out['mfu'] or 0:.1%}, "
        f"peak {out['peak_memory_gib']:.1f} GiB")
    return out


def throughput_in_child(spec: str, args, log) -> dict:
    """`throughput` in a fresh process: each run's peak memory is its own, and one OOM ends only itself."""
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child-run", spec, "--out", f.name, "--zero-stage", str(args.zero_stage),
               "--chunk", str(args.chunk), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--matmul-tflops", str(args.matmul_tflops)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-1:] or proc.stderr.splitlines()[-1:]
            log(f"[gpu] {spec}: failed: {tail}")
            return {"run": spec, "error": (tail or [f"exit {proc.returncode}"])[0][-300:]}
        return json.loads(Path(f.name).read_text())


def logprob_memory(args, log) -> list[dict]:
    import torch

    from thinkrl.train_engine import head_logprobs

    hidden_size = SHAPES["0.5b"]["hidden_size"]
    head = torch.nn.Linear(hidden_size, VOCAB, bias=False, device="cuda", dtype=torch.bfloat16)

    def autograd_loop(head, hidden, targets, chunk):  # what a chunked loop without recomputation does
        pieces = []
        for s in range(0, hidden.shape[0], chunk):
            logits = head(hidden[s : s + chunk]).float()
            pieces.append(logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - torch.logsumexp(logits, -1))
        return torch.cat(pieces)

    rows = []
    for seq_len in args.logprob_lens:
        hidden = torch.randn(seq_len, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, VOCAB, (seq_len,), device="cuda")
        variants = [("whole [T, V]", partial(autograd_loop, head), seq_len)]
        for chunk in args.logprob_chunks:
            variants.append((f"autograd loop, chunk {chunk}", partial(autograd_loop, head), chunk))
            variants.append((f"head_logprobs, chunk {chunk}", partial(head_logprobs, head), chunk))
        for label, logprobs, chunk in variants:
            for mode in ("no_grad", "backward"):
                hidden.grad = None
                head.weight.grad = None
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    if mode == "no_grad":
                        with torch.no_grad():
                            logprobs(hidden, targets, chunk)
                    else:
                        logprobs(hidden, targets, chunk).sum().backward()
                    torch.cuda.synchronize()
                    row = {"peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
                           "seconds": time.perf_counter() - start}
                except torch.OutOfMemoryError:
                    row = {"peak_extra_gib": None, "seconds": None, "error": "out of memory"}
                row.update(seq_len=seq_len, vocab=VOCAB, variant=label, mode=mode,
                           logits_fp32_gib=seq_len * VOCAB * 4 / 2**30)
                rows.append(row)
                log(f"[gpu] logprobs T={seq_len} {label} {mode}: "
                    + (f"{row['peak_extra_gib']:.2f} GiB" if row["peak_extra_gib"] is not None else "OOM"))
    del head, hidden, targets
    torch.cuda.empty_cache()  # the throughput runs that follow (child processes) get the whole GPU
    return rows


def without_out(argv: list[str]) -> list[str]:
    """The arguments minus --out and its value (a path on the GPU machine, not a setting)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        out.append(a)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(ROOT / "bench" / "results")),
                                                      "gpu_trainer.json"))
    parser.add_argument("--runs", default="0.5b:4096x4,0.5b:4096x4:gc,1.5b:4096x4:gc,1.5b:4096x2,1.5b:32768x1:gc",
                        help="throughput configurations, comma-separated SIZE:SEQ_LENxROWS[:gc]")
    parser.add_argument("--child-run", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-tflops", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=4096, help="TrainEngine.logprob_chunk_tokens")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--logprob-lens", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    parser.add_argument("--logprob-chunks", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 1024])
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_trainer.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from importlib import metadata

    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.child_run:
        Path(args.out).write_text(json.dumps(throughput(args.child_run, args, log)))
        return 0
    for spec in args.runs.split(","):
        parse_run(spec)  # bad specs fail before any measurement
    args.matmul_tflops = measured_matmul_tflops()
    name = torch.cuda.get_device_name()
    log(f"[gpu] {name}: 8192^3 bf16 matmul {args.matmul_tflops:.0f} TFLOP/s")
    result = {
        "name": "gpu_trainer",
        "command": " ".join(["python bench/gpu_trainer.py", *without_out(sys.argv[1:])]),
        "device": name, "device_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "peak_bf16_tflops": peak_tflops(name), "measured_matmul_tflops": args.matmul_tflops,
        "versions": {p: metadata.version(p) for p in ("torch", "deepspeed", "transformers")},
        "cuda": torch.version.cuda, "finished_at": None,
        "logprob_memory": logprob_memory(args, log),
        "throughput": [throughput_in_child(spec, args, log) for spec in args.runs.split(",")],
    }
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"[gpu] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
