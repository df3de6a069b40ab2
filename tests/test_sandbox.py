"""The code reward's sandbox against hostile programs (rewards/code.py; docs/reliability.md, "Code sandbox").

Every hostile program starts with `_DISARM`, which switches the audit hook off from inside the
interpreter, as a hostile user did in issue 18; what each test then sees is the kernel's boundary (bwrap's
namespaces, the read-only view, the rlimits), not the hook. Each program reports what it got as JSON on
its last line of stdout, and each test asserts both that report and, from outside, that nothing changed
on the host. bwrap is installed by `make install`; these tests do not skip without it, they fail.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards.code import BWRAP_ENV, MAX_PROCESSES, CodeReward, SandboxUnavailable, _python_roots, run_python
from rewards.config import resolve_specs
from rewards.types import RewardInput

# Rewrites the hook's module state: by walking the frames up to the prelude's globals, and through gc.
_DISARM = """
import gc, sys
def _disarm(scope):
    scope.update(_denied=("\\0",), _inside=lambda path, roots: True, _path_events=set())
_frame = sys._getframe()
while _frame is not None:
    if "_hook" in _frame.f_globals:
        _disarm(_frame.f_globals)
    _frame = _frame.f_back
for _obj in gc.get_objects():
    if isinstance(_obj, dict) and "_hook" in _obj and "_denied" in _obj:
        _disarm(_obj)
"""

_REPORT = """
import json
def attempt(what, fn):
    try:
        return {what: repr(fn())}
    except BaseException as e:
        return {what: type(e).__name__ + ": " + str(e)}
"""


_PATIENT_S = 60.0  # the limit of runs that should end by themselves: generous, for a loaded machine


def hostile(body: str, **limits) -> tuple[dict, object]:
    """Run `_DISARM`, then `body`, which prints `json.dumps(report)`; (the report, the RunResult)."""
    run = run_python(_DISARM + _REPORT + body, **{"timeout_s": _PATIENT_S, **limits})
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return (reports[-1] if reports else {}), run


def _as_process(code: str, token: str) -> str:
    """A program that re-executes itself as `python -c code token`, so its processes carry `token` in their
    command line (split in the source, so that no command line holding the source matches)."""
    half = len(token) // 2
    argv = f"[sys.executable, '-c', {code!r}, {token[:half]!r} + {token[half:]!r}]"
    return _DISARM + f"import os, sys\nos.execv(sys.executable, {argv})\n"


def _processes_with(token: str) -> list[int]:
    """Host pids whose command line contains `token`."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def test_kernel_isolation_is_what_runs_here():
    run = run_python("import os\nprint(os.getcwd(), os.getuid() != 0)", timeout_s=_PATIENT_S)
    assert run.ok and run.stdout.split() == ["/sandbox", "True"], run


def test_disarmed_hook_leaves_the_kernel_boundary():
    report, run = hostile("""
import os
report = {"root": sorted(os.listdir("/")), "uid": os.getuid()}
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs"):
    report[key] = status[key].strip()
report.update(attempt("write /usr", lambda: open("/usr/owned", "w")))
report.update(attempt("setuid 0", lambda: os.setuid(0)))
report.update(attempt("kill init", lambda: os.kill(1, 9)))
report["processes"] = sorted(p for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(report))
""")
    assert run.ok, run.stderr
    # the hook is off (it refused listing / and reading /proc) and the kernel still holds
    python_tops = {Path(root).parts[1] for root in _python_roots()}  # e.g. root, for a pyenv Python
    assert set(report["root"]) <= {"sandbox", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
                                   "proc", "dev"} | python_tops
    assert report["uid"] != 0
    assert {report[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert report["NoNewPrivs"] == "1"
    assert "Read-only file system" in report["write /usr"]
    # EPERM; in a user namespace (not root outside) uid 0 does not even exist: EINVAL
    assert report["setuid 0"].startswith(("PermissionError", "OSError: [Errno 22] Invalid argument"))
    assert report["kill init"].startswith("PermissionError") or report["kill init"] == "None"
    assert len(report["processes"]) <= 3  # bwrap's init and this program: nothing of the host


def test_reads_and_writes_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("run data")
    before = sorted(os.listdir(tmp_path))
    escape = f"/tmp/escape-{uuid.uuid4().hex}"
    report, run = hostile(f"""
import os
report = {{}}
report.update(attempt("read shadow", lambda: open("/etc/shadow").read()))
report.update(attempt("read secret", lambda: open({str(secret)!r}).read()))
report.update(attempt("overwrite secret", lambda: open({str(secret)!r}, "w").write("owned")))
report.update(attempt("write beside", lambda: open({str(tmp_path / 'escape.txt')!r}, "w").write("x")))
report.update(attempt("write /tmp", lambda: open({escape!r}, "w").write("x")))
report.update(attempt("read passwd", lambda: open("/etc/passwd").read()))
report.update(attempt("read host root", lambda: os.listdir("/root")))
print(json.dumps(report))
""")
    assert run.ok, run.stderr
    for what in ("read shadow", "read secret", "overwrite secret", "write beside", "read passwd"):
        assert report[what].startswith("FileNotFoundError"), (what, report[what])
    # /tmp is absent in the sandbox, or (when the venv lives under /tmp, as in a fresh clone there) a
    # read-only skeleton bwrap made to reach it: not writable either way
    assert report["write /tmp"].startswith(("FileNotFoundError", "PermissionError")), report["write /tmp"]
    assert not os.path.exists(escape)
    assert "run data" not in run.stdout
    assert secret.read_text() == "run data" and sorted(os.listdir(tmp_path)) == before


def test_exec_a_shell(tmp_path):
    outside = tmp_path / "from-shell"
    report, run = hostile(f"""
import os, subprocess
report = {{}}
report.update(attempt("os.system", lambda: os.system("touch {outside} 2>/dev/null; id -u > shell-id")))
report["shell ran as"] = open("shell-id").read().strip()
report.update(attempt("subprocess", lambda: subprocess.run(["/bin/sh", "-c", "touch {outside}"],
                                                             capture_output=True, text=True).stderr))
report.update(attempt("see host", lambda: subprocess.run(["/bin/sh", "-c", "ls /home /etc/shadow"],
                                                           capture_output=True, text=True).stderr))
print(json.dumps(report), flush=True)
os.execv("/bin/sh", ["sh", "-c", "touch {outside} || echo exec-ran-and-failed"])
""")
    assert report["shell ran as"] not in ("", "0")
    assert "No such file or directory" in report["subprocess"] and "No such file" in report["see host"]
    assert "exec-ran-and-failed" in run.stdout
    assert not outside.exists()


def test_fork_loop_is_limited_and_returns_in_time():
    report, run = hostile("""
import os, time
children = []
report = {}
try:
    for _ in range(1000):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
except OSError as e:
    report["fork failed"] = type(e).__name__ + ": " + str(e)
report["children"] = len(children)
print(json.dumps(report), flush=True)
time.sleep(60)
""", timeout_s=10)
    assert run.timed_out
    assert report["children"] < MAX_PROCESSES and "Resource temporarily unavailable" in report["fork failed"]

    token = uuid.uuid4().hex
    start = time.monotonic()
    bomb = run_python(_as_process("import os\nwhile True:\n    try:\n        os.fork()\n"
                                  "    except OSError:\n        pass\n", token), timeout_s=2)
    assert bomb.timed_out and time.monotonic() - start < 15
    assert _processes_with(token) == []


def test_ctypes_libc_system(tmp_path):
    outside = tmp_path / "from-libc"
    report, run = hostile(f"""
import ctypes
libc = ctypes.CDLL(None)
report = {{"system": libc.system(b"touch {outside}"), "setuid": libc.setuid(0),
           "unshare user+mount": libc.unshare(0x10000000 | 0x00020000)}}
print(json.dumps(report))
""")
    assert run.ok, run.stderr
    assert report["system"] != 0 and report["setuid"] == -1
    assert not outside.exists()


def _host_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the interface a route leads to
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_sockets_reach_nothing():
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    targets = [("127.0.0.1", port), ("1.1.1.1", 53)] + [(a, port) for a in [_host_address()] if a]
    try:
        report, run = hostile(f"""
import socket
report = {{}}
for host, port in {targets!r}:
    report.update(attempt(f"{{host}}:{{port}}", lambda: socket.create_connection((host, port), timeout=2)))
report["interfaces"] = [name for _, name in socket.if_nameindex()]
print(json.dumps(report))
""")
    finally:
        stop.set()
        thread.join()
        server.close()
    assert run.ok, run.stderr
    assert report["interfaces"] == ["lo"]  # the sandbox's own loopback, where nothing listens
    assert report[f"127.0.0.1:{port}"].startswith("ConnectionRefusedError"), report
    for host, port in targets[1:]:
        assert report[f"{host}:{port}"].startswith("OSError: [Errno 101] Network is unreachable"), report
    assert accepted == []


def test_nothing_outlives_the_run(tmp_path):
    token = uuid.uuid4().hex
    marker = tmp_path / "marker"
    report, run = hostile(f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c",
                 "import time; time.sleep(2); open({str(marker)!r}, 'w').write('alive')", {token!r}])
    os._exit(0)
os.wait()
print(json.dumps({{"left": "a grandchild"}}))
""")
    assert run.ok and report == {"left": "a grandchild"}
    assert _processes_with(token) == []
    time.sleep(3)
    assert not marker.exists() and _processes_with(token) == []


def test_a_killed_reward_worker_takes_its_run_along():
    token = uuid.uuid4().hex
    program = _as_process("import time\ntime.sleep(60)", token)
    worker = subprocess.Popen([sys.executable, "-c", "import sys\nfrom rewards.code import run_python\n"
                               "run_python(sys.stdin.read(), timeout_s=60)"],
                              stdin=subprocess.PIPE, text=True)
    worker.stdin.write(program)
    worker.stdin.close()
    try:
        deadline = time.monotonic() + 30
        while len(_processes_with(token)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_with(token), "the run never started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 5
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(token) == []


def test_memory_disk_and_time_limits():
    hog = run_python(_DISARM + "x = bytearray(4 * 1024**3)\nprint(len(x))", memory_mb=256,
                     timeout_s=_PATIENT_S)
    assert not hog.ok and "MemoryError" in hog.stderr
    report, filler = hostile("""
report = {}
chunk = b"x" * 2**19
try:
    for i in range(10_000):
        with open(f"fill{i}", "wb") as f:
            f.write(chunk)
except OSError as e:
    report = {"files": i, "error": str(e)}
print(json.dumps(report))
""", memory_mb=64)
    assert report["files"] <= 128 and "No space left on device" in report["error"]  # 64 MiB, 0.5 MiB files
    start = time.monotonic()
    looped = run_python(_DISARM + "while True:\n    pass", timeout_s=1.0)
    assert looped.timed_out and time.monotonic() - start < 10
    spinner = run_python(_DISARM + "import os\nfor _ in range(8):\n    if os.fork() == 0:\n        break\n"
                         "while True:\n    pass", timeout_s=1.0)
    assert spinner.timed_out and time.monotonic() - start < 20


def test_a_polite_program_passes():
    program = """
import itertools, json, math, os, tempfile
n = int(input())
with open("scratch.json", "w") as f:
    json.dump({"n": n}, f)
with tempfile.NamedTemporaryFile("w", delete=False) as temp:
    temp.write("ok")
with open("scratch.json") as f:
    n = json.load(f)["n"]
print(sum(1 for _ in itertools.permutations(range(n))), math.factorial(n), open(temp.name).read())
"""
    tests = json.dumps([{"input": "4", "output": "24 24 ok"}, {"input": "5", "output": "120 120 ok"}])
    response = f"<think>count</think>\n```python\n{program}\n```"
    result = CodeReward(timeout_s=_PATIENT_S)(RewardInput("", response, tests))
    assert result.score == 1.0 and result.correct, result


def test_without_isolation_the_code_reward_refuses(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-bwrap"))
    refusal = "no kernel isolation.*bwrap not found.*allow_unisolated: true"
    with pytest.raises(SandboxUnavailable, match=refusal):
        CodeReward()
    with pytest.raises(SandboxUnavailable, match="no kernel isolation"):
        run_python("print(1)")
    with pytest.raises(ValueError, match=r"rewards\[0\].options: 'code': .*no kernel isolation"):
        resolve_specs(["code"])
    with caplog.at_level(logging.WARNING, logger="rewards.code"):
        reward = CodeReward(timeout_s=_PATIENT_S, allow_unisolated=True)
    assert "WITHOUT kernel isolation" in caplog.text
    sample = RewardInput("", "```python\nprint(int(input()) + 1)\n```", '[{"input": "1", "output": "2"}]')
    assert reward(sample).score == 1.0
