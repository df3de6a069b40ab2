"""Difficulty labelling: `python -m rl.label INPUT.jsonl --model PATH -o OUT_DIR --samples 8`.

For every row of a JSONL dataset (`prompt` and `answer` fields, names configurable), sample n responses
from a model with an in-process vLLM engine, verify them with a reward (`--reward`, default `math`; any
per-sample reward of the registry: a built-in, an installed `thinkrl.rewards` entry point or a
`module:attr` path, see docs/rewards.md) scored by a `rewards.combine.RewardSet` in killable worker
processes with a hard timeout, and write

    OUT_DIR/labelled.jsonl   every input row, in input order, plus `pass_rate` (share of the n samples the
                             reward judges correct: `RewardResult.correct`, or a score > 0 if it gives no
                             verdict) and `difficulty_label` (bins of `samplers.difficulty.PASS_RATE_BINS`:
                             easy >= 0.75 > medium >= 0.5 > hard >= 0.25 > very_hard); with
                             --filter-solved / --filter-unsolved, rows with pass rate 1 / 0 are left out
    OUT_DIR/summary.json     counts per label, pass-rate histogram, filtered rows, tokens, settings

Rows with images (`--image-field`, default `images`: paths relative to the input file's folder, or
absolute; a vision-language model such as `tiny-vl`) are checked before the engine starts (each image
must decode, and the prompt's `<image>` marks, if any, must be as many), prompted with the model's
image placeholders (`thinkrl.chat.row_prompt_ids`) and sampled with the images as vLLM multi-modal
data. Their labelled copies hold the images' absolute paths, so that `labelled.jsonl` can live in
another folder. Text rows are unchanged.

A curriculum reads the `pass_rate` of such rows (`sampler.difficulty_source=pass_rate`, or `auto` when
the rows have no `difficulty` field) with the same bins, so label and level always agree.

Resumable (`thinkrl.chunks.ChunkedOutput`, shared with `sft.build_cot`): rows are processed in chunks of
`--chunk-size`; each finished chunk is listed in `OUT_DIR/progress.json` (with its counts), then written
atomically to `OUT_DIR/chunks/NNNNNN.jsonl`; a chunk is done when both hold. A kill at any point leaves at
most the interrupted chunk to redo, and a chunk file progress.json does not list is overwritten; so
running the same command again continues where it stopped, with no duplicate and no missing row.
progress.json also fingerprints the input file, the reward and the sampling settings: resuming with
different ones is refused rather than mixing two labellings. The final files are assembled from the
chunks (and can be re-assembled with other filter flags without sampling again).

Trade-off: on vLLM's CPU backend per-request seeds are unsupported, so a resumed run samples different
(equally distributed) responses for the remaining chunks than an uninterrupted one would; on GPUs each
row's sampling is seeded by `--seed` and its row number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thinkrl.chunks import ChunkedOutput


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rl.label",
                                description="label a dataset with its pass rate under a model and a difficulty label")
    p.add_argument("input", help="JSONL dataset with a prompt and an answer per row")
    p.add_argument("--model", required=True,
                   help="'tiny-dense', 'tiny-moe', 'tiny-vl' or a local Hugging Face folder")
    p.add_argument("-o", "--output-dir", required=True, help="where labelled.jsonl, summary.json and progress go")
    p.add_argument("--samples", type=int, default=8, help="responses sampled per prompt (default 8)")
    p.add_argument("--max-tokens", type=int, default=1024, help="response budget per sample (default 1024)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--answer-field", default="answer")
    p.add_argument("--image-field", default="images",
                   help="field with a row's image paths, relative to the input file's folder or absolute (default "
                        "images; rows without it are text)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--filter-solved", action="store_true", help="leave out rows every sample solved (pass rate 1)")
    p.add_argument("--filter-unsolved", action="store_true", help="leave out rows no sample solved (pass rate 0)")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per resumable chunk (default 256)")
    p.add_argument("--max-model-len", type=int, default=None, help="engine context (default: prompt + max tokens)")
    p.add_argument("--dtype", default="auto", help="auto: float32 on CPU, the model's dtype on GPU")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of GPU memory (on CPU: of the KV-cache budget) vLLM may take; default 0.85 GPU, 0.15 CPU")
    p.add_argument("--enforce-eager", action="store_true", help="skip graph compilation (faster start)")
    p.add_argument("--reward", default="math",
                   help="the per-sample reward that judges a response correct: a built-in (math, code), an installed "
                        "`thinkrl.rewards` entry point or a module:attr path (default math)")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout", type=float, default=10.0, help="hard limit per verification, seconds")
    p.add_argument("--cache-dir", default=os.environ.get("THINKRL_CACHE", "~/.cache/thinkrl"),
                   help="where tiny models are built")
    p.add_argument("--stop-after-chunks", type=int, default=None, help=argparse.SUPPRESS)  # tests: a crash, on cue
    args = p.parse_args(argv)
    for name in ("samples", "max_tokens", "chunk_size", "reward_workers", "tensor_parallel_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.top_p <= 1 or args.temperature < 0:
        p.error("--top-p must be in (0, 1] and --temperature >= 0")
    return args


def read_rows(path: Path, prompt_field: str, answer_field: str, image_field: str = "images") -> list[dict]:
    """Every row of a JSONL file, a row with images holding them in `image_field` as absolute paths.

    Raises DataError listing each bad line (number and field), up to 20, or naming the first bad image
    (file:row, field and index: missing, unreadable, or not as many as the prompt's `<image>` marks).
    """
    from thinkrl.fileio import DataError, read_jsonl
    from thinkrl.vl.inputs import resolve_images

    try:
        rows = read_jsonl(path, (prompt_field, answer_field), list_errors=20)
    except DataError as e:
        raise DataError(f"{e} (nothing labelled)") from None
    for index, row in enumerate(rows, start=1):
        try:
            images = resolve_images(row, image_field, path.parent, f"{path}:{index}", prompt_field)
        except ValueError as e:
            raise DataError(f"{e} (nothing labelled)") from None
        if images:
            row[image_field] = images
    return rows


def prompt_lengths(model_path: Path, rows: list[dict], prompts: list[list[int]], image_field: str) -> list[int]:
    """Each prompt's length as the engine runs it: an image placeholder counts as that image's tokens
    (the model's processor, `thinkrl.vl.inputs.VisionInputs`, runs on each image once). Raises
    ValueError if rows have images and the model takes none."""
    with_images = [i for i, row in enumerate(rows) if row.get(image_field)]
    if not with_images:
        return [len(p) for p in prompts]
    from thinkrl.vl import is_vl
    from thinkrl.vl.inputs import VisionInputs

    if not is_vl(model_path):
        raise ValueError(f"{len(with_images)} row(s) have images (first: row {with_images[0] + 1}, field "
                         f"{image_field!r}), but {model_path} is not a vision-language model")
    vision = VisionInputs(model_path)
    return [len(vision.expand(p, row_images(row, image_field))) for row, p in zip(rows, prompts, strict=True)]


def row_images(row: dict, image_field: str) -> list[bytes]:
    """The encoded images of a row `read_rows` returned (none for a text row)."""
    return [Path(p).read_bytes() for p in row.get(image_field) or []]


def fingerprint(args: argparse.Namespace, model_path: Path) -> dict:
    """What must not change between a run and its resumption."""
    digest = hashlib.sha256(Path(args.input).read_bytes()).hexdigest()
    keys = ("samples", "max_tokens", "temperature", "top_p", "seed", "prompt_field", "answer_field",
            "image_field", "system_prompt", "reward")
    return {"input_sha256": digest, "model": str(model_path), **{k: getattr(args, k) for k in keys}}


def open_chunks(args: argparse.Namespace, n_rows: int, model_path: Path) -> ChunkedOutput:
    """The labelling's chunks in `--output-dir` (`thinkrl.chunks`); ValueError if it holds a different one."""
    from thinkrl.chunks import ChunkedOutput

    return ChunkedOutput(Path(args.output_dir).expanduser(), fingerprint(args, model_path), n_rows, args.chunk_size,
                         name="{:06d}.jsonl")


class Labeller:
    """The vLLM engine, tokenizer and reward set; `label(rows, prompts, first)` labels one chunk."""

    def __init__(self, args: argparse.Namespace, model_path: Path, max_prompt_len: int) -> None:
        from rewards.combine import RewardSet
        from thinkrl.inference import build_llm, on_cpu
        from thinkrl.models import load_tokenizer

        self.args = args
        self.is_cpu = on_cpu()
        self.tokenizer = load_tokenizer(model_path)
        self.reward_set = RewardSet([args.reward], args.reward_workers, args.reward_timeout)
        memory = args.gpu_memory_utilization or (0.15 if self.is_cpu else 0.85)
        self.llm = build_llm(str(model_path), seed=args.seed, dtype=args.dtype, enforce_eager=args.enforce_eager,
                             max_model_len=args.max_model_len or max_prompt_len + args.max_tokens,
                             tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=memory)

    def label(self, rows: list[dict], prompts: list[list[int]], first: int) -> tuple[list[dict], dict]:
        """Labelled copies of `rows` (rows `first`, `first + 1`, ... of the input) and the chunk's counts."""
        from vllm import SamplingParams

        from rewards.types import RewardInput
        from rollout.engine import token_prompts
        from samplers.difficulty import pass_rate_bin

        a = self.args
        params = [SamplingParams(n=a.samples, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                                 seed=None if self.is_cpu else a.seed * 10**9 + first + j)
                  for j in range(len(rows))]
        images = [row_images(row, a.image_field) for row in rows]
        outputs = self.llm.generate(token_prompts(prompts, images), params, use_tqdm=False)
        fields = (a.prompt_field, a.answer_field)
        groups = [[RewardInput(str(row[a.prompt_field]), c.text, str(row[a.answer_field]), len(c.token_ids),
                               {k: v for k, v in row.items() if k not in fields}) for c in out.outputs]
                  for row, out in zip(rows, outputs, strict=True)]
        scored = self.reward_set.score_groups(groups, 1)
        labelled = []
        for row, group in zip(rows, scored, strict=True):
            pass_rate = sum(s.correct for s in group) / len(group)
            labelled.append({**row, "pass_rate": pass_rate, "difficulty_label": pass_rate_bin(pass_rate)[1]})
        completions = [c for out in outputs for c in out.outputs]
        stats = {"rows": len(rows), "generated_tokens": sum(len(c.token_ids) for c in completions),
                 "truncated": sum(c.finish_reason == "length" for c in completions),
                 "reward_failures": sum(bool(s.failed) for group in scored for s in group)}
        return labelled, stats

    def close(self) -> None:
        self.reward_set.close()


def assemble(out_dir: Path, args: argparse.Namespace, chunks: ChunkedOutput) -> dict:
    """Write labelled.jsonl (filters applied) and summary.json from the finished chunks; returns the summary."""
    from samplers.difficulty import PASS_RATE_BINS
    from thinkrl.fileio import atomic_write_json, write_jsonl

    rows = [json.loads(line) for c in range(chunks.n_chunks) for line in chunks.read(c).splitlines()]
    solved = [r for r in rows if r["pass_rate"] == 1.0]
    unsolved = [r for r in rows if r["pass_rate"] == 0.0]
    kept = [r for r in rows if not (args.filter_solved and r["pass_rate"] == 1.0)
            and not (args.filter_unsolved and r["pass_rate"] == 0.0)]
    write_jsonl(out_dir / "labelled.jsonl", kept)
    histogram: dict[str, int] = {}
    for r in rows:
        key = f"{round(r['pass_rate'] * args.samples)}/{args.samples}"
        histogram[key] = histogram.get(key, 0) + 1
    records = chunks.records.values()
    totals = {k: sum(c[k] for c in records) for k in ("generated_tokens", "truncated", "reward_failures")}
    summary = {
        "input": str(Path(args.input).resolve()),
        "model": chunks.settings["model"],
        "rows": len(rows),
        "rows_written": len(kept),
        "solved_rows": len(solved),
        "unsolved_rows": len(unsolved),
        "filtered_solved": len(solved) if args.filter_solved else 0,
        "filtered_unsolved": len(unsolved) if args.filter_unsolved else 0,
        "mean_pass_rate": sum(r["pass_rate"] for r in rows) / len(rows),
        "labels": {label: sum(r["difficulty_label"] == label for r in rows) for _, _, label in PASS_RATE_BINS},
        "pass_rate_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0].split("/")[0]))),
        "bins": [{"min_pass_rate": lower, "level": level, "label": label} for lower, level, label in PASS_RATE_BINS],
        "samples_per_prompt": args.samples,
        "generated_tokens": totals["generated_tokens"],
        "truncated_share": totals["truncated"] / (len(rows) * args.samples),
        "reward_failures": totals["reward_failures"],
        "settings": chunks.settings,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def prepare(args: argparse.Namespace) -> tuple[list[dict], list[list[int]], Path, ChunkedOutput, int]:
    """Validate everything before the engine starts: reward, rows and images, model, earlier progress,
    prompt lengths.

    Returns the rows, their prompt token ids (one placeholder per image), the model folder, the chunks
    and the longest prompt as the engine runs it (images expanded). Raises ValueError (DataError for bad
    rows) with a message to print as it is.
    """
    from rewards.combine import check_correctness_reward
    from thinkrl.chat import row_prompt_ids
    from thinkrl.models import load_tokenizer, resolve_model

    try:
        check_correctness_reward(args.reward)
    except ValueError as e:
        raise ValueError(f"--reward: {e}") from None
    rows = read_rows(Path(args.input), args.prompt_field, args.answer_field, args.image_field)
    model_path = resolve_model(args.model, Path(args.cache_dir).expanduser() / "models", seed=args.seed)
    chunks = open_chunks(args, len(rows), model_path)
    if not chunks.todo:
        return rows, [], model_path, chunks, 0  # all sampled: only the assembly is left
    tokenizer = load_tokenizer(model_path)
    prompts = [row_prompt_ids(tokenizer, {"prompt": str(r[args.prompt_field]), "images": r.get(args.image_field) or []},
                              args.system_prompt) for r in rows]
    lengths = prompt_lengths(model_path, rows, prompts, args.image_field)
    if args.max_model_len:
        too_long = [i for i, n in enumerate(lengths) if n + args.max_tokens > args.max_model_len]
        if too_long:
            raise ValueError(f"{args.input}: {len(too_long)} prompt(s) leave no room for --max-tokens "
                             f"{args.max_tokens} in --max-model-len {args.max_model_len} (first: row "
                             f"{too_long[0] + 1}, {lengths[too_long[0]]} tokens)")
    return rows, prompts, model_path, chunks, max(lengths)


def run(args: argparse.Namespace, rows: list[dict], prompts: list[list[int]], model_path: Path,
        chunks: ChunkedOutput, max_prompt_len: int, log=print) -> int:
    """Label the chunks not done yet, then assemble the outputs; returns the exit code.

    `max_prompt_len`: the longest prompt as the engine runs it (`prepare`), for its default context."""
    out_dir = Path(args.output_dir).expanduser()
    todo = chunks.todo
    if todo:
        if chunks.done:
            log(f"[label] resuming: {chunks.completed_rows}/{len(rows)} rows done")
        labeller = Labeller(args, model_path, max_prompt_len)
        start, rows_before, stopped = time.time(), chunks.completed_rows, False
        try:
            for n, c in enumerate(todo, start=1):
                part = chunks.rows(c)
                labelled, stats = labeller.label(rows[part], prompts[part], part.start)
                chunks.write(c, "".join(json.dumps(r) + "\n" for r in labelled), record=stats)
                rate = (chunks.completed_rows - rows_before) / (time.time() - start)
                eta = (len(rows) - chunks.completed_rows) / rate if rate > 0 else float("inf")
                log(f"[label] chunk {c + 1}/{chunks.n_chunks}  rows {chunks.completed_rows}/{len(rows)}  "
                    f"{rate:.2f} rows/s  ETA {eta:.0f}s")
                if args.stop_after_chunks is not None and n >= args.stop_after_chunks and n < len(todo):
                    stopped = True
                    break
        finally:
            labeller.close()
        if stopped:
            log(f"[label] stopped after {args.stop_after_chunks} chunk(s); run the same command again to resume")
            return 3
    summary = assemble(out_dir, args, chunks)
    log(f"[label] {summary['rows']} rows, mean pass rate {summary['mean_pass_rate']:.3f}, labels {summary['labels']}; "
        f"wrote {summary['rows_written']} rows (filtered {summary['filtered_solved']} solved, "
        f"{summary['filtered_unsolved']} unsolved)")
    log(str(out_dir / "labelled.jsonl"))
    return 0


def main(argv: list[str] | None = None) -> int:
    from rewards.types import RewardPluginError

    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        prepared = prepare(args)
    except ValueError as e:  # bad reward, rows, model or earlier progress: the message says which
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, *prepared, log=lambda msg: print(msg, flush=True))
    except RewardPluginError as e:  # the reward fails on every response: stop; a rerun resumes after the fix
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
