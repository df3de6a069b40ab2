"""Score a JSONL file of responses with any rewards: `python -m rewards.score --reward math IN.jsonl -o OUT.jsonl`.

Each input row (fields configurable: response, answer, optionally prompt and num_tokens) is written to
the output with all its fields kept plus `reward` (the total), `rewards` (sub-scores by name) and
`reason`. Rows with the same prompt form one group (what group rewards such as `length` see). The prompt
is needed only for that grouping: with per-sample rewards only, a row without one is scored alone, with
prompt "". With a group reward active, a row without a prompt stops the run before any scoring (exit 2)
with one error naming the file, row, field and reward: the groups, and so every row's group score,
would be guesses. Any other bad row (not JSON, not an object, no response or answer) is kept and scored
0, with a reason naming its line; it is not dropped silently. Without a token count field, `num_tokens`
is the number of whitespace-separated words.
The output is written atomically (a temporary file renamed into place). A summary (count, mean, bad
rows, failures, timeouts, rows/s) goes to stderr, and with `--summary PATH` to a JSON file.

Examples:
    python -m rewards.score --reward math --reward length --weight length=0.1 in.jsonl -o out.jsonl
    python -m rewards.score --reward code --option code.timeout_s=2 --answer-field tests in.jsonl -o out.jsonl
    python -m rewards.score --reward my_module:my_reward in.jsonl -o out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"{flag} {text!r}: expected NAME=VALUE")
    return key, value


def build_specs(rewards: list[str], weights: list[str], options: list[str], warmups: list[str]) -> list[dict]:
    """Reward spec dicts from the CLI flags (`--option name.key=value` values are JSON, else strings)."""
    specs = {name: {"name": name} for name in rewards}
    for text in weights:
        name, value = _key_value(text, "--weight")
        specs.setdefault(name, {"name": name})["weight"] = float(value)
    for text in warmups:
        name, value = _key_value(text, "--warmup")
        specs.setdefault(name, {"name": name})["warmup_iterations"] = int(value)
    for text in options:
        target, value = _key_value(text, "--option")
        name, dot, key = target.rpartition(".")
        if not dot:
            raise SystemExit(f"--option {text!r}: expected NAME.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        specs.setdefault(name, {"name": name}).setdefault("options", {})[key] = parsed
    return list(specs.values())


def read_rows(path: Path, fields: dict[str, str]) -> list[tuple[int, dict | None, str]]:
    """(line number, row or None, problem) for every non-blank line; problem is "" for a good row.

    A good row has the response and answer fields; whether it needs a prompt is `group_rows`' question.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((number, None, f"{path}:{number}: not JSON ({e.msg})"))
                continue
            if not isinstance(row, dict):
                rows.append((number, {"value": row}, f"{path}:{number}: not a JSON object"))
                continue
            missing = [f for f in (fields["response"], fields["answer"]) if f not in row]
            problem = f"{path}:{number}: missing field {', '.join(map(repr, missing))}" if missing else ""
            rows.append((number, row, problem))
    return rows


def group_rows(rows: list[tuple[int, dict | None, str]], prompt_field: str, group_rewards: list[str],
               path: Path) -> list[list[int]]:
    """Indices into `rows` of the good rows, grouped by prompt (groups in order of first appearance).

    A good row without `prompt_field` is a group of its own, unless `group_rewards` (the names of the
    active group rewards) is not empty: then ValueError names the first such row, the field and the reward.
    """
    groups: dict[str, list[int]] = {}
    alone: list[list[int]] = []
    good = [(number, row) for number, row, problem in rows if not problem]
    lacking = [number for number, row in good if prompt_field not in row]
    if lacking and group_rewards:
        which = (f"the group reward {group_rewards[0]!r} needs" if len(group_rewards) == 1 else
                 f"the group rewards {', '.join(map(repr, group_rewards))} need")
        raise ValueError(f"{path}:{lacking[0]}: missing field {prompt_field!r} ({len(lacking)} of "
                         f"{len(good)} rows lack it), which {which} to group the responses of one prompt; "
                         "add the field (or name it with --prompt-field), or score with per-sample rewards "
                         "only")
    for k, (_, row, problem) in enumerate(rows):
        if problem:
            continue
        if prompt_field in row:
            groups.setdefault(str(row[prompt_field]), []).append(k)
        else:
            alone.append([k])
    return list(groups.values()) + alone


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewards.score", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("Examples:")[1])
    parser.add_argument("input", type=Path, help="JSONL file of rows to score")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME",
                        help="built-in, entry-point name or module:attr (repeat for several; default math)")
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=W")
    parser.add_argument("--warmup", action="append", default=[], metavar="NAME=ITERS")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE")
    parser.add_argument("--iteration", type=int, default=None,
                        help="score as at this RL iteration (warmups apply); default: all rewards on")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--tokens-field", default="num_tokens", help="token count field, if the rows have one")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--timeout", type=float, default=10.0, help="hard limit per reward call, seconds")
    parser.add_argument("--max-consecutive-failures", type=int, default=32)
    parser.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here")
    return parser


def _reward_inputs(rows: list[tuple[int, dict | None, str]], fields: dict[str, str],
                   tokens_field: str) -> dict:
    """A `RewardInput` per good row, by index into `rows`: the other fields go to its metadata, and
    `num_tokens` is `tokens_field` if the row has a number there, else the response's word count."""
    from rewards.types import RewardInput

    inputs = {}
    for k, (_, row, problem) in enumerate(rows):
        if problem:
            continue
        tokens = row.get(tokens_field)
        response = str(row[fields["response"]])
        inputs[k] = RewardInput(str(row.get(fields["prompt"], "")), response, str(row[fields["answer"]]),
                                int(tokens) if isinstance(tokens, (int, float)) else len(response.split()),
                                {key: v for key, v in row.items() if key not in fields.values()})
    return inputs


def _score_groups(specs: list[dict], groups: list[list], iteration: int, *, workers: int, timeout_s: float,
                  max_consecutive_failures: int) -> tuple[list[list], dict]:
    """Score `groups` of RewardInputs in a `RewardSet` of `specs` (worker processes, closed on return).

    Returns (scores per group, the set's metrics); raises ValueError or RewardPluginError as RewardSet does.
    """
    from rewards.combine import RewardSet

    with RewardSet(specs, num_workers=workers, timeout_s=timeout_s,
                   max_consecutive_failures=max_consecutive_failures) as reward_set:
        return reward_set.score_groups(groups, iteration), reward_set.metrics()


def _write_scored(path: Path, rows: list[tuple[int, dict | None, str]], by_row: dict) -> None:
    """Write every row with its reward, sub-scores and reason (a bad row: 0 and its problem), atomically."""
    from rewards.atomic import atomic_write_text

    lines = []
    for k, (number, row, problem) in enumerate(rows):
        if problem:
            out = dict(row) if row is not None else {"line": number}
            out.update(reward=0.0, rewards={}, reason=f"bad row: {problem}")
        else:
            s = by_row[k]
            out = {**row, "reward": s.total, "rewards": s.scores, "reason": s.reason}
        lines.append(json.dumps(out, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _summarize(rows: list[tuple[int, dict | None, str]], by_row: dict, metrics: dict, seconds: float,
               output: Path) -> dict:
    """The run's summary; prints each bad row and a one-line summary to stderr."""
    good = [by_row[k] for k in by_row]
    summary = {"rows": len(rows), "scored": len(good), "bad_rows": len(rows) - len(good),
               "mean_reward": sum(s.total for s in good) / len(good) if good else 0.0,
               "failures": metrics.get("reward/failures", 0), "timeouts": metrics.get("reward/timeouts", 0),
               "rows_per_s": len(good) / seconds if seconds > 0 else 0.0, "seconds": seconds, **metrics}
    for _, _, problem in rows:
        if problem:
            print(f"bad row: {problem}", file=sys.stderr)
    print(f"scored {summary['scored']} rows ({summary['bad_rows']} bad, scored 0), mean reward "
          f"{summary['mean_reward']:.4f}, failures {summary['failures']}, timeouts {summary['timeouts']}, "
          f"{summary['rows_per_s']:.1f} rows/s -> {output}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0, or 2 if the rewards do not load, a group reward lacks prompts, or a
    reward fails for good (the output is then not written)."""
    args = _arg_parser().parse_args(argv)

    from rewards.atomic import atomic_write_text
    from rewards.config import resolve_specs
    from rewards.types import RewardPluginError

    specs = build_specs(args.reward or ["math"], args.weight, args.option, args.warmup)
    fields = {"prompt": args.prompt_field, "response": args.response_field, "answer": args.answer_field}
    iteration = args.iteration if args.iteration is not None else sys.maxsize
    try:
        rows = read_rows(args.input, fields)
    except OSError as e:
        raise SystemExit(f"cannot read {args.input}: {e}") from None
    try:
        group_rewards = [r.name for r in resolve_specs(specs)
                         if r.reward.kind == "group" and r.spec.active(iteration)]
        order = group_rows(rows, fields["prompt"], group_rewards, args.input)
    except ValueError as e:  # before any worker process starts
        print(f"rewards.score: {e}", file=sys.stderr)
        return 2
    inputs = _reward_inputs(rows, fields, args.tokens_field)

    start = time.monotonic()
    try:
        scored, metrics = _score_groups(specs, [[inputs[k] for k in ks] for ks in order], iteration,
                                        workers=args.workers, timeout_s=args.timeout,
                                        max_consecutive_failures=args.max_consecutive_failures)
    except (ValueError, RewardPluginError) as e:
        print(f"rewards.score: {e}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - start
    by_row = {k: s for ks, group in zip(order, scored, strict=True) for k, s in zip(ks, group, strict=True)}

    _write_scored(args.output, rows, by_row)
    summary = _summarize(rows, by_row, metrics, seconds, args.output)
    if args.summary is not None:
        atomic_write_text(args.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
