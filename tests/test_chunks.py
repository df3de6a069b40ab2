"""`thinkrl.chunks.ChunkedOutput`, the resume mechanism of `sft.build_cot` and `rl.label`: what a kill at
each point of `write` leaves, and what the next run makes of it."""

import json

import pytest

from thinkrl.chunks import ChunkedOutput


def _open(tmp_path, settings=None):
    return ChunkedOutput(tmp_path, settings or {"k": 4}, n_rows=7, chunk_size=3, name="{:06d}.jsonl")


def test_chunks_cover_the_rows_once_and_resume_where_they_stopped(tmp_path):
    out = _open(tmp_path)
    assert out.n_chunks == 3 and [out.rows(i) for i in out.todo] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert not (tmp_path / "progress.json").exists()  # opening writes nothing
    out.write(0, "a\n", record={"rows": 3})
    out.write(2, "c\n", record={"rows": 1})
    again = _open(tmp_path)
    assert again.done == [0, 2] and again.todo == [1] and again.completed_rows == 4
    assert again.records == {0: {"rows": 3}, 2: {"rows": 1}} and again.read(2) == "c\n"
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["done_chunks"] == [0, 2] and progress["completed_chunks"] == 2
    assert progress["completed_rows"] == 4 and progress["settings"]["chunk_size"] == 3


def test_a_chunk_file_progress_does_not_list_is_redone(tmp_path):
    out = _open(tmp_path)
    out.write(0, "a\n")
    (tmp_path / "chunks" / "000001.jsonl").write_text("stale\n")  # not listed: not trusted
    again = _open(tmp_path)
    assert again.todo == [1, 2]
    again.write(1, "b\n")
    assert _open(tmp_path).read(1) == "b\n"


def test_a_kill_between_listing_and_renaming_redoes_the_chunk(tmp_path, monkeypatch):
    import thinkrl.chunks

    out = _open(tmp_path)
    out.write(0, "a\n")
    (tmp_path / "chunks" / "000001.jsonl").write_text("stale\n")

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(thinkrl.chunks, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        out.write(1, "b\n")
    monkeypatch.undo()
    assert json.loads((tmp_path / "progress.json").read_text())["done_chunks"] == [0, 1]
    assert _open(tmp_path).todo == [1, 2]  # listed, but its (stale) file was removed before the kill


def test_other_settings_are_refused_naming_the_keys(tmp_path):
    _open(tmp_path).write(0, "a\n")
    with pytest.raises(ValueError, match=r"differs in \['k'\]"):
        _open(tmp_path, {"k": 8})
    with pytest.raises(ValueError, match=r"differs in \['chunk_size'\]"):
        ChunkedOutput(tmp_path, {"k": 4}, n_rows=7, chunk_size=2, name="{:06d}.jsonl")
