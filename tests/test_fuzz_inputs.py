"""Fuzzed bad input: every broken recipe or dataset row ends in one clear error naming the file, the row
and the field, never a raw KeyError / TypeError / UnicodeDecodeError / RecursionError / yaml error, and a
failed load leaves nothing half-written.

Seeded mutations (200 per kind) of the shipped recipes (`recipes/tiny.yaml`, `recipes/tiny-vl.yaml`) loaded
as `python -m rl.train` loads them (`thinkrl.config.load_recipe(rl.config.Recipe, ...)`, no Ray), of a
`data.task=files` JSONL dataset read as the run reads it before any actor starts
(`thinkrl.run.load_prompts`), and of SFT conversation rows (`sft.data.encode_rows`). Pure Python, a few
seconds. A failing case is reported by its number and what was mutated (the sequence is fixed by SEED).
"""

import copy
import io
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from rl.config import Recipe
from thinkrl.config import RecipeError, load_recipe
from thinkrl.fileio import DataError
from thinkrl.run import DataConfig, RunConfig, load_prompts

SEED = 18
CASES = 200
ROOT = Path(__file__).resolve().parents[1]

# values of the wrong type, sign, size or encoding
BAD_VALUES = [None, "", "abc", -1, -(10**30), 10**400, float("inf"), float("nan"), [], {}, [1, 2], {"a": 1},
              True, "\x00", "ü" * 5, 1.5, "1e999", [None], [{"x": 1}], "x" * 100_000, "\ud800"]


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (14, 14), (0, 128, 0)).save(out, format="PNG")
    return out.getvalue()


# ---- recipes ---------------------------------------------------------------------------------------------


def _keys(node: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in node.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out += _keys(value, (*prefix, key))
    return out


def _dump(data) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode("utf-8", "surrogatepass")


def _recipe_case(rng: random.Random, base: dict, text: bytes) -> tuple[str, bytes, list[str], str | None]:
    """(description, file bytes, overrides, the dotted key the error must name or None)."""
    data, keys = copy.deepcopy(base), _keys(base)
    kind = rng.choice(["value", "value", "unknown", "section", "rewards", "non-utf8", "truncated", "whole",
                       "override", "deep"])
    if kind == "value":  # a wrong type, sign or size for a key that exists
        key = rng.choice(keys)
        node = data
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value = rng.choice(BAD_VALUES)
        return f"{'.'.join(key)} = {value!r:.40}", _dump(data), [], ".".join(key)
    if kind == "unknown":  # a key no section has, at the top or in a section
        section = rng.choice([None, *base])
        name = rng.choice(["zz", "lr ", "Seed", "iterations_"])
        (data[section] if section else data)[name] = 1
        return f"unknown key {name!r} in {section}", _dump(data), [], f"{section}.{name}" if section else name
    if kind == "section":  # a section that is not a mapping
        section = rng.choice(list(base))
        data[section] = value = rng.choice([[1], 3, "x", None, True, [{"a": 1}]])
        return f"section {section} = {value!r}", _dump(data), [], section if value is not None else None
    if kind == "rewards":
        data.setdefault("reward", {})["rewards"] = value = rng.choice(
            [[{"name": "no_such_module_zz:f"}], ["nope"], [3], ["math", "math"], [{"name": "math", "options": {"a": 1}}],
             "math", [{"name": "length", "weight": "heavy"}], [{"name": ":"}], [{"name": "a:b:c"}], [],
             [{"name": "math", "warmup_iterations": -3}], [{"name": "sys:maxsize"}], [None]])
        return f"reward.rewards = {value!r}", _dump(data), [], "reward.rewards"
    if kind == "non-utf8":
        at = rng.randrange(len(text))
        return f"byte 0x{0xff:x} at {at}", text[:at] + b"\xff\xfe" + text[at:], [], None
    if kind == "truncated":  # a copy cut short: either still valid YAML (then it must still validate) or not
        at = rng.randrange(len(text))
        return f"truncated at {at}", text[:at], [], None
    if kind == "whole":
        name, raw = rng.choice([("empty file", b""), ("a list", b"- run\n- rl\n"), ("a scalar", b"42\n"),
                                ("tabs", b"rl:\n\tlr: 1\n"), ("two documents", b"rl: {}\n---\nrl: {}\n"),
                                ("a key twice", b"rl:\n  lr: 1\n  lr: 2\n"), ("binary", bytes(range(256))),
                                ("a python tag", b"rl: !!python/object/apply:os.system ['true']\n"),
                                ("an unhashable key", b"? [a, b]\n: 1\n"), ("an undefined alias", b"rl: *x\n"),
                                ("a huge integer", b"rl:\n  iterations: " + b"9" * 5000 + b"\n")])
        return name, raw, [], None
    if kind == "deep":
        depth = rng.choice([2000, 5000])
        return f"nested {depth} deep", b"rl: " + b"[" * depth + b"]" * depth + b"\n", [], None
    override = rng.choice(["rl.lr=[", "=x", "rl..lr=1", "rl.lr", "rl.lr=@x", "rl.lr=*x", 'rl.lr="', "rl.lr=%x",
                           "rl.lr=!!python/object/apply:os.system ['true']", "rl.lr={", "rl.lr=: x",
                           "rl.lr=-1", "rl=3", "rl.lr=abc", "rl.zz=1", "rl.iterations=" + "9" * 5000])
    key = override.split("=", 1)[0] if override.split("=", 1)[0] in ("rl.lr", "rl", "rl.zz") else None
    return f"override {override[:40]!r}", text, [override], key


@pytest.mark.parametrize("source", ["tiny.yaml", "tiny-vl.yaml"])
def test_fuzzed_recipes_load_or_name_the_file_and_key(source, tmp_path):
    text = (ROOT / "recipes" / source).read_bytes()
    base = yaml.safe_load(text)
    rng = random.Random(f"{SEED}-{source}")
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        what, raw, overrides, key = _recipe_case(rng, base, text)
        path = tmp_path / f"case{case}.yaml"
        path.write_bytes(raw)
        try:
            load_recipe(Recipe, path, overrides)
        except RecipeError as e:
            message = str(e)
            outcomes["refused"] += 1
            where = f"override {overrides[0]!r}" if overrides and str(path) not in message else str(path)
            assert message.startswith(where), f"case {case} ({what}): the error does not start with {where}: {message}"
            if key:
                # by its dotted key, or by its section and name (a section's own check), or, where the
                # value is not even YAML, by the file's line
                section, leaf = key.split(".")[0], key.split(".")[-1].strip()
                named = (key in message or (f"{section}:" in message and leaf in message)
                         or re.match(rf"{re.escape(str(path))}:\d+: not valid YAML", message))
                assert named, f"case {case} ({what}): the error does not name {key}: {message}"
        except Exception as e:  # noqa: BLE001 (the point: nothing but RecipeError may come out)
            pytest.fail(f"case {case} ({what}): raw {type(e).__name__}: {str(e)[:300]}")
        else:
            outcomes["loaded"] += 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"case{i}.yaml" for i in range(CASES))  # no writes
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes


def test_recipe_errors_that_the_fuzz_found(tmp_path):
    """One of each raw exception the fuzz found in the recipe loader, now a RecipeError naming the place."""
    cases = {
        b"rl:\n  lr: 1\n  \xff: 2\n": r"case\.yaml:3: not UTF-8 \(byte 14",
        b"rl: " + b"[" * 5000 + b"]" * 5000: r"case\.yaml(:1)?: not valid YAML: .*nest",
        b"rl:\n  iterations: " + b"9" * 5000: r"case\.yaml: not valid YAML: Exceeds the limit",
        b"rl:\n  lr: 1\n  lr: 2\n": r"case\.yaml:3: not valid YAML: key 'lr' given twice",
        b"rl:\n\tlr: 1\n": r"case\.yaml:2: not valid YAML: found character",
    }
    path = tmp_path / "case.yaml"
    for raw, why in cases.items():
        path.write_bytes(raw)
        with pytest.raises(RecipeError, match=why):
            load_recipe(Recipe, path)
    path.write_text("rl:\n  lr: 1\n")
    for override, why in (("rl.lr=[", r"^override 'rl.lr=\[': not valid YAML: "),
                          ("rl.lr=@x", r"^override 'rl.lr=@x': not valid YAML: found character")):
        with pytest.raises(RecipeError, match=why):
            load_recipe(Recipe, path, [override])


# ---- data.task=files rows --------------------------------------------------------------------------------

ROWS = 8


def _good_rows() -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "images": ["ok.png"] if i % 2 else []}
            for i in range(ROWS)]


def _rows_case(rng: random.Random) -> tuple[str, bytes, int | None, str | None]:
    """(description, file bytes, the 1-based row the error must name or None for the file, the field or None)."""
    rows = _good_rows()
    lines = [json.dumps(r).encode() for r in rows]
    row = rng.randrange(ROWS)
    kind = rng.choice(["type", "type", "drop", "image", "non-utf8", "truncated", "line", "whole"])
    if kind == "type":
        field = rng.choice(["prompt", "answer", "images"])
        rows[row][field] = value = rng.choice(BAD_VALUES)
        lines[row] = json.dumps(rows[row]).encode()
        return f"row {row + 1} {field} = {value!r:.40}", b"\n".join(lines) + b"\n", row + 1, field
    if kind == "drop":
        field = rng.choice(["prompt", "answer"])
        del rows[row][field]
        lines[row] = json.dumps(rows[row]).encode()
        return f"row {row + 1} without {field}", b"\n".join(lines) + b"\n", row + 1, field
    if kind == "image":
        rows[row]["images"] = value = rng.choice(
            ["missing.png", ["ok.png", "missing.png"], "folder", "notes.txt", 7, False, {"bytes": "text"},
             {"path": None}, [["ok.png"]], {"bytes": [1, 2]}, "", "   "])
        lines[row] = json.dumps(rows[row]).encode()
        return f"row {row + 1} images = {value!r}", b"\n".join(lines) + b"\n", row + 1, "images"
    if kind == "non-utf8":
        at = rng.randrange(len(lines[row]))
        lines[row] = lines[row][:at] + b"\xc3\x28" + lines[row][at:]
        return f"row {row + 1}: bad UTF-8 at {at}", b"\n".join(lines) + b"\n", row + 1, None
    if kind == "truncated":  # the last line cut short, as by a full disk or a killed writer
        at = rng.randrange(1, len(lines[-1]))
        return f"last row cut at {at}", b"\n".join(lines[:-1] + [lines[-1][:at]]), ROWS, None
    if kind == "line":
        lines[row] = bad = rng.choice([b"[1, 2]", b"3", b"null", b'"a string"', b"{", b"[" * 5000 + b"]" * 5000,
                                       b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b', "answer": "1"}',
                                       b'{"prompt": "a", "answer": ' + b"9" * 5000 + b"}", b"\x00\x00"])
        return f"row {row + 1} = {bad[:30]!r}", b"\n".join(lines) + b"\n", row + 1, None
    name, raw, at = rng.choice([
        ("empty file", b"", None), ("blank lines only", b"\n  \n\n", None),
        ("one JSON array", json.dumps(rows).encode(), 1),
        ("a pretty-printed JSON array", json.dumps(rows, indent=1).encode(), 1),
    ])
    return name, raw, at, None


def test_fuzzed_rows_of_a_files_dataset_name_file_row_and_field(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder").mkdir()
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in _good_rows()))
    train = tmp_path / "train.jsonl"
    config = DataConfig(task="files", train_file=str(train), heldout_file=str(heldout))
    run_data = tmp_path / "run" / "data"
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        what, raw, row, field = _rows_case(rng)
        train.write_bytes(raw)
        try:
            load_prompts(config, 0, run_data)
        except DataError as e:
            message = str(e)
            outcomes["refused"] += 1
            where = f"{train}:{row}: " if row else f"{train}: "
            assert message.startswith(where), f"case {case} ({what}): the error does not start with {where}: {message}"
            assert field is None or f"'{field}'" in message, f"case {case} ({what}): no {field!r} in: {message}"
            assert "\n" not in message, f"case {case} ({what}): not one line: {message}"
        except Exception as e:  # noqa: BLE001 (the point: nothing but DataError may come out)
            pytest.fail(f"case {case} ({what}): raw {type(e).__name__}: {str(e)[:300]}")
        else:
            outcomes["loaded"] += 1
        # nothing half-written: at most the rows' image bytes, whole (there are none here)
        assert not run_data.exists(), f"case {case} ({what}): wrote {list(run_data.rglob('*'))}"
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes


def test_row_errors_that_the_fuzz_found(tmp_path):
    """One of each raw exception (or wrong number) the fuzz found in the row loaders, now a DataError."""
    (tmp_path / "ok.png").write_bytes(_png())
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n")
    train = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "p", "answer": "1"})
    cases = {  # the second line of the file -> what the error says after "train.jsonl:2: "; was:
        "[" * 5000 + "]" * 5000: r"not valid JSON \(nested too deeply\)",  # RecursionError
        '{"prompt": "p", "answer": "1", "images": 7}': r"field 'images': expected an image path or a list",  # TypeError
        '{"prompt": "p", "answer": "1", "images": true}': r"field 'images': expected an image path or a list",
        '{"prompt": "p", "answer": "1", "images": [{"bytes": "t"}]}': r"field 'images'\[0\]: expected image bytes",
        '{"prompt": ["a"], "answer": "1"}': r"field 'prompt': expected a string, got list",  # accepted
        '{"prompt": "p", "answer": NaN}': r"field 'answer': expected a string or a finite number",  # "nan"
        '{"prompt": "p", "answer": {"a": 1}}': r"field 'answer': expected a string or a finite number",
        '{"prompt": "p", "answer": ' + "9" * 5000 + "}": r"not valid JSON \(Exceeds the limit",  # ValueError
    }
    config = DataConfig(task="files", train_file=str(train), heldout_file=str(heldout))
    for bad, why in cases.items():
        train.write_text(f"{good}\n{bad}\n")
        with pytest.raises(DataError, match=r"train\.jsonl:2: " + why):
            load_prompts(config, 0, tmp_path / "run")
    # a blank line counts: the bad row is named by its line, as an editor shows it
    train.write_text(f"{good}\n\n{good}\n" + '{"prompt": 3, "answer": "1"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:4: field 'prompt'"):
        load_prompts(config, 0, tmp_path / "run")
    # a Parquet file that is not one
    broken = tmp_path / "train.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable Parquet file"):
        load_prompts(DataConfig(task="files", train_file=str(broken), heldout_file=str(heldout)), 0, tmp_path / "run")


def test_a_huge_row_is_refused_without_reading_it_whole(tmp_path):
    from thinkrl.fileio import MAX_ROW_BYTES, read_jsonl

    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:  # a 50 MB row between two good ones, and another bad row after it
        f.write(b'{"prompt": "p", "answer": "1"}\n{"prompt": "')
        f.write(b"x" * (50 * 2**20))
        f.write(b'", "answer": "1"}\n[1]\n{"prompt": "q", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"big\.jsonl:2: row longer than {MAX_ROW_BYTES} bytes"):
        read_jsonl(path, ("prompt", "answer"))
    with pytest.raises(DataError) as err:  # the lines after it keep their numbers
        read_jsonl(path, ("prompt", "answer"), list_errors=5)
    assert "2 bad row(s)" in str(err.value) and "big.jsonl:3: expected a JSON object, got list" in str(err.value)


def test_a_failed_load_leaves_no_run_directory(tmp_path):
    """prepare_run reads the prompts before it makes the run directory; a later row's failure leaves only
    whole image files written from earlier rows' bytes (content-addressed, atomic), never a partial one."""
    from thinkrl.run import ModelConfig, prepare_run

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n" + '{"prompt": "p", "answer": \n')
    run = RunConfig(output_dir=str(tmp_path / "run"))
    data = DataConfig(task="files", train_file=str(train), heldout_file=str(heldout))
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON"):
        prepare_run(run, ModelConfig(), data)
    assert not (tmp_path / "run").exists()
    # image bytes in an earlier row (a Parquet Image cell) are written whole before the bad row is reached
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["p", "q"], "answer": ["1", "2"],
                      "images": [[{"bytes": _png(), "path": None}], [{"bytes": b"garbage", "path": None}]]})
    pq.write_table(table, tmp_path / "train.parquet")
    data = DataConfig(task="files", train_file=str(tmp_path / "train.parquet"), heldout_file=str(heldout))
    with pytest.raises(DataError, match=r"train\.parquet:2: field 'images'\[0\]: .*not a readable image"):
        prepare_run(run, ModelConfig(), data)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in written] == [_png()] and not any(".tmp-" in p.name for p in written)


# ---- SFT conversation rows -------------------------------------------------------------------------------


def _conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"<think>{i} + {i}</think> \\boxed{{{2 * i}}}"}]}


def test_fuzzed_sft_rows_name_source_row_and_field(tokenizer):
    from sft.data import encode_rows

    rng = random.Random(SEED)
    source = "/data/cot.jsonl"
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        rows = [_conversation(i) for i in range(4)]
        row = rng.randrange(len(rows))
        turn = rng.randrange(2)
        kind = rng.choice(["role", "content", "turn", "messages", "insert", "images"])
        value = rng.choice(BAD_VALUES[:-2] + ["system", "assistant", "<|im_start|>", "<image>", [{"type": "text"}]])
        if kind in ("role", "content"):
            rows[row]["messages"][turn][kind] = value
        elif kind == "turn":
            rows[row]["messages"][turn] = value
        elif kind == "messages":
            rows[row]["messages"] = value
        elif kind == "insert":
            rows[row]["messages"].insert(rng.randrange(3), {"role": value, "content": rng.choice(BAD_VALUES[:-2])})
        else:
            rows[row]["images"] = value
        field = "images" if kind == "images" else "messages"
        what = f"row {row + 1} {kind} = {value!r:.40}"
        try:
            encode_rows(tokenizer, rows, source, 256)
        except DataError as e:
            message = str(e)
            outcomes["refused"] += 1
            assert message.startswith(f"{source}:{row + 1}: "), f"case {case} ({what}): {message}"
            named = field in message or "conversation" in message or "<image> marks" in message
            assert named, f"case {case} ({what}): no {field!r} in: {message}"
        except Exception as e:  # noqa: BLE001 (the point: nothing but DataError may come out)
            pytest.fail(f"case {case} ({what}): raw {type(e).__name__}: {str(e)[:300]}")
        else:
            outcomes["loaded"] += 1
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes
