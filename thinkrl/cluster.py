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
from dataclasses import dataclass, field
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
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Resources:
    """What one actor of a role reserves in the Ray cluster: logical CPUs, GPUs, and custom resources
    (the labels a node was started with, `ray start --resources '{"trainer_node": 8}'`, which is how a
    recipe puts a role on chosen nodes). Nothing reserved (the CPU default): actors go where Ray likes,
    and take turns on the cores."""

    cpus: float = 0.0
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus, **self.custom}.items() if v > 0}


class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold what a role of the recipe asks for."""


def cluster_nodes() -> dict[str, dict[str, float]]:
    """Each live node's total resources, by node address (the per-node `node:<ip>` markers left out)."""
    import ray

    return {n["NodeManagerAddress"]: {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}
            for n in ray.nodes() if n.get("Alive")}


def check_fits(role: str, count: int, res: Resources, nodes: dict[str, dict[str, float]], *,
               strict_pack: bool = False) -> None:
    """Raise `ClusterTooSmall` naming `role` and what is missing if `count` bundles of `res` cannot be
    placed on `nodes` (first fit; `strict_pack`: all on one node). Before any actor starts."""
    bundle = res.bundle()
    if not bundle:
        return
    placed = 0
    for ip in nodes if strict_pack else [None]:  # strict: try each node alone
        free_try = {n: dict(r) for n, r in nodes.items()}
        placed = 0
        for _ in range(count):
            target = next((n for n, r in free_try.items() if (ip is None or n == ip)
                           and all(r.get(k, 0.0) >= v for k, v in bundle.items())), None)
            if target is None:
                break
            for k, v in bundle.items():
                free_try[target][k] -= v
            placed += 1
        if placed == count:
            return
    totals = {k: sum(r.get(k, 0.0) for r in nodes.values()) for k in bundle}
    short = {k: count * v - totals[k] for k, v in bundle.items() if count * v > totals[k]}
    what = (", ".join(f"{k}: {count * bundle[k]:g} asked, {totals[k]:g} in the cluster" for k in short) if short
            else "no node has room for " + ("all of them" if strict_pack else "one more") + f" (placed {placed})")
    per_node = "; ".join(f"{ip}: {_fmt(r)}" for ip, r in nodes.items())
    raise ClusterTooSmall(f"{role}: {count} x {_fmt(bundle)} do not fit in this Ray cluster ({what}). Nodes: "
                          f"{per_node}. Lower the role's resources in the recipe or add nodes that have them.")


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k != "object_store_memory"
                           and k != "memory") + "}"


_GROUPS: dict[Any, Any] = {}  # actor handle -> the placement group it was started in


def place(role: str, count: int, res: Resources, strategy: str = "PACK", timeout_s: float = 120.0):
    """A placement group of `count` bundles of `res` (None when the role reserves nothing).

    Checked against the cluster's nodes first (`check_fits`), then reserved; a reservation that does not
    come within `timeout_s` (resources held by something else) raises `ClusterTooSmall` too.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = res.bundle()
    if not bundle:
        return None
    check_fits(role, count, res, cluster_nodes(), strict_pack=strategy == "STRICT_PACK")
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=strategy, name=f"thinkrl-{role}-{os.getpid()}")
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        raise ClusterTooSmall(f"{role}: {count} x {_fmt(bundle)} could not be reserved within {timeout_s:.0f}s; "
                              f"free now: {_fmt(ray.available_resources())} (held by other jobs or actors?)")
    return pg


def in_group(pg, index: int) -> dict:
    """Actor options that put an actor into bundle `index` of placement group `pg` (none without one)."""
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def group_of(actor):
    """The placement group `actor` was started in by this module (None if none)."""
    return _GROUPS.get(actor)


def remember_group(actor, pg) -> None:
    if pg is not None:
        _GROUPS[actor] = pg


def release(actors: list) -> None:
    """Kill `actors` and free the placement group they were started in."""
    import ray
    from ray.util.placement_group import remove_placement_group

    groups = {id(pg): pg for a in actors if (pg := _GROUPS.pop(a, None)) is not None}
    for actor in actors:
        ray.kill(actor)
    for pg in groups.values():
        remove_placement_group(pg)


def remote_actor(cls, *, resources: Resources | None = None):
    """`ray.remote(cls)` with this project's actor environment (and `resources` reserved, if given)."""
    import ray

    resources = resources or Resources()
    options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus,
                               "runtime_env": {"env_vars": actor_env()}}
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return ray.remote(**options)(cls)


class StorageNotShared(RuntimeError):
    """A node that writes checkpoints does not see the run's output directory."""


def _read_marker(actor, path: str) -> tuple[str, str | None]:
    try:
        text = Path(path).read_text()
    except OSError:
        text = None
    return _node_address(actor), text


def check_shared_storage(actors: list, folder: Path, role: str) -> None:
    """Every actor of `actors` must see `folder` as the driver does (the same files): checkpoints are
    written by every trainer rank into the run directory and renamed into place by the driver, which
    needs storage all their nodes share (one machine, NFS, a cluster file system). Raises
    `StorageNotShared` naming the first node that does not."""
    import secrets

    import ray

    token = secrets.token_hex(8)
    marker = Path(folder) / f".thinkrl-storage-check-{token}"
    marker.write_text(token)
    try:
        seen = ray.get([a.__ray_call__.remote(_read_marker, str(marker)) for a in actors])
    finally:
        marker.unlink(missing_ok=True)
    for rank, (ip, text) in enumerate(seen):
        if text != token:
            raise StorageNotShared(
                f"run.output_dir: {role} {rank} on node {ip} does not see {folder} as the driver on "
                f"{ray.util.get_node_ip_address()} does (a file written there is {'missing' if text is None else 'different'}"
                "). Every node that runs trainer ranks writes checkpoints there: point run.output_dir at storage all "
                "nodes share (NFS or a cluster file system mounted at the same path)")


def _node_address(_actor) -> str:
    import ray

    return ray.util.get_node_ip_address()


def node_addresses(actors: list) -> list[str]:
    """The address of the node each actor runs on."""
    import ray

    return ray.get([a.__ray_call__.remote(_node_address) for a in actors])


def _rendezvous_address() -> tuple[str, str, int]:
    """(node id, node address, a free port there): where rank 0 runs and the group meets."""
    import ray

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()


def trainer_group(cls, world_size: int, make_args, *, resources: Resources | None = None, wait: bool = True,
                  role: str = "trainer ranks") -> list:
    """`world_size` actors of `cls`, rank r constructed with `make_args(rank, master_addr, master_port)`.

    With `resources` to reserve, the ranks go into one placement group packed onto as few nodes as
    possible (checked before anything starts: `place`). Ranks rendezvous through torch.distributed on
    rank 0's node: a port is taken there by a task in rank 0's place, and rank 0 is pinned to that node.
    All are constructed concurrently (init_distributed blocks until every rank has joined). `wait=False`
    returns at once (the caller waits on `__ray_ready__`, e.g. while other actors start too).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = resources or Resources()
    pg = place(role, world_size, resources, "PACK")
    where = ray.remote(num_cpus=0)(_rendezvous_address).options(**in_group(pg, 0))
    node_id, addr, port = ray.get(where.remote())
    actor_cls = remote_actor(cls, resources=resources)
    actors = []
    for rank in range(world_size):
        options = in_group(pg, rank)
        if not options and rank == 0:
            options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
        actors.append(actor_cls.options(**options).remote(*make_args(rank, addr, port)))
        remember_group(actors[-1], pg)
    if wait:
        ray.get([a.__ray_ready__.remote() for a in actors])
    return actors
