"""The `code` reward: run a Python response against test cases in a sandboxed subprocess.

The program is the last fenced code block (```python ... ``` or ``` ... ```) after the thinking. The
ground truth (`RewardInput.answer`) holds the tests, in one of two forms:
- JSON list of {"input": <stdin>, "output": <expected stdout>}: one run per case; outputs are compared
  line by line with trailing whitespace ignored;
- anything else: Python test code (asserts) appended to the program and run once, passing if it exits 0.
Score: 1.0 if every test passes, else 0.0 (option `partial=True`: the share of tests passed). The
result's `correct` is "all tests passed", so `code` can be a set's correctness reward.

The sandbox, per run: a fresh temporary working directory (removed afterwards, whatever happens); a
cleared environment; `python -I` (no PYTHONPATH, user site or script directory on sys.path); rlimits on
address space (`memory_mb`), CPU time and written file size (`max_output_bytes`; stdout and stderr go to
files, so a flood of output is cut off, not buffered); a wall-clock limit (`timeout_s`) that kills the
whole process group; the child dies with its parent (PR_SET_PDEATHSIG), so a reward worker killed by the
pool leaves nothing behind. An audit hook installed before the program runs refuses sockets, subprocesses,
fork/exec, ctypes, writes outside the working directory, and reads outside it other than the Python
installation. Where unprivileged user namespaces exist (`unshare -rn`), the run also gets an empty network
namespace. Trade-off: this is a process-level sandbox for model-written code, not a security boundary
against a determined attacker (no seccomp, no filesystem namespace); run untrusted code at scale in
containers.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rewards.math import final_part
from rewards.types import RewardInput, RewardResult

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs in the child before the program: limits, death with the parent, then the audit hook.
_PRELUDE = r"""
import ctypes, os, resource, sys
_parent, _limits = int(sys.argv[1]), __LIMITS__
try:
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL
except Exception:
    pass
if os.getppid() != _parent:
    os._exit(137)
resource.setrlimit(resource.RLIMIT_AS, (_limits["memory"], _limits["memory"]))
resource.setrlimit(resource.RLIMIT_CPU, (_limits["cpu"], _limits["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (_limits["output"], _limits["output"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_home = os.path.realpath(os.getcwd())
_readable = tuple(os.path.realpath(p) for p in _limits["readable"])
_denied = ("socket.", "subprocess.", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
           "os.system", "os.kill", "os.killpg", "ctypes.", "pty.", "os.chroot", "os.setuid", "sys._current_frames")
_write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "os.listdir", "os.scandir", "os.chdir", "shutil.rmtree",
                "shutil.copyfile", "shutil.move", "os.replace"}

def _inside(path, roots):
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

def _hook(event, args):
    if event.startswith(_denied):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path))
        writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & _write_flags)
        if _inside(real, (_home,)) or (not writes and _inside(real, _readable)):
            return
        raise PermissionError(f"sandbox: access to {os.fsdecode(path)} is not allowed")
    if event in _path_events:
        for arg in args[:2]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                real = os.path.realpath(os.fsdecode(arg))
                if not _inside(real, (_home,)) and not (event in ("os.listdir", "os.scandir")
                                                         and _inside(real, _readable)):
                    raise PermissionError(f"sandbox: {event} on {os.fsdecode(arg)} is not allowed")

sys.addaudithook(_hook)
del ctypes
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class RunResult:
    """One sandboxed run: exit code (negative: killed by that signal), outputs, and what cut it short.

    workdir is the temporary directory the run used; it no longer exists when the result is returned.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    workdir: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def _network_isolation() -> tuple[str, ...]:
    """`unshare -rn` when this machine lets an unprivileged user create a network namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def _readable_roots() -> list[str]:
    roots = {sys.base_prefix, sys.prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"],
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], "/dev/null", "/dev/urandom"}
    return sorted(roots)


def run_python(program: str, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 1_000_000) -> RunResult:
    """Run `program` with `stdin` in the sandbox described in the module docstring.

    Example:
        >>> run_python("print(int(input()) * 2)", stdin="21").stdout
        '42\\n'
    """
    limits = {"memory": int(memory_mb) * 2**20, "cpu": max(1, int(timeout_s + 1)),
              "output": int(max_output_bytes), "readable": _readable_roots()}
    workdir = tempfile.mkdtemp(prefix="thinkrl-code-")
    try:
        Path(workdir, "main.py").write_text(program)
        Path(workdir, "stdin.txt").write_text(stdin)
        prelude = _PRELUDE.replace("__LIMITS__", repr(limits))
        command = [*_network_isolation(), sys.executable, "-I", "-B", "-c", prelude, str(os.getpid())]
        # (-I ignores PYTHON* variables); one BLAS/OpenMP thread keeps numpy inside the address-space limit
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = Path(workdir, "stdout.txt"), Path(workdir, "stderr.txt")
        with open(Path(workdir, "stdin.txt"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            process = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=env,
                                       start_new_session=True)
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(process.pid, 9)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
        stdout = out_path.read_bytes()[:max_output_bytes].decode(errors="replace")
        stderr = err_path.read_bytes()[-4000:].decode(errors="replace")
        truncated = out_path.stat().st_size >= max_output_bytes or process.returncode == -25  # SIGXFSZ
        return RunResult(None if timed_out else process.returncode, stdout, stderr, timed_out, truncated,
                         workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def extract_code(response: str) -> str | None:
    """The last fenced code block after the thinking, or None."""
    final = final_part(response)
    blocks = _FENCE.findall(final) if final is not None else []
    return blocks[-1] if blocks else None


def parse_tests(answer: str) -> list[dict] | str:
    """stdin/stdout cases (JSON list of {"input", "output"}) or, for anything else, Python test code."""
    try:
        cases = json.loads(answer)
    except (json.JSONDecodeError, TypeError):
        return answer
    if isinstance(cases, list) and cases and all(isinstance(c, dict) and {"input", "output"} <= set(c)
                                                  for c in cases):
        return cases
    return answer


def _same_output(got: str, expected: str) -> bool:
    return [line.rstrip() for line in got.strip().splitlines()] == \
        [line.rstrip() for line in str(expected).strip().splitlines()]


def _why(run: RunResult) -> str:
    if run.timed_out:
        return "time limit"
    if run.output_truncated:
        return "output limit"
    if run.returncode and run.returncode < 0:
        return f"killed by signal {-run.returncode}"
    lines = run.stderr.strip().splitlines()
    return lines[-1][:200] if lines else f"exit code {run.returncode}"


class CodeReward:
    """The `code` reward (see the module docstring).

    Options: `timeout_s` (per run, 5), `memory_mb` (512), `max_output_bytes` (1e6), `partial` (False).
    The pool's `timeout_s` must cover all runs of one sample: keep len(tests) * timeout_s below it.
    """

    reward_kind = "sample"
    score_range = (0.0, 1.0)

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1_000_000,
                 partial: bool = False) -> None:
        if timeout_s <= 0 or memory_mb < 16 or max_output_bytes < 1:
            raise ValueError(f"code: need timeout_s > 0, memory_mb >= 16, max_output_bytes >= 1; got "
                             f"{timeout_s}, {memory_mb}, {max_output_bytes}")
        self.limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
                       "max_output_bytes": int(max_output_bytes)}
        self.partial = bool(partial)

    def __call__(self, sample: RewardInput) -> RewardResult:
        program = extract_code(sample.response)
        if program is None:
            return RewardResult(0.0, "no answer", correct=False)
        tests = parse_tests(sample.answer)
        if isinstance(tests, str):
            run = run_python(program + "\n\n" + tests, **self.limits)
            ok = run.ok
            return RewardResult(float(ok), "passed" if ok else f"failed: {_why(run)}", correct=ok)
        passed, first_failure = 0, ""
        for i, case in enumerate(tests):
            run = run_python(program, stdin=str(case["input"]), **self.limits)
            if run.ok and _same_output(run.stdout, case["output"]):
                passed += 1
            elif not first_failure:
                first_failure = f"; test {i + 1}: " + (_why(run) if not run.ok else "wrong output")
        share = passed / len(tests)
        score = share if self.partial else float(passed == len(tests))
        return RewardResult(score, f"{passed}/{len(tests)} tests passed{first_failure}",
                            {"pass_rate": share}, correct=passed == len(tests))
