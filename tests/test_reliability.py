"""Pure pieces of crash consistency: JSONL logs cut at a resume, TensorBoard purged alike, checkpoint pruning,
and the watchdog that takes a SIGKILLed driver's processes down."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.checkpoint import prune
from thinkrl.metrics import MetricsLogger, read_jsonl_records, truncate_jsonl
from thinkrl.reaper import _processes

REPO = Path(__file__).resolve().parent.parent


def _write(path: Path, records: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_truncate_drops_later_steps_redone_records_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"iteration": 0, "eval/accuracy": 0.1}, {"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 0.5},
                  {"iteration": 2, "eval/accuracy": 0.3}, {"iteration": 3, "loss": 0.2}], torn='{"iteration": 4, "lo')
    truncate_jsonl(path, "iteration", 2, redone=("eval/accuracy",))
    assert read_jsonl_records(path) == [{"iteration": 0, "eval/accuracy": 0.1}, {"iteration": 1, "loss": 1.0},
                                        {"iteration": 2, "loss": 0.5}]
    truncate_jsonl(path, "iteration", None)
    assert not path.exists()


def test_a_corrupt_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_jsonl_records(path)


def test_tensorboard_is_purged_like_the_jsonl_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        first.log(step, {"train/reward_mean": float(step)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = MetricsLogger(tmp_path, resume_step=2)  # the run resumes from the checkpoint of iteration 2
    resumed.log(3, {"train/reward_mean": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [r["iteration"] for r in resumed.records()] == [1, 2, 3]
    MetricsLogger(tmp_path).close()  # a fresh start: both empty
    assert not (tmp_path / "metrics.jsonl").exists()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == []


def test_prune_keeps_the_newest_and_latest_and_clears_leftovers(tmp_path):
    for n in (1, 2, 3, 4):
        (tmp_path / f"iter_{n:06d}").mkdir()
    (tmp_path / ".iter_000005.tmp-abc").mkdir()  # a save killed midway
    (tmp_path / ".iter_000000.deleting").mkdir()  # a delete killed midway
    (tmp_path / "latest.json").write_text(json.dumps({"iteration": 2, "path": "iter_000002"}))
    assert prune(tmp_path, keep=2) == ["iter_000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000002", "iter_000003", "iter_000004", "latest.json"]


DRIVER = """
import subprocess, sys, time
from thinkrl import reaper
keep = reaper.start()
# a child in a session of its own, as Ray's agents are once their raylet is gone: a kill of the driver's
# process group would miss it
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def test_the_watchdog_kills_what_a_sigkilled_driver_started(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(driver.stdout.readline())
    time.sleep(2)  # the watchdog notes the driver's descendants every second
    start = _processes()[child][1]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 15
    while _processes().get(child, (0, None))[1] == start and time.time() < deadline:
        time.sleep(0.2)
    assert _processes().get(child, (0, None))[1] != start, "the driver's child outlived it"
