"""What an integration test reports when a run it started does not end in time: the tail of the run's output
and where every Python process started since is stuck (py-spy, one stack each), so that a hang seen only on
another machine (CI) can be read from that machine's log.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil


def python_stacks(since: float, frames: int = 14) -> str:
    """The innermost `frames` frames of each thread of every Python process (Ray actors included) started
    after `since` (a `time.time()`) and still alive, this process excepted."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    parts = []
    for proc in psutil.process_iter(["pid", "create_time", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] == os.getpid() or (proc.info["create_time"] or 0) < since - 1:
            continue
        if "python" not in cmd and not cmd.startswith("ray::"):
            continue  # raylet, GCS, compilers: no Python stack
        try:
            dump = subprocess.run([spy, "dump", "--pid", str(proc.info["pid"])], capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            dump = f"(py-spy: {e})"
        threads = [t.strip().splitlines() for t in dump.split("\nThread ")[1:]] or [dump.strip().splitlines()]
        lines = [line for t in threads if len(t) > 1 for line in t[:frames]]
        parts.append(f"--- pid {proc.info['pid']}: {cmd[:160]}\n" + "\n".join(lines))
    return "\n".join(parts) or "(no Python process started since)"


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)`, in a session of its own; past `timeout` it fails
    the test with the output's tail and the stacks of what is still running, then kills that session."""
    since = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = python_stacks(since)
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f} s; its output ends:\n"
                                 f"{(stdout + stderr)[-3000:]}\nwhere its processes were:\n{stacks}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def wait_for(proc: subprocess.Popen, log, marker: str, timeout: float) -> None:
    """Until `marker` appears in the file `log` that `proc` writes; fails the test if `proc` ends first, or
    (with the stacks of what runs) if `timeout` seconds pass."""
    since, deadline = proc_start(proc), time.time() + timeout
    while marker not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"the run ended before {marker!r}:\n{log.read_text(errors='replace')[-4000:]}"
        if time.time() > deadline:
            raise AssertionError(f"no {marker!r} after {timeout:.0f} s; the log ends:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}\nwhere its processes were:\n"
                                 f"{python_stacks(since)}")
        time.sleep(0.2)


def wait(proc: subprocess.Popen, log, timeout: float) -> int:
    """`proc.wait(timeout)`; past it, fails the test with the log's tail and the stacks of what runs."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout:.0f} s; the log ends:\n"
                             f"{log.read_text(errors='replace')[-3000:]}\nwhere its processes were:\n"
                             f"{python_stacks(proc_start(proc))}") from None


def proc_start(proc: subprocess.Popen) -> float:
    try:
        return psutil.Process(proc.pid).create_time()
    except psutil.Error:
        return time.time()
