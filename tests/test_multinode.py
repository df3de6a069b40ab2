"""Two Ray nodes with their own addresses, as on a real cluster, and the tiny recipe submitted to them.

The head runs on this machine's side of a veth pair; the second node runs in its own network namespace
(its own address) and mount namespace (its own Ray session directory: two nodes sharing one would
delete each other's runtime files, which no real cluster does). Both see the run directory, as nodes
on shared storage do. The recipe puts the trainer group on the second node and the engines on the
head by the nodes' custom resources, so weights cross nodes through Ray's object store, the trainer
ranks meet on their own node's address, and ZeRO-3 partitions are gathered for every sync and export.

Needs root (network namespaces), as on the project's CI machine.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import hangs
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)
SMALL = ["sft.steps=15", "sft.n_examples=300", "sft.log_every=5", "data.n_train=64", "data.n_heldout=12",
         "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.mini_batches=2", "rl.checkpoint_every=1",
         "eval.samples_per_prompt=2", "rollout.max_tokens=64", "eval.max_tokens=64", "rollout.enforce_eager=true"]
PLACED = ["rl.num_trainers=2", "rl.zero_stage=3", "rollout.num_engines=2",
          "rl.trainer_resources={trainer_node: 1}", "rollout.engine_resources={rollout_node: 1}"]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)


class TwoNodes:
    def __init__(self, root: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.root, self.netns = root, f"trl{tag}"
        self.head_ip, self.node_ip = f"10.213.{os.getpid() % 250}.1", f"10.213.{os.getpid() % 250}.2"
        self.env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_TMPDIR": str(root / "t")}
        self.env.pop("RAY_ADDRESS", None)
        (root / "t").mkdir()
        (root / "private").mkdir()
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", f"{self.netns}a", "type", "veth", "peer", "name", f"{self.netns}b")
        _sh("ip", "link", "set", f"{self.netns}b", "netns", self.netns)
        _sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", f"{self.netns}a")
        _sh("ip", "link", "set", f"{self.netns}a", "up")
        for cmd in (["ip", "addr", "add", f"{self.node_ip}/24", "dev", f"{self.netns}b"],
                    ["ip", "link", "set", f"{self.netns}b", "up"], ["ip", "link", "set", "lo", "up"]):
            _sh("ip", "netns", "exec", self.netns, *cmd)
        self.gcs = f"{self.head_ip}:{_free_port(self.head_ip)}"
        self.dashboard = f"http://{self.head_ip}:{_free_port(self.head_ip)}"
        _sh("ray", "start", "--head", "--node-ip-address", self.head_ip, "--port", self.gcs.split(":")[1],
            "--dashboard-host", self.head_ip, "--dashboard-port", self.dashboard.rsplit(":", 1)[1], "--num-cpus", "2",
            "--resources", '{"rollout_node": 2}', "--disable-usage-stats", env=self.env)
        # the second node: its own network namespace, and its own view of the Ray temp folder
        _sh("ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount --bind {root / 'private'} {root / 't'} && exec ray start --address {self.gcs} "
            f"--node-ip-address {self.node_ip} --num-cpus 2 --resources '{{\"trainer_node\": 2, \"reward_node\": 2}}' "
            "--disable-usage-stats",
            env=self.env)

    def submit(self, code: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
        runtime_env = {"env_vars": {"THINKRL_CACHE": str(self.root / "cache")}}
        return hangs.run(["ray", "job", "submit", "--address", self.dashboard, "--working-dir", str(code),
                          "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "rl.train", *args],
                         timeout=timeout, env=self.env)

    def close(self) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], capture_output=True)
        subprocess.run(["pkill", "-9", "-f", str(self.root / "t")], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.netns}a"], capture_output=True)


@pytest.fixture(scope="module")
def two_nodes():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("a second Ray node with its own address needs root, iproute2 and unshare (network namespaces)")
    # short: Ray's socket paths under it must stay within the 107 bytes of a unix socket name
    root = Path(tempfile.mkdtemp(prefix="trl-", dir="/tmp"))
    nodes = TwoNodes(root)
    try:
        from thinkrl.cluster import code_snapshot

        yield nodes, Path(code_snapshot(REPO, root / "code"))
    finally:
        nodes.close()
        shutil.rmtree(root, ignore_errors=True)


def _log(out: subprocess.CompletedProcess) -> str:
    return out.stdout + out.stderr


def test_a_request_the_cluster_cannot_hold_fails_before_anything_starts(two_nodes):
    nodes, code = two_nodes
    out = nodes.submit(code, "recipes/tiny.yaml", f"run.output_dir={nodes.root / 'too-big'}", *SMALL,
                       "rl.num_trainers=3", "rl.trainer_resources={trainer_node: 1}", timeout=300)
    assert out.returncode != 0
    log = _log(out)
    assert "rl trainer ranks" in log and "trainer_node: 3 asked, 2 in the cluster" in log, log[-3000:]
    assert "[sft]" not in log  # nothing started


def test_an_output_dir_a_trainer_node_does_not_see_fails_at_start_up(two_nodes):
    # under the Ray temp folder, which the second node has bound to a private folder of its own: the
    # driver on the head writes there, the trainer ranks on the second node see another folder
    nodes, code = two_nodes
    out = nodes.submit(code, "recipes/tiny.yaml", f"run.output_dir={nodes.root / 't' / 'unshared'}", *SMALL, *PLACED,
                       timeout=600)
    log = _log(out)
    assert out.returncode != 0
    assert f"run.output_dir: sft trainer rank 0 on node {nodes.node_ip} does not see" in log, log[-3000:]
    assert "[sft] step" not in log  # it stopped before training


def test_trainers_and_engines_on_two_nodes_zero3_sync_resume_and_export(two_nodes):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    nodes, code = two_nodes
    run_dir = nodes.root / "run"
    first = nodes.submit(code, "recipes/tiny.yaml", f"run.output_dir={run_dir}", *SMALL, *PLACED, "rl.iterations=2")
    assert first.returncode == 0, _log(first)[-6000:]
    # trainers on the second node, engines on the head: the recipe's custom resources placed them
    assert (f"(trainer ranks on {nodes.node_ip}, {nodes.node_ip}; engines on {nodes.head_ip}, {nodes.head_ip})"
            in _log(first)), _log(first)[-4000:]
    second = nodes.submit(code, "recipes/tiny.yaml", f"run.output_dir={run_dir}", *SMALL, *PLACED, "rl.iterations=3")
    assert second.returncode == 0, _log(second)[-6000:]
    assert "resumed from" in _log(second) and "[rl] iter 3/3" in _log(second)
    assert "[rl] iter 1/" not in _log(second)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = {r["iteration"]: r["sync/probe_gap_after_sync"] for r in records if "sync/probe_gap_after_sync" in r}
    assert sorted(gaps) == [1, 2, 3] and max(gaps.values()) < 1e-4  # every sync served the trainer's weights

    # the exported Hugging Face weights are the trainer's: DeepSpeed's own consolidation of the ZeRO-3
    # partitions in the last checkpoint, against thinkrl's bucket-by-bucket gather
    last = json.loads((run_dir / "checkpoints" / "rl" / "latest.json").read_text())["path"]
    trainer = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints" / "rl" / last / "trainer"), tag="ds")
    exported = {}
    for shard in sorted((run_dir / "checkpoints" / "final").glob("*.safetensors")):
        exported.update(load_file(shard))
    assert set(exported) <= set(trainer) and len(exported) >= len(trainer) - 1  # a tied head is saved once
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, trainer[name], rtol=0, atol=0, msg=name)
    before = load_file(next((run_dir / "checkpoints" / "sft").glob("*.safetensors")))
    assert any(not torch.equal(before[n], exported[n]) for n in exported)  # RL moved the weights


def test_the_two_node_dense_recipe_runs_tiny_shaped_on_the_two_nodes(two_nodes):
    """recipes/qwen2.5-7b-math-2node.yaml as written (its node labels, CPU reservations, ZeRO-3, placement),
    with only the model, data and sizes shrunk: one iteration on a user's JSONL files."""
    from thinkrl.tasks import arithmetic

    nodes, code = two_nodes
    data = nodes.root / "math"
    data.mkdir()
    for name, seed in (("train", 1), ("heldout", 2)):
        rows = [{"prompt": r["prompt"], "answer": r["answer"], "difficulty": r["difficulty"]}
                for r in arithmetic.make_rows(12, seed=seed, max_ops=2)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = nodes.root / "dense"
    out = nodes.submit(code, "recipes/qwen2.5-7b-math-2node.yaml", f"run.output_dir={run_dir}",
                       "model.name_or_path=tiny-dense", f"data.train_file={data / 'train.jsonl'}",
                       f"data.heldout_file={data / 'heldout.jsonl'}", "rollout.num_engines=2", "rollout.gpus_per_engine=0",
                       "rollout.cpus_per_engine=1", "rollout.gpu_memory_utilization=0.15", "rollout.max_model_len=512",
                       "rollout.max_tokens=32", "rollout.enforce_eager=true", "eval.max_tokens=32",
                       "eval.samples_per_prompt=1", "reward.num_workers=1", "rl.iterations=1",
                       "rl.prompts_per_iteration=4", "rl.samples_per_prompt=2", "rl.mini_batches=2", "reward.hosts=2",
                       "rl.max_tokens_per_micro_batch=64", "rl.num_trainers=2", "rl.gpus_per_trainer=0",
                       "rl.cpus_per_trainer=1", "rl.gradient_checkpointing=false", "rl.probe_tolerance=1e-3",
                       "sampler.iterations_per_level=1", "reward.cpus_per_host=0", "reward.host_resources={reward_node: 1}")
    log = _log(out)
    assert out.returncode == 0, log[-6000:]
    assert f"(trainer ranks on {nodes.node_ip}, {nodes.node_ip}; engines on {nodes.head_ip}, {nodes.head_ip})" in log
    assert f"[rl] reward workers: 2 host(s) of 1 on {nodes.node_ip}, {nodes.node_ip}" in log  # scored on node B
    report = json.loads((run_dir / "report.json").read_text())
    assert report["n_heldout"] == 12 and report["rl_iterations"] == 1
    config = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 3" in config and "trainer_node: 1" in config and "rollout_node: 1" in config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "reward/failures" in r]
    assert scored and all(r["reward/failures"] == 0 for r in scored)
