"""Run the whole benchmark suite (~26 minutes on a 2-core CPU), then write the report.

    .venv/bin/python bench/run_all.py            (what `make bench` runs)
    .venv/bin/python bench/run_all.py --only weight_sync trainer_efficiency

Each benchmark is its own script and process (a crash or a hang costs that benchmark, not the suite);
its output goes to bench/results/logs/<name>.log, its result to bench/results/<name>.json, and the
status of every step to bench/results/run_all.json. docs/benchmarks.md is regenerated at the end from
whatever results exist (bench/report.py). The order matters: rollout_efficiency runs the shared SFT
warmup first and records the RL length distribution that trainer_efficiency reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import BENCH_DIR, RESULTS_DIR, ROOT

# name -> (script and arguments, timeout in seconds). Run one after another on this 2-core machine the
# suite took 25.5 minutes after a 3.8-minute install (29.2 in all, fresh clone); the timeouts only bound a hang.
STEPS: dict[str, tuple[list[str], int]] = {
    "rollout_efficiency": (["rollout_efficiency.py", "--reps", "5"], 900),
    # the tiny recipe's own batch (32 prompts x k=8), with the learning curve evaluated every 3 iterations
    "rl_throughput_tiny-dense": (["rl_vs_trl.py", "--model", "tiny-dense", "--prompts", "32", "--reps", "5",
                                  "--eval-every", "3", "--heldout", "40", "--try-trl-vllm"], 1200),
    "trainer_efficiency": (["trainer_efficiency.py", "--reps", "5"], 600),
    "weight_sync": (["weight_sync.py", "--reps", "5"], 600),
    "rewards": (["rewards.py", "--samples", "200"], 300),  # benchmark 5, written by the rewards module's owner
    # the MoE warmup is cut short to fit the budget: its lengths are an early-SFT distribution
    "rl_throughput_tiny-moe": (["rl_vs_trl.py", "--model", "tiny-moe", "--prompts", "8", "--reps", "5",
                                "--sft-steps", "60"], 900),
    # the tiny Kimi-VL (random weights, no warmup): rollout vs raw vLLM and trainer image vs text; estimated at
    # ~5 minutes on this machine idle, not yet timed inside the suite
    "vl_efficiency": (["vl_efficiency.py", "--reps", "5"], 900),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="run just these benchmarks")
    # the tiny recipe's own warmup (500 steps, ~5 minutes here): measured, 200 steps leave a policy at 2.5%
    # held-out accuracy (45.6% after 500), which no RL comparison should start from
    p.add_argument("--sft-steps", type=int, default=0, help="shared SFT warmup length (0: the tiny recipe's own)")
    p.add_argument("--status", default="run_all", help="name of the status file (two suites side by side)")
    args = p.parse_args(argv)

    from thinkrl.fileio import atomic_write_json

    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    status_file = RESULTS_DIR / f"{args.status}.json"
    status = json.loads(status_file.read_text()).get("steps", {}) if status_file.exists() else {}
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    start = time.time()
    for name in args.only or list(STEPS):
        script, timeout = STEPS[name]
        if not (BENCH_DIR / script[0]).exists():
            status[name] = {"status": f"skipped: bench/{script[0]} does not exist", "wall_s": 0.0}
            continue
        cmd = [sys.executable, str(BENCH_DIR / script[0]), *script[1:]]
        if args.sft_steps and "--sft-steps" not in script and script[0] in ("rl_vs_trl.py", "rollout_efficiency.py", "trainer_efficiency.py"):
            cmd += ["--sft-steps", str(args.sft_steps)]
        log = logs / f"{name}.log"
        print(f"[bench] {name}: {' '.join(cmd[1:])}  (log: {log.relative_to(ROOT)})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
                outcome = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                outcome = f"timed out after {timeout}s"
        status[name] = {"status": outcome, "wall_s": time.time() - t0, "log": str(log.relative_to(ROOT))}
        print(f"[bench] {name}: {outcome} in {time.time() - t0:.0f}s", flush=True)
        atomic_write_json(status_file, {"steps": status, "total_s": time.time() - start})
    atomic_write_json(status_file, {"steps": status, "total_s": time.time() - start})
    subprocess.run([sys.executable, str(BENCH_DIR / "report.py")], cwd=ROOT, check=True)
    print(f"[bench] suite done in {time.time() - start:.0f}s", flush=True)
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
