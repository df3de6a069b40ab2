"""Set-up helpers a new user meets first: the job's code snapshot and the tested package set."""

import importlib.util
from pathlib import Path

import pytest

from thinkrl.cluster import code_snapshot

REPO = Path(__file__).resolve().parent.parent


def _constraints_module():
    spec = importlib.util.spec_from_file_location("constraints", REPO / "scripts" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_snapshot_takes_code_and_leaves_outputs_and_logs(tmp_path):
    src = tmp_path / "repo"
    for rel in ("rl/train.py", "recipes/tiny.yaml", "pyproject.toml", "rl/sub/x.py", "demo.log", "runs/tiny/metrics.jsonl",
                ".venv/bin/python", ".cache/models/m.safetensors", "rl/__pycache__/train.cpython-311.pyc",
                "w.safetensors", ".git/HEAD", "bench/results/run_all.json", "nested/out.log"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dest = Path(code_snapshot(src, tmp_path / "snap"))
    kept = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert kept == ["pyproject.toml", "recipes/tiny.yaml", "rl/sub/x.py", "rl/train.py"]
    # the snapshot is a copy: the checkout may change while Ray packages it
    (src / "rl" / "train.py").write_text("changed")
    assert (dest / "rl" / "train.py").read_text() == "rl/train.py"


def test_constraints_check_names_each_drifted_package(tmp_path):
    c = _constraints_module()
    pins = {"torch": "2.13.0", "ray": "2.60.0", "pyyaml": "6.0.2"}
    assert c.drift(pins, {"torch": "2.13.0", "ray": "2.60.0"}) == []  # a pinned package not installed is fine
    lines = c.drift(pins, {"torch": "2.13.0", "ray": "2.61.0", "rich": "14.0.0"})
    assert lines == ["ray==2.61.0 is installed, the tested set has ray==2.60.0",
                     "rich==14.0.0 is installed but not in the tested set"]
    path = tmp_path / "cpu.txt"
    path.write_text("# comment\nTorch==2.13.0\n\nPyYAML==6.0.2  # why\n")
    assert c.read(path) == {"torch": "2.13.0", "pyyaml": "6.0.2"}
    path.write_text("torch>=2.4\n")
    with pytest.raises(SystemExit, match=r"cpu.txt:1: expected 'name==version'"):
        c.read(path)

