"""The `thinkrl` command: one entry point for the toolkit's CLIs, each also runnable as `python -m ...`.

    thinkrl train recipes/tiny.yaml rl.iterations=80     # python -m rl.train
    thinkrl sft recipes/tiny.yaml                         # python -m sft.train
    thinkrl build-cot questions.jsonl -o out/ ...         # python -m sft.build_cot
    thinkrl label data.jsonl --model DIR -o out/          # python -m rl.label
    thinkrl score --reward math responses.jsonl -o s.jsonl  # python -m rewards.score
    thinkrl export-data recipes/tiny-reasoning-gym.yaml --out rg/  # python -m rl.export_data
    thinkrl eval recipes/tiny.yaml --model DIR --out eval.json    # python -m rl.evaluate
    thinkrl merge A B --alpha 0.5 --out merged/                   # python -m rl.merge
    thinkrl long2short recipes/tiny.yaml --method dpo --model DIR --out short/  # python -m rl.long2short

Subcommands import their module only when chosen, so `thinkrl --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("rl.train", "RL run: SFT warmup, then policy mirror descent"),
    "sft": ("sft.train", "the long-CoT SFT warmup alone"),
    "build-cot": ("sft.build_cot", "build verified long-CoT SFT data from question/answer data"),
    "label": ("rl.label", "label a dataset's difficulty with a model's pass rate"),
    "score": ("rewards.score", "score saved responses with rewards"),
    "export-data": ("rl.export_data", "write a recipe's train and held-out prompts as JSONL (e.g. reasoning-gym rows)"),
    "eval": ("rl.evaluate", "held-out accuracy and response length of a model folder under a recipe (JSON)"),
    "merge": ("rl.merge", "long2short: average two models of one architecture, alpha*A + (1-alpha)*B"),
    "long2short": ("rl.long2short", "long2short: shortest rejection sampling (SFT) or DPO on a model's own samples"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}  (python -m {module})" for name, (module, help_) in COMMANDS.items()]
        print("usage: thinkrl COMMAND [args...]\n\ncommands:\n" + "\n".join(lines))
        unknown = bool(argv) and argv[0] not in ("-h", "--help")
        if unknown:
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
        return 2 if unknown or not argv else 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"thinkrl {argv[0]}", *argv[1:]]
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
