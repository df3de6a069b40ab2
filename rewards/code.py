"""The `code` reward: run a Python response against test cases in a sandbox.

The program is the last fenced code block (```python ... ``` or ``` ... ```) after the thinking. The
ground truth (`RewardInput.answer`) holds the tests, in one of two forms:
- JSON list of {"input": <stdin>, "output": <expected stdout>}: one run per case; outputs are compared
  line by line with trailing whitespace ignored;
- anything else: Python test code (asserts) appended to the program and run once, passing if it exits 0.
Score: 1.0 if every test passes, else 0.0 (option `partial=True`: the share of tests passed). The
result's `correct` is "all tests passed", so `code` can be a set's correctness reward.

The sandbox is the kernel's, through bubblewrap (`bwrap`, Debian package `bubblewrap`; `make install`
installs it). Each run gets new mount, pid, ipc, uts and network namespaces (no network at all), a
read-only view of /usr, /lib*, /bin and the Python installation and nothing else of the host (of /etc
only the loader cache and the time zone; no /home, /root or /tmp but directories leading to the Python
installation), a fresh /proc and a minimal /dev,
and a private tmpfs `/sandbox` (size `memory_mb`) as working directory and HOME; it runs without
capabilities, with no_new_privs, as a user that owns nothing outside the sandbox:
- when thinkrl runs as root, bwrap needs no user namespace and the prelude below drops to a uid drawn
  for this run alone (a user namespace would map the program to root, which RLIMIT_NPROC does not limit);
- otherwise bwrap makes a user namespace and the program runs as uid 65534 inside it.
rlimits: address space (`memory_mb`) and CPU time per process, `MAX_PROCESSES` processes and threads,
bytes per written file (`max_output_bytes`; stdout and stderr go to files, so a flood of output is cut
off, not buffered), no core files. At the wall-clock limit (`timeout_s`) the sandbox's pid namespace is
killed through its init, which the kernel follows by killing every process in it; bwrap exits only after
that, so nothing of a run survives `run_python` returning (bwrap's --die-with-parent does the same when
the reward worker itself is killed). `bwrap` is found on PATH, or named by the THINKRL_BWRAP environment
variable; it must pass a trial run once per process.

Where it is missing or fails that trial, running model-written code is refused (`SandboxUnavailable`)
unless the caller allows it (`allow_unisolated=True`, the reward option `allow_unisolated: true`), which
is logged as a warning each time a reward or worker process starts. Unisolated, a run keeps the rest:
`python -I`, the rlimits but RLIMIT_NPROC (it would count every process of the user), a process group
killed at the limit, death with its parent (PR_SET_PDEATHSIG), an empty network namespace where
`unshare -rn` is allowed.

Either way an audit hook, installed before the program runs, refuses sockets, subprocesses, fork/exec,
ctypes and file access outside the working directory (reads of the Python installation excepted). It is
a tripwire that turns the common mistakes into clear messages, not a boundary: the program runs in the
same interpreter and can switch it off (docs/reliability.md shows how, and what the kernel still stops).
Trade-off: one bwrap per run costs a few milliseconds; per-run namespaces, not a container per worker,
keep runs from seeing each other.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rewards.math import final_part
from rewards.types import RewardInput, RewardResult

BWRAP_ENV = "THINKRL_BWRAP"
"""Environment variable naming the bwrap binary (default: `bwrap` on PATH)."""
SANDBOX_DIR = "/sandbox"
"""The run's working directory and HOME inside the sandbox (a private tmpfs)."""
MAX_PROCESSES = 16
"""RLIMIT_NPROC of an isolated run: processes and threads, the interpreter included."""

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_log = logging.getLogger(__name__)

# Runs in the child before the program: limits, the uid change (root only), death with the parent
# (unisolated only), then the audit hook.
_PRELUDE = r"""
import ctypes, os, resource, sys
_limits = __LIMITS__
_libc = ctypes.CDLL(None)
resource.setrlimit(resource.RLIMIT_AS, (_limits["memory"], _limits["memory"]))
resource.setrlimit(resource.RLIMIT_CPU, (_limits["cpu"], _limits["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (_limits["output"], _limits["output"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if _limits["processes"]:
    resource.setrlimit(resource.RLIMIT_NPROC, (_limits["processes"], _limits["processes"]))
if _limits["uid"]:
    _cap = 0
    while _libc.prctl(24, _cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, up to the last capability the kernel has
        _cap += 1
    os.setgroups([])
    os.setresgid(_limits["uid"], _limits["uid"], _limits["uid"])
    os.setresuid(_limits["uid"], _limits["uid"], _limits["uid"])  # empties the permitted and effective sets
    class _CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    _libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), (ctypes.c_uint32 * 6)())  # and the inheritable one
    if os.getuid() != _limits["uid"] or _cap == 0:
        os._exit(126)
    _libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, cleared by the uid change: /proc/self stays readable
if _limits["parent"]:
    _libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL
    if os.getppid() != _limits["parent"]:
        os._exit(137)
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
del ctypes, _libc
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


class SandboxUnavailable(RuntimeError):
    """Kernel isolation is unavailable here, and running model-written code without it was not allowed."""


@dataclass(frozen=True)
class RunResult:
    """One sandboxed run: exit code (negative: killed by that signal), outputs, and what cut it short.

    workdir is the host's temporary directory of the run (the program, its stdin and its outputs; an
    isolated program sees only its own `SANDBOX_DIR`); it no longer exists when the result is returned.
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


def _bwrap_path() -> str | None:
    return os.environ.get(BWRAP_ENV) or shutil.which("bwrap")


@functools.cache
def _isolation_problem(bwrap: str | None) -> str | None:
    """Why `bwrap` cannot isolate runs here (None: it can); decided by one trial run per process."""
    if bwrap is None:
        return "bwrap is not on PATH"
    if not os.access(bwrap, os.X_OK):
        return f"bwrap not found at {bwrap}"
    probe = _run("import os\nprint(os.getcwd())", "", 30.0, 64, 10_000, bwrap)
    if probe.ok and probe.stdout.strip() == SANDBOX_DIR:
        return None
    lines = probe.stderr.strip().splitlines()
    why = lines[-1] if lines else f"exit code {probe.returncode}, stdout {probe.stdout[:100]!r}"
    return f"{bwrap} failed a trial run: {why}"


def _isolation(allow_unisolated: bool) -> str | None:
    """The bwrap binary runs go through; None (unisolated) only where that is allowed and isolation fails."""
    bwrap = _bwrap_path()
    problem = _isolation_problem(bwrap)
    if problem is None:
        return bwrap
    if not allow_unisolated:
        raise SandboxUnavailable(
            f"code reward: no kernel isolation for model-written code here ({problem}); install bubblewrap "
            "(`make install` does, or `apt-get install bubblewrap`), or set the reward option "
            "`allow_unisolated: true` to run it in a plain subprocess, which is not a security boundary")
    return None


@functools.cache
def _warn_unisolated_once() -> None:
    _warn_unisolated()


def _warn_unisolated() -> None:
    _log.warning("code reward: running model-written code WITHOUT kernel isolation (%s; allow_unisolated is "
                 "set): a hostile program can read and write this machine's files as this user, start "
                 "processes that outlive the reward and call any library", _isolation_problem(_bwrap_path()))


def _python_roots() -> list[str]:
    """The Python installation a run needs (read-only), as the outermost directories outside /usr."""
    paths = sysconfig.get_paths()
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, paths["stdlib"],
             paths["platstdlib"], paths["purelib"], paths["platlib"],
             os.path.dirname(os.path.realpath(sys.executable))}
    found = {q for p in found for q in (os.path.abspath(p), os.path.realpath(p)) if os.path.isdir(q)}

    def under(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    return sorted(p for p in found if not under(p, "/usr") and not any(under(p, q) for q in found - {p}))


@functools.lru_cache(maxsize=1)
def _read_only_view() -> tuple[str, ...]:
    """bwrap arguments that show the system and the Python installation, read-only, and nothing else."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    # parents made with --dir are 0755; those bwrap makes for a bind can be 0700, which hides what is
    # under them from the program's uid (e.g. a pyenv Python in root's home)
    args += ["--dir", "/etc"]
    for name in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", name, name]
    made = set()
    for root in _python_roots():
        parents = [str(p) for p in reversed(Path(root).parents) if str(p) != "/" and str(p) not in made]
        made.update(parents)
        args += [a for p in parents for a in ("--dir", p)] + ["--ro-bind", root, root]
    return tuple(args)


def _sandbox_command(bwrap: str, workdir: str, memory_mb: int, info_fd: int) -> tuple[list[str], int | None]:
    """The bwrap command line of one run (up to the program), and the uid the prelude must drop to."""
    if os.geteuid() == 0:
        run_uid = 2**30 + secrets.randbelow(2**30)  # owns nothing; its RLIMIT_NPROC count is this run's alone
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
                      "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        run_uid = None
        namespaces = ["--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
                      "--cap-drop", "ALL"]
    return [bwrap, *namespaces, "--die-with-parent", "--new-session", "--hostname", "sandbox",
            *_read_only_view(), "--proc", "/proc", "--dev", "/dev",
            "--size", str(memory_mb * 2**20), "--perms", "0777", "--tmpfs", SANDBOX_DIR,
            "--ro-bind", os.path.join(workdir, "main.py"), f"{SANDBOX_DIR}/main.py", "--chdir", SANDBOX_DIR,
            "--info-fd", str(info_fd), "--"], run_uid


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
               max_output_bytes: int = 1_000_000, *, allow_unisolated: bool = False) -> RunResult:
    """Run `program` with `stdin` in the sandbox described in the module docstring.

    Raises `SandboxUnavailable` where kernel isolation is unavailable, unless `allow_unisolated`.

    Example:
        >>> run_python("print(int(input()) * 2)", stdin="21").stdout
        '42\\n'
    """
    bwrap = _isolation(allow_unisolated)
    if bwrap is None:
        _warn_unisolated_once()
    return _run(program, stdin, timeout_s, memory_mb, max_output_bytes, bwrap)


def _run(program: str, stdin: str, timeout_s: float, memory_mb: int, max_output_bytes: int,
         bwrap: str | None) -> RunResult:
    """One run: under `bwrap` (isolated) or, with None, in a plain subprocess."""
    workdir = tempfile.mkdtemp(prefix="thinkrl-code-")
    info_read, info_write = os.pipe() if bwrap else (None, None)
    try:
        Path(workdir, "main.py").write_text(program)
        Path(workdir, "stdin.txt").write_text(stdin)
        limits = {"memory": int(memory_mb) * 2**20, "cpu": max(1, int(timeout_s + 1)),
                  "output": int(max_output_bytes), "readable": _readable_roots(),
                  "processes": MAX_PROCESSES if bwrap else 0, "uid": 0, "parent": 0}
        if bwrap:
            command, run_uid = _sandbox_command(bwrap, workdir, int(memory_mb), info_write)
            limits["uid"] = run_uid or 0
            home = SANDBOX_DIR
        else:
            command, home = list(_network_isolation()), workdir
            limits["parent"] = os.getpid()
        command += [sys.executable, "-I", "-B", "-c", _PRELUDE.replace("__LIMITS__", repr(limits))]
        # (-I ignores PYTHON* variables); one BLAS/OpenMP thread keeps numpy inside the address-space limit
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        out_path, err_path = Path(workdir, "stdout.txt"), Path(workdir, "stderr.txt")
        with open(Path(workdir, "stdin.txt"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            process = subprocess.Popen(command, stdin=fin, stdout=fout, stderr=ferr, cwd=workdir, env=env,
                                       start_new_session=True, pass_fds=(info_write,) if bwrap else ())
            if info_write is not None:
                os.close(info_write)
                info_write = None
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _stop(process, info_read)
        returncode = process.returncode
        if bwrap and returncode > 128:  # bwrap reports a program killed by signal s as 128 + s
            returncode = 128 - returncode
        stdout = out_path.read_bytes()[:max_output_bytes].decode(errors="replace")
        stderr = err_path.read_bytes()[-4000:].decode(errors="replace")
        truncated = out_path.stat().st_size >= max_output_bytes or returncode == -signal.SIGXFSZ
        return RunResult(None if timed_out else returncode, stdout, stderr, timed_out, truncated, workdir)
    finally:
        for fd in (info_read, info_write):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(process: subprocess.Popen, info_read: int | None) -> None:
    """Kill whatever is left of a run and reap it.

    Isolated (`info_read`: bwrap's --info-fd): SIGKILL to the sandbox's init; the kernel kills every
    process of the pid namespace before that init is gone, and bwrap exits only after it, so waiting for
    bwrap waits for all of them. Unisolated: SIGKILL to the process group.
    """
    if info_read is not None and process.poll() is None:
        os.set_blocking(info_read, False)
        try:
            init_pid = json.loads(os.read(info_read, 65536) or b"{}").get("child-pid")
        except (BlockingIOError, ValueError):
            init_pid = None
        if init_pid:
            try:
                os.kill(init_pid, signal.SIGKILL)
                process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    if info_read is None or process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


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

    Options: `timeout_s` (per run, 5), `memory_mb` (512), `max_output_bytes` (1e6), `partial` (False),
    `allow_unisolated` (False: where kernel isolation is unavailable, constructing the reward raises
    `SandboxUnavailable`; True: run without it, with a warning at every construction and in every worker).
    The pool's `timeout_s` must cover all runs of one sample: keep len(tests) * timeout_s below it.
    """

    reward_kind = "sample"
    score_range = (0.0, 1.0)

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, max_output_bytes: int = 1_000_000,
                 partial: bool = False, allow_unisolated: bool = False) -> None:
        if timeout_s <= 0 or memory_mb < 16 or max_output_bytes < 1:
            raise ValueError(f"code: need timeout_s > 0, memory_mb >= 16, max_output_bytes >= 1; got "
                             f"{timeout_s}, {memory_mb}, {max_output_bytes}")
        self.limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
                       "max_output_bytes": int(max_output_bytes), "allow_unisolated": bool(allow_unisolated)}
        self.partial = bool(partial)
        if _isolation(bool(allow_unisolated)) is None:  # the error, or the warning, before any worker starts
            _warn_unisolated()

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
