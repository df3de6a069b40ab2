"""Nothing of a killed run keeps running: a watchdog that takes a driver's processes down with it.

A driver that starts its own local Ray cluster (`thinkrl.cluster.init_ray`) owns the cluster's
processes: GCS, raylet, their agents, the workers that host the vLLM engines and trainer ranks. A
clean exit stops them (`ray.shutdown()`); a SIGKILL or an OOM kill of the driver does not, and Ray's
agents were measured to outlive it indefinitely. So the driver starts this watchdog in a session of
its own, holding the read end of a pipe whose write end only the driver has: when the driver is gone
for any reason, the read sees end-of-file. Until then the watchdog notes the driver's descendants
every second (pid and start time, so a reused pid is never taken for one); after, it SIGKILLs those
still alive and anything they started since, in a few rounds.

Run as `python -m thinkrl.reaper DRIVER_PID READ_FD`; `start(pid)` does that and returns the write end.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every process this user can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    """The pids below `root` in `table` (children, their children, ...), `root` excluded."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def watch(driver: int, fd: int, interval_s: float = 1.0, rounds: int = 4) -> None:
    """Note `driver`'s descendants until `fd` reads end-of-file, then kill those left and their children."""
    known: set[tuple[int, str]] = set()
    while True:
        table = _processes()
        known |= {(pid, table[pid][1]) for pid in descendants(driver, table)}
        readable, _, _ = select.select([fd], [], [], interval_s)
        if readable and not os.read(fd, 1):
            break
    for _ in range(rounds):
        table = _processes()
        targets = {pid for pid, (_, start) in table.items() if (pid, start) in known}
        for pid in list(targets):
            targets |= descendants(pid, table)
        targets.discard(os.getpid())
        if not targets:
            return
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            known.add((pid, table[pid][1]))
        time.sleep(0.5)


def start(driver: int | None = None) -> int:
    """Start the watchdog of `driver` (default: this process); returns the pipe's write end, to keep open.

    The write end is not inheritable, so only the driver holds it (a child started through exec, as
    Ray starts its processes, never does).
    """
    read_end, write_end = os.pipe()
    subprocess.Popen([sys.executable, "-m", "thinkrl.reaper", str(driver or os.getpid()), str(read_end)],
                     pass_fds=(read_end,), start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                         str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))})
    os.close(read_end)
    return write_end


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
