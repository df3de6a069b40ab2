"""`make demo`: start a local Ray head if none runs, submit the tiny recipe as a Ray job, print the report.

The job is submitted exactly as a cluster user would (`ray job submit --working-dir DIR -- python -m
rl.train recipes/tiny.yaml ...`), DIR being a snapshot of this checkout's code taken just before
(thinkrl.cluster.code_snapshot: files growing in the checkout, such as `make demo > demo.log`, cannot
break the upload). Submitting again with the same run directory resumes the run. The Ray head stays up
after the job (its dashboard keeps the logs); the last lines say how to stop it (`make ray-stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def ray_cli() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def ensure_head(dashboard: str, env: dict) -> bool:
    """Start a local head (with the job server) unless one answers at `dashboard`; True if started here."""
    probe = subprocess.run([ray_cli(), "job", "list", "--address", dashboard], capture_output=True, text=True, env=env)
    if probe.returncode == 0:
        return False
    port = dashboard.rsplit(":", 1)[-1]
    print(f"[demo] starting a local Ray head (dashboard {dashboard})", flush=True)
    subprocess.run([ray_cli(), "start", "--head", "--num-cpus", str(os.cpu_count() or 2), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", port, "--disable-usage-stats"], check=True, env=env)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "tiny"))
    parser.add_argument("--recipe", default="recipes/tiny.yaml")
    parser.add_argument("--dashboard", default=os.environ.get("RAY_DASHBOARD", "http://127.0.0.1:8265"))
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the recipe")
    args = parser.parse_args()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray heads enable token authentication by default; the CLI must then send the head's token
    env.setdefault("RAY_AUTH_MODE", "token")
    started = ensure_head(args.dashboard, env)
    try:
        return submit_and_report(args, env)
    finally:
        how = "started by this demo" if started else "it was running before the demo"
        print(f"\n[demo] the local Ray head ({how}; dashboard {args.dashboard}) is still running and keeps the "
              "job's logs.\n[demo] stop it with `make ray-stop` (`ray stop`: every Ray process of this machine).",
              flush=True)


def submit_and_report(args: argparse.Namespace, env: dict) -> int:
    """Submit the job on a snapshot of the code, wait for it, print the report; the exit code."""
    from thinkrl.cluster import code_snapshot

    run_dir = Path(args.run_dir).resolve()
    runtime_env = {"env_vars": {"THINKRL_CACHE": str(REPO / ".cache"), "PYTHONUNBUFFERED": "1"}}
    with tempfile.TemporaryDirectory(prefix="thinkrl-job-") as tmp:
        code = code_snapshot(REPO, Path(tmp) / "code")
        cmd = [ray_cli(), "job", "submit", "--address", args.dashboard, "--working-dir", code,
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "rl.train", args.recipe, f"run.output_dir={run_dir}", *args.overrides]
        print("[demo] " + " ".join(cmd[:8]) + " ... -- " + " ".join(cmd[cmd.index("--") + 1 :]), flush=True)
        job = subprocess.run(cmd, env=env)
    report_path = run_dir / "report.json"
    if job.returncode != 0 or not report_path.exists():
        print(f"[demo] the job failed (exit {job.returncode}); its logs are above", file=sys.stderr)
        return job.returncode or 1
    report = json.loads(report_path.read_text())
    print("\n[demo] report ({} held-out problems; {} samples each at temperature {})".format(
        report["n_heldout"], report["eval_decoding"]["samples_per_prompt"], report["eval_decoding"]["temperature"]))
    print(f"  held-out accuracy       {report['accuracy_before_rl']:.3f} -> {report['accuracy_after_rl']:.3f}")
    for task, before in report.get("accuracy_by_task_before_rl", {}).items():
        print(f"    {task:<21} {before:.3f} -> {report['accuracy_by_task_after_rl'][task]:.3f}  "
              f"({report['n_heldout_by_task'][task]} problems)")
    print(f"  mean response tokens    {report['mean_response_tokens_before_rl']:.1f} -> "
          f"{report['mean_response_tokens_after_rl']:.1f}")
    print("  wall seconds            " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_seconds"].items()))
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
