"""Joining Ray: a local head that died without `ray stop` is skipped, not waited on."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from thinkrl.cluster import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
JOIN = ("from thinkrl.cluster import init_ray; init_ray(); import ray; "
        "print('ANSWER', ray.get(ray.remote(lambda: 6 * 7).remote()))")


def _private_env(ray_tmp: str) -> dict:
    # a Ray temp dir of the test's own (short: Ray's unix sockets live there), no RAY_ADDRESS: exactly what
    # `python -m rl.train` sees on a machine where `ray start` ran before
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


@pytest.mark.integration
def test_a_dead_local_head_is_skipped_with_a_warning():
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = _private_env(ray_tmp)
    port = free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    record = Path(ray_tmp) / "ray" / "ray_current_cluster"
    try:
        assert record.read_text().strip().endswith(f":{port}")
        # the head dies the way an OOM kill ends it: SIGKILL, no `ray stop`, its record left behind
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
        subprocess.run(["sleep", "1"], check=True)
        assert record.exists()
        out = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "ANSWER 42" in out.stdout
        assert f"local Ray head recorded at {record.read_text().strip()} does not answer" in out.stderr
        assert "Failed to connect to GCS" not in out.stderr
    finally:
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)


@pytest.mark.integration
def test_a_live_local_head_is_joined():
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = _private_env(ray_tmp)
    port = free_port()
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        join = JOIN + "; print('NODES', len(ray.nodes()), ray.get_runtime_context().gcs_address)"
        out = subprocess.run([sys.executable, "-c", join], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "ANSWER 42" in out.stdout and "does not answer" not in out.stderr
        assert out.stdout.strip().endswith(f":{port}")  # the head `ray start` made, not a fresh cluster
    finally:
        # never `ray stop`: it stops every Ray process of the machine, other tests' clusters included
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)
