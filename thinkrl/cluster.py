"""Ray plumbing: joining a cluster, the runtime environment, and groups of trainer ranks.

`ray.init()` joins the cluster of a `ray job submit` (or `RAY_ADDRESS`), or starts a local one. Actors
get the environment variables that select DeepSpeed's CPU accelerator and keep vLLM on CPU well-behaved.
The job's working directory carries code only (see `RUNTIME_EXCLUDES`): Ray refuses large uploads,
and virtual environments, run outputs and model caches have no business on the wire.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

# Paths never uploaded with a job's working directory.
RUNTIME_EXCLUDES = [".venv/", "runs/", ".cache/", "*.safetensors", "*.bin", "*.pt", ".git/", "**/__pycache__/",
                    ".pytest_cache/", ".ruff_cache/", "bench/results/"]


def code_snapshot(root: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy the tree at `root` into `dest` (new), leaving out `RUNTIME_EXCLUDES` and logs; returns `dest`.

    `ray job submit --working-dir DIR` hashes DIR, then zips it: a file that grows in between (a log the
    user redirects into the repository, `make demo > demo.log`) fails the job's start with "Failed to
    download runtime_env file package". A snapshot nobody else writes to is what the job gets instead.
    """
    import fnmatch
    import shutil

    patterns = [p.rstrip("/") for p in RUNTIME_EXCLUDES] + ["*.log"]
    root = os.path.abspath(root)

    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = os.path.relpath(folder, root)
        out = []
        for name in names:
            path = name if rel == "." else os.path.join(rel, name)
            if any(fnmatch.fnmatch(name, pat.removeprefix("**/")) or fnmatch.fnmatch(path, pat) for pat in patterns):
                out.append(name)
        return out

    shutil.copytree(root, dest, ignore=ignore, symlinks=True)
    return str(dest)


def actor_env() -> dict[str, str]:
    """Environment for trainer and rollout actors on this machine's kind of device."""
    import torch

    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if not torch.cuda.is_available():
        # Ray gives actors without a CPU reservation one OpenMP thread; the trainer and the engines take
        # turns (the loop is synchronous), so each may use every core while it works. vLLM pins its
        # worker's threads to cores unless told otherwise: measured here, 256 samples decode in 4.0 s
        # pinned vs 5.5-5.9 s with VLLM_CPU_OMP_THREADS_BIND=nobind (a value set by the user is kept).
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(os.cpu_count() or 1),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
    for key in ("VLLM_CPU_KVCACHE_SPACE", "THINKRL_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def stale_local_head(timeout_s: float = 2.0) -> str | None:
    """The address of the local Ray head that the last `ray start` recorded, if it no longer answers.

    Ray keeps that address in `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster` until `ray stop`. After
    the head died otherwise (killed, out of memory, the machine rebooted with /tmp kept), `ray.init()`
    still connects to it and waits minutes on "Failed to connect to GCS". None if no head is recorded
    or it accepts a connection within `timeout_s`.
    """
    from ray._common.utils import get_ray_address_file

    try:
        address = Path(get_ray_address_file(None)).read_text().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except (OSError, ValueError):
        return address


_REAPER_PIPE: list[int] = []  # the write end of the watchdog's pipe (thinkrl.reaper), held for the life of the driver


def init_ray(num_cpus: int | None = None) -> None:
    """Join the running cluster (job submission, RAY_ADDRESS, the head `ray start` left) or start a local one.

    A local head that `ray start` recorded but which no longer answers is skipped with a warning, and a
    fresh local cluster starts instead of waiting on the dead one. A local cluster this driver starts
    dies with it, however it dies (a watchdog, `thinkrl.reaper`, takes its processes down).
    """
    import ray
    from ray._common.utils import get_ray_address_file

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": "WARNING"}
    address = os.environ.get("RAY_ADDRESS")
    starts_local = address == "local"
    if address is None:
        dead = stale_local_head()
        if dead is not None:
            print(f"[ray] the local Ray head recorded at {dead} does not answer (it was stopped without "
                  "`ray stop`: killed or out of memory); starting a fresh local cluster for this run. "
                  "`ray stop --force` clears the record.", file=sys.stderr, flush=True)
            kwargs["address"] = "local"
        kwargs["num_cpus"] = num_cpus
        starts_local = dead is not None or not Path(get_ray_address_file(None)).exists()
    if starts_local and not _REAPER_PIPE:
        from thinkrl import reaper

        _REAPER_PIPE.append(reaper.start())
    ray.init(**kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_actor(cls, *, num_cpus: float = 0.0, num_gpus: float = 0.0):
    """`ray.remote(cls)` with this project's actor environment."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": actor_env()})(cls)


def trainer_group(cls, world_size: int, make_args, *, gpus_per_rank: float = 0.0, wait: bool = True) -> list:
    """`world_size` actors of `cls`, rank r constructed with `make_args(rank, master_addr, master_port)`.

    Ranks rendezvous through torch.distributed on rank 0's node; all are constructed concurrently
    (init_distributed blocks until every rank has joined). `wait=False` returns at once (the caller
    waits on `__ray_ready__`, e.g. while other actors start too).
    """
    import ray

    addr, port = ray.util.get_node_ip_address(), free_port()
    actor_cls = remote_actor(cls, num_gpus=gpus_per_rank)
    actors = [actor_cls.remote(*make_args(rank, addr, port)) for rank in range(world_size)]
    if wait:
        ray.get([a.__ray_ready__.remote() for a in actors])
    return actors
