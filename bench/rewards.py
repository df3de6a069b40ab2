"""Reward throughput and cut-off: `math` verifications per second on 1 and 2 workers, and how long a
pathological answer takes to be cut off.

    .venv/bin/python bench/rewards.py                       # writes bench/results/rewards.json
    .venv/bin/python bench/rewards.py --reps 3 --samples 200 --out /tmp/rewards.json   # quicker

Throughput: a fixed set of `--samples` long-CoT responses (a thinking paragraph, then a `\\boxed{}`
answer: integers, decimals, fractions, LaTeX expressions, sets, intervals; about half correct), scored
by `RewardSet(["math"])` in groups of 8, with the pool already started and warm. Both pools live side by
side and run alternately (1, 2, 2, 1, 1, 2, ...) so that drift of a shared machine hits both alike; the
figure is the median over `--reps` runs, and the speed-up is the median of the ratio of adjacent runs.
For reference, a load-independent figure: the CPU milliseconds of one verification in-process (no pool).
Cut-off: a `\\boxed{9^{9^{9^{9^{9}}}}}` answer against gold `1` with `--timeout` seconds, from the call
to the score-0 "timeout" result, median over 3 tries (the killed worker is replaced in the background).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"

# (gold, a correct prediction, a wrong prediction)
ANSWERS = [
    ("42", "42", "41"), ("-7", "-7", "7"), ("\\frac{3}{4}", "0.75", "\\frac{4}{3}"), ("1/2", "\\frac{2}{4}", "2"),
    ("2\\sqrt{3}", "\\sqrt{12}", "3\\sqrt{2}"), ("3.5", "\\frac{7}{2}", "3.05"), ("\\pi/2", "\\frac{\\pi}{2}", "\\pi"),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", "\\{1, 2\\}"), ("[0, 1)", "[0,1)", "[0,1]"), ("x^2 - 1", "(x-1)(x+1)", "x^2+1"),
    ("1000", "1,000", "100"), ("25\\%", "25", "2.5"), ("\\frac{1}{6}", "\\frac{2}{12}", "\\frac{1}{5}"),
    ("120", "5!", "24"), ("(2, -1)", "(2,-1)", "(-1,2)"), ("\\infty", "\\infty", "0"),
]


def make_responses(n: int) -> list[tuple[str, str]]:
    """`n` (response, gold) pairs, deterministic: about half correct, thinking of a few hundred words."""
    out = []
    for i in range(n):
        gold, right, wrong = ANSWERS[i % len(ANSWERS)]
        steps = " ".join(f"Step {k}: consider the term {k * (i % 7 + 1)} and simplify; it checks out."
                         for k in range(5 + i % 20))
        prediction = right if (i // len(ANSWERS)) % 2 == 0 else wrong
        out.append((f"<think>Let me plan. {steps} Wait, let me verify once more.</think>"
                    f"The final answer is \\boxed{{{prediction}}}.", gold))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rewards.json")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=2.0, help="timeout_s for the cut-off measurement")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(REPO))
    from rewards.combine import RewardSet
    from rewards.types import RewardInput

    pairs = make_responses(args.samples)
    load_at_start = os.getloadavg()[0]
    # load-independent reference: CPU seconds of one verification in this process (no pool, no IPC)
    from rewards.math import MathReward

    math = MathReward()
    math(RewardInput("q", *pairs[0]))  # imports
    cpu_start = time.process_time()
    for response, gold in pairs[:80]:
        math(RewardInput("q", response, gold))
    cpu_ms = (time.process_time() - cpu_start) / min(80, len(pairs)) * 1000
    print(f"in-process: {cpu_ms:.1f} CPU ms per verification", flush=True)
    groups = [[RewardInput("q", r, g, len(r.split())) for r, g in pairs[i : i + 8]] for i in range(0, len(pairs), 8)]
    sets = {w: RewardSet(["math"], num_workers=w, timeout_s=30) for w in (1, 2)}
    try:
        for rs in sets.values():  # start-up and first imports are not what is measured
            rs.score_groups(groups[:2], 1)
        runs: dict[int, list[float]] = {1: [], 2: []}
        accuracy = None
        for rep in range(args.reps):
            for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                start = time.perf_counter()
                scored = sets[w].score_groups(groups, 1)
                runs[w].append(args.samples / (time.perf_counter() - start))
                accuracy = sum(s.correct for g in scored for s in g) / args.samples
                print(f"rep {rep + 1}/{args.reps} workers={w}: {runs[w][-1]:.1f} verifications/s", flush=True)
        speedups = [b / a for a, b in zip(runs[1], runs[2], strict=True)]
    finally:
        for rs in sets.values():
            rs.close()

    cutoffs = []
    with RewardSet(["math"], num_workers=2, timeout_s=args.timeout) as rs:
        rs.score_groups([[RewardInput("q", "\\boxed{1}", "1", 1)]], 1)
        for _ in range(3):
            start = time.perf_counter()
            (scored,), = rs.score_groups([[RewardInput("q", TOWER, "1", 1)]], 1)
            cutoffs.append(time.perf_counter() - start)
            if not scored.reasons["math"].startswith("timeout"):
                raise SystemExit(f"the tower was not cut off: {scored.reason}")
            print(f"tower cut off after {cutoffs[-1]:.2f} s (timeout_s={args.timeout:g})", flush=True)
            time.sleep(args.timeout + 3)  # let the replacement worker start before the next try

    result = {
        "name": "rewards", "samples": args.samples, "reps": args.reps, "correct_share": accuracy,
        "verifications_per_s": {str(w): {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                                for w, v in runs.items()},
        "speedup_2_over_1": {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)},
        "cutoff_s": {"timeout_s": args.timeout, "median": statistics.median(cutoffs), "runs": cutoffs},
        "cpu_ms_per_verification_in_process": cpu_ms,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_start": load_at_start, "load_avg_1m_at_end": os.getloadavg()[0]},
        "command": " ".join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),  # no machine path
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: result[k] for k in ("verifications_per_s", "speedup_2_over_1", "cutoff_s",
                                             "cpu_ms_per_verification_in_process", "machine")}, indent=1))


if __name__ == "__main__":
    main()
