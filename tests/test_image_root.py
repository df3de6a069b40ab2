"""`sft.build_cot --image-root`: a dataset row cannot make the builder read, and send to the teacher, a file
outside the folder the user named. Hostile rows (absolute paths, `..`, symlinks at the last or an inner
component, a directory, a FIFO) are refused with file, row and field before any request; a file swapped
for a symlink after the check is refused when the prompt is built. Pure Python: the teacher is a local
fake OpenAI-compatible server that records what it is sent."""

import base64
import io
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from sft import build_cot
from thinkrl.fileio import DataError, write_jsonl
from thinkrl.vl import inputs


def _png(colour=(0, 0, 255)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (14, 14), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def layout(tmp_path):
    """data/ (the questions' folder and default root) holding q.jsonl and img/ok.png; outside/ beside it
    with a secret that decodes as an image (so only the root check stands between it and the teacher)."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "img").mkdir(parents=True)
    outside.mkdir()
    (data / "img" / "ok.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png((255, 0, 0)))
    return data, outside


def _questions(data: Path, *images) -> Path:
    """q.jsonl in `data`: row 1 is polite, row i + 2 has images[i]."""
    rows = [{"id": f"q{i}", "question": "How many?", "answer": "1", "images": image}
            for i, image in enumerate(["img/ok.png", *images])]
    write_jsonl(data / "q.jsonl", rows)
    return data / "q.jsonl"


def _hostile(data: Path, outside: Path) -> list[tuple[object, str]]:
    """(the image field of a hostile row, what its error says after 'field 'images'[i]: ')."""
    (data / "img" / "link.png").symlink_to(outside / "secret.png")
    (data / "img" / "linked_dir").symlink_to(outside)
    (data / "img" / "folder.png").mkdir()
    return [
        (str(outside / "secret.png"), f"{outside / 'secret.png'} is outside the image root {data}"),
        ("../outside/secret.png", f"{data / '../outside/secret.png'} is outside the image root {data}"),
        ("img/../../outside/secret.png", "is outside the image root"),
        ("img/link.png", f"{data / 'img/link.png'} is outside the image root {data}"),
        ("img/linked_dir/secret.png", f"{data / 'img/linked_dir/secret.png'} is outside the image root {data}"),
        ("/etc/passwd", f"/etc/passwd is outside the image root {data}"),
        ("~/.ssh/id_rsa", "id_rsa is outside the image root"),
        ("img/folder.png", "img/folder.png' is not a regular file"),
        (["img/ok.png", "../outside/secret.png"], "is outside the image root"),  # the second image: [1]
    ]


def test_hostile_rows_are_refused_naming_file_row_and_field(layout):
    data, outside = layout
    cases = _hostile(data, outside)
    for image, why in cases:
        path = _questions(data, image)
        index = 1 if isinstance(image, list) else 0
        with pytest.raises(DataError) as err:
            build_cot.read_questions(path, image_field="images")
        assert str(err.value).startswith(f"{path}:2: field 'images'[{index}]: "), str(err.value)
        assert why in str(err.value), str(err.value)
    # the same files are fine under a root that holds them; the polite row resolves as before
    [polite, secret] = build_cot.read_questions(_questions(data, "../outside/secret.png"), image_field="images",
                                                 image_root=data.parent)
    assert polite.images == [str(data / "img" / "ok.png")] and secret.images == [str(outside / "secret.png")]
    # a symlink that stays inside the root is followed, to its real path
    (data / "img" / "alias.png").symlink_to("ok.png")
    [_, alias] = build_cot.read_questions(_questions(data, "img/alias.png"), image_field="images")
    assert alias.images == [str(data / "img" / "ok.png")]
    # URLs are not read here (http(s): the openai teacher's to send, the vllm teacher refuses them)
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    [_, inline] = build_cot.read_questions(_questions(data, url), image_field="images")
    assert inline.images == [url]


class _Recorder(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers \\boxed{1} and keeps every request body."""

    bodies: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        data = json.dumps({"choices": [{"message": {"content": "\\boxed{1}"}}] * body["n"]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def teacher_url():
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.bodies.clear()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def _sent_images(bodies: list) -> list[bytes]:
    return [base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            for body in bodies for m in body["messages"] if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image_url"]


def test_the_cli_refuses_before_any_teacher_call(layout, teacher_url, tmp_path, capsys):
    data, outside = layout
    argv = ["--teacher", "openai", "--base-url", teacher_url, "--model", "m", "--image-field", "images",
            "--reward", "none", "-k", "1", "--no-progress"]
    for n, (image, why) in enumerate(_hostile(data, outside)):
        out = tmp_path / f"out{n}"
        assert build_cot.main(["--input", str(_questions(data, image)), "--output", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(rf"^error: .*q\.jsonl:2: field 'images'\[\d\]: .*{re.escape(why)}", err), err
        assert _Recorder.bodies == [] and not (out / "chunks").exists()
    # polite rows go through, their image sent as a data URL; --image-root widens what may be read
    out = tmp_path / "polite"
    assert build_cot.main(["--input", str(_questions(data)), "--output", str(out), *argv]) == 0
    assert _sent_images(_Recorder.bodies) == [_png()]
    _Recorder.bodies.clear()
    wide = ["--input", str(_questions(data, str(outside / "secret.png"))), "--image-root", str(data.parent)]
    assert build_cot.main([*wide, "--output", str(tmp_path / "wide"), *argv]) == 0
    assert sorted(_sent_images(_Recorder.bodies)) == sorted([_png(), _png((255, 0, 0))])
    with pytest.raises(SystemExit):
        build_cot.main([*wide[:3], str(data / "nope"), "--output", str(tmp_path / "x"), *argv])
    assert f"--image-root {data / 'nope'}: not a folder" in capsys.readouterr().err
    assert "(None: the --input file's folder)" in " ".join(build_cot._arg_parser().format_help().split())


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_sent(layout, teacher_url, tmp_path):
    data, outside = layout
    questions = build_cot.read_questions(_questions(data), image_field="images")
    (data / "img" / "ok.png").unlink()
    (data / "img" / "ok.png").symlink_to(outside / "secret.png")
    teacher = build_cot.make_teacher("openai", base_url=teacher_url, model="m")
    with pytest.raises(DataError, match=r"question 'q0': .*ok\.png is outside the image root"):
        build_cot.build_dataset(questions, tmp_path / "out", teacher, k=1, reward="none", progress=False,
                                log=lambda _: None, image_root=data)
    assert _Recorder.bodies == []
    assert not list((tmp_path / "out" / "chunks").glob("*.json"))


def test_read_image_file_rechecks_what_it_opened(layout, monkeypatch):
    """A swap between the realpath check and the open: simulated by a realpath that reports a stale
    answer (the path as given). The last component is caught by O_NOFOLLOW, an inner one by the check
    of the opened file."""
    data, outside = layout
    (data / "img" / "link.png").symlink_to(outside / "secret.png")
    (data / "img" / "linked_dir").symlink_to(outside)
    assert inputs.read_image_file(data / "img" / "ok.png", data) == (data / "img" / "ok.png", _png())
    monkeypatch.setattr(inputs.os.path, "realpath", lambda p: os.fspath(p))
    with pytest.raises(ValueError, match=r"cannot open image file .*link\.png.*symbolic links"):
        inputs.read_image_file(data / "img" / "link.png", data)
    with pytest.raises(ValueError, match=r"secret\.png is outside the image root .* changed while it was opened"):
        inputs.read_image_file(data / "img" / "linked_dir" / "secret.png", data)


def test_a_fifo_or_device_is_refused_without_being_read(layout):
    data, _ = layout
    os.mkfifo(data / "img" / "pipe.png")  # a plain read would block forever
    with pytest.raises(ValueError, match=r"pipe\.png' is not a regular file"):
        inputs.read_image_file(data / "img" / "pipe.png", data)
    with pytest.raises(ValueError, match=r"'/dev/zero' is not a regular file"):
        inputs.read_image_file(Path("/dev/zero"))
    with pytest.raises(ValueError, match=r"image file '.*gone\.png' not found"):
        inputs.read_image_file(data / "gone.png", data)
