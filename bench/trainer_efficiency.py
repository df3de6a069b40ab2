"""Benchmark 4: trainer efficiency: padding share, trainer tokens/s, peak memory of the log-prob pass.

    .venv/bin/python bench/trainer_efficiency.py

1. Non-padding share of the token slots per micro-batch in three layouts: unpacked (one sequence per
   row, right-padded to the longest), length buckets (`thinkrl.train_engine.length_buckets`: sorted
   runs, each padded to its own longest and run as its own forward pass; what `rl.trainer.PMDWorker`
   feeds the model) and packed (`sft.packing.packed_batch`: several sequences per row, up to the
   budget; the SFT warmup's layout), on the tiny recipe's real lengths: the SFT warmup's conversations
   (batches of `sft.batch_size`) and the RL samples (prompt + response) of the SFT checkpoint that
   bench/rollout_efficiency.py recorded (micro-batches of P*k / mini_batches sequences, as PMDWorker
   forms them).
2. Trainer tokens/s: forward + backward + optimizer step of `thinkrl.train_engine.TrainEngine` (the
   DeepSpeed engine both stages use) on the tiny dense model, real tokens per second, in the three
   layouts of the same SFT batches, interleaved, median of --reps.
3. Peak memory of `thinkrl.train_engine.token_logprobs` on one long sequence with a large vocabulary,
   for chunk sizes from "the whole sequence at once" (the [T, V] logits materialised) down to small
   chunks, without and with gradients. Each measurement runs in a fresh subprocess; the peak is the
   process's high-water mark (VmHWM, reset through /proc/self/clear_refs) minus its resident size
   before the call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, command_line, setup_env, spread, tiny_run, write_result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def logprob_memory_child(seq_len: int, vocab: int, chunks: list[int]) -> dict:
    """Runs in a subprocess: peak extra MiB of token_logprobs per chunk size, no-grad and with backward."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from thinkrl.train_engine import token_logprobs

    torch.manual_seed(0)
    # the decoder barely matters here (the head's [T, V] logits are the point): keep it small and fast
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=vocab, max_position_embeddings=seq_len,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(0, vocab, (1, seq_len))
    attn = torch.ones_like(ids)
    target = torch.ones_like(ids)
    out = {}
    for chunk in chunks:
        for mode in ("no_grad", "backward"):
            model.zero_grad(set_to_none=True)
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            before = _status_kib("VmRSS")
            start = time.perf_counter()
            if mode == "no_grad":
                with torch.no_grad():
                    token_logprobs(model, ids, attn, target, chunk_tokens=chunk)
            else:
                token_logprobs(model, ids, attn, target, chunk_tokens=chunk).sum().backward()
            seconds = time.perf_counter() - start
            out[f"{chunk}/{mode}"] = {"peak_extra_mib": (_status_kib("VmHWM") - before) / 1024, "seconds": seconds}
    return out


def packing_shares(lengths: list[int], group: int, budget: int) -> dict:
    """Non-padding share of `lengths` cut into consecutive micro-batches of `group`: one padded batch,
    length buckets (`thinkrl.train_engine.length_buckets`, what PMDWorker feeds the model) and packed rows."""
    from sft.packing import bucketed_batches, non_padding_share, packed_batch, padded_batch
    from thinkrl.chat import EncodedConversation
    from thinkrl.train_engine import BUCKET_OVERHEAD_TOKENS

    unpacked, buckets, packed = [], [], []
    for start in range(0, len(lengths) - group + 1, group):
        examples = [EncodedConversation([1] * n, [1] * n) for n in lengths[start:start + group]]
        unpacked.append(non_padding_share([padded_batch(examples, 0)]))
        buckets.append(non_padding_share(bucketed_batches(examples, 0)))
        packed.append(non_padding_share([packed_batch(examples, budget, 0)]))
    return {"micro_batch_sequences": group, "pack_budget": budget, "micro_batches": len(unpacked),
            "bucket_overhead_tokens": BUCKET_OVERHEAD_TOKENS,
            "unpacked": spread(unpacked), "buckets": spread(buckets), "packed": spread(packed)}


def trainer_throughput(sft_dir: Path, examples: list, batch: int, budget: int, reps: int) -> dict:
    """Real tokens/s of TrainEngine forward+backward+step on the same batches in three layouts: one padded
    batch, length buckets (one forward each, one backward for the step: PMDWorker's layout) and packed
    rows (SFT's)."""
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from sft.packing import bucketed_batches, packed_batch, padded_batch
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import BUCKET_OVERHEAD_TOKENS, DistConfig, OptimConfig, TrainEngine

    engine = TrainEngine(str(sft_dir), OptimConfig(lr=1e-6), DistConfig(master_port=free_port()))
    pad = engine.tokenizer.pad_token_id

    def layouts(name: str, examples: list) -> list:
        if name == "unpacked":
            return [padded_batch(examples, pad)]
        if name == "packed":
            return [packed_batch(examples, budget, pad)]
        return bucketed_batches(examples, pad)

    def step(parts: list) -> dict:
        start = time.perf_counter()
        n_targets = max(1, sum(int(p.target_mask_B_T.sum()) for p in parts))

        def loss_of(parts: list):
            return sum(-engine.token_logprobs(p.input_ids_B_T, p.attention_mask_B_T, p.target_mask_B_T,
                                             p.position_ids_B_T).sum() / n_targets for p in parts)

        engine.train_step([parts], loss_of)
        wall = time.perf_counter() - start
        tokens = sum(p.real_tokens for p in parts)
        return {"tokens": tokens, "slots": sum(p.slots for p in parts), "forwards": len(parts), "wall_s": wall,
                "tokens_per_s": tokens / wall}

    names = ["unpacked", "buckets", "packed"]
    batches = [examples[i * batch:(i + 1) * batch] for i in range(reps + 1)]
    for name in names:  # warm-up
        step(layouts(name, batches[0]))
    runs: dict[str, list] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            runs[name].append(step(layouts(name, batches[rep + 1])))

    def ratio(a: str, b: str) -> dict:
        values = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b], strict=True)]
        return {"values": values, **spread(values)}

    return {"batch_examples": batch, "pack_budget": budget, "bucket_overhead_tokens": BUCKET_OVERHEAD_TOKENS,
            "runs": runs, **{f"{n}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[n]) for n in names},
            "packed_over_unpacked": ratio("packed", "unpacked"), "buckets_over_unpacked": ratio("buckets", "unpacked"),
            "buckets_over_packed": ratio("buckets", "packed")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft-steps", type=int, default=None, help="SFT warmup of the checkpoint used (shared, cached) (default: the tiny recipe's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=4096, help="log-prob memory: sequence length")
    p.add_argument("--vocab", type=int, default=65536, help="log-prob memory: vocabulary size")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024],
                   help="log-prob chunk sizes in tokens (0: the whole sequence at once; TrainEngine's "
                        "default is 4096)")
    p.add_argument("--name", default="trainer_efficiency")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(logprob_memory_child(spec["seq_len"], spec["vocab"], spec["chunks"])))
        return 0
    setup_env()

    memory = {}
    for chunk in args.chunks:
        size = chunk or args.seq_len
        spec = json.dumps({"seq_len": args.seq_len, "vocab": args.vocab, "chunks": [size]})
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
            memory[("whole" if chunk == 0 else key.split("/")[0]) + "/" + key.split("/")[1]] = value
        print(f"[bench] log-prob memory, chunk {chunk or 'whole'}: {memory}", flush=True)
    logits_mib = args.seq_len * args.vocab * 4 / 2**20

    recipe, run, sft_dir, warmup = tiny_run("tiny-dense", args.sft_steps)
    from sft.train import load_sft_examples

    examples = warmup.examples
    if not examples:  # the warmup ran before: read its data again
        examples, _ = load_sft_examples(recipe.sft.model_copy(update={"data_file": str(warmup.data_file)}),
                                        run.tokenizer)
    sft_lengths = [len(e.input_ids) for e in examples]
    shares = {"sft": packing_shares(sft_lengths, recipe.sft.batch_size, recipe.sft.max_seq_len)}
    rollout_file = RESULTS_DIR / "rollout_efficiency.json"
    if rollout_file.exists():
        rl_lengths = [a + b for a, b in json.loads(rollout_file.read_text())["lengths_prompt_response"]]
        rl = recipe.rl
        group = rl.prompts_per_iteration * rl.samples_per_prompt // rl.mini_batches
        shares["rl"] = packing_shares(rl_lengths, group, recipe.rollout.max_model_len)
    else:
        shares["rl"] = {"pending": f"{rollout_file.name} not found: run bench/rollout_efficiency.py first"}
    print(f"[bench] non-padding shares: {json.dumps(shares)}", flush=True)
    throughput = trainer_throughput(sft_dir, examples, recipe.sft.batch_size, recipe.sft.max_seq_len, args.reps)
    print(f"[bench] trainer tokens/s unpacked {throughput['unpacked_tokens_per_s']:.0f}, buckets "
          f"{throughput['buckets_tokens_per_s']:.0f}, packed {throughput['packed_tokens_per_s']:.0f}", flush=True)
    write_result(args.name, {"non_padding_share": shares, "trainer": throughput,
                             "logprob_memory": {"seq_len": args.seq_len, "vocab": args.vocab,
                                                "full_logits_mib": logits_mib, "by_chunk": memory}},
                 command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
