"""Atomic writes and validated JSONL reading.

Everything thinkrl leaves on disk that a later run trusts (checkpoints, model caches, state, datasets)
is written under a temporary name and renamed into place, so a kill during a save leaves the previous
version intact and never a half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The one atomic file write: `rewards` may import nothing of thinkrl (the reward contract is importable
# alone) but thinkrl may import `rewards`, so the helper lives there and is re-exported here.
from rewards.atomic import atomic_write_text


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    An existing `final` is moved aside first and removed after the swap, so at every instant either the
    old or the new complete folder exists under that name (or, for the instant between the two renames,
    the old one under `<final>.old`, which `atomic_directory` itself cleans up on the next call).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stale = final.with_name(final.name + ".old")
    if stale.exists() and final.exists():
        shutil.rmtree(stale)
    elif stale.exists():
        stale.rename(final)  # a crash between the two renames below: the old copy is the good one
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            final.rename(stale)
        tmp.rename(final)
        if stale.exists():
            shutil.rmtree(stale)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_text` of `obj` as indented, key-sorted JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the file, row and field."""


MAX_ROW_BYTES = 16 * 2**20
"""The longest JSONL line read (16 MiB): a prompt, answer or long-CoT conversation is far shorter, and a
line is read whole, so a file that is one endless line would otherwise take all memory."""


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), *, list_errors: int = 1) -> list[dict]:
    """Read a JSONL file, checking every row is an object with the `required` non-empty fields.

    Raises DataError naming the file, the 1-based line number and the field on the first bad row; with
    `list_errors` N > 1 it reads the whole file and the error counts every bad row and lists the first N.
    A line is bad when it is not UTF-8, not JSON (truncated, nested too deeply to parse), not an object,
    lacks a required field, or is longer than `MAX_ROW_BYTES`.
    """
    return [row for _, row in read_jsonl_numbered(path, required, list_errors=list_errors)]


def read_jsonl_numbered(path: str | Path, required: tuple[str, ...] = (), *,
                        list_errors: int = 1) -> list[tuple[int, dict]]:
    """`read_jsonl`, each row with its line number (blank lines are skipped, but counted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    rows, problems = [], []
    with open(path, "rb") as f:  # UTF-8, as every file here is written; decoded line by line to name a bad one
        for lineno, raw in enumerate(_lines(f), start=1):
            if raw is None:
                problem = f"{path}:{lineno}: row longer than {MAX_ROW_BYTES} bytes (MAX_ROW_BYTES)"
            elif not raw.strip():
                continue
            else:
                problem, row = _parse_row(raw, required)
                problem = problem and f"{path}:{lineno}: {problem}"
            if not problem:
                rows.append((lineno, row))
                continue
            if list_errors <= 1:
                raise DataError(problem)
            problems.append(problem)
    if problems:
        more = f"\n  ... and {len(problems) - list_errors} more" if len(problems) > list_errors else ""
        raise DataError(f"{len(problems)} bad row(s):\n  " + "\n  ".join(problems[:list_errors]) + more)
    if not rows:
        raise DataError(f"{path}: dataset file has no rows")
    return rows


def _lines(f) -> Iterator[bytes | None]:
    """The lines of binary file `f`, None for each longer than MAX_ROW_BYTES (read past, never held)."""
    while line := f.readline(MAX_ROW_BYTES + 1):
        if len(line) <= MAX_ROW_BYTES:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(MAX_ROW_BYTES + 1)
        yield None


def _parse_row(raw: bytes, required: tuple[str, ...]) -> tuple[str | None, dict | None]:
    """(problem, row) of one JSONL line: the problem None when it is a good row."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte {e.start})", None
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg})", None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return f"not valid JSON ({e})", None
    except RecursionError:
        return "not valid JSON (nested too deeply)", None
    return _row_problem(row, required), row


def text_problem(value) -> str | None:
    """Why `value` cannot be the text of a row's field (a prompt, a turn's content), or None if it can:
    it must be a string that encodes as UTF-8 (JSON's `"\\ud800"` escape decodes to one that does not,
    and tokenizers fail on it)."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (a lone surrogate at character {e.start})"
    return None


def _row_problem(row, required: tuple[str, ...]) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in required if k not in row or row[k] is None or str(row[k]).strip() == ""]
    return f"missing or empty field {', '.join(map(repr, missing))}" if missing else None


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """`atomic_write_text` of `rows`, one JSON object per line."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def load_rows_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """`load_rows`, each row with the number an error should name it by: a JSONL file's line (blank lines
    are skipped, but counted), else its 1-based index."""
    path = Path(path).expanduser()
    if path.is_dir() or path.suffix == ".parquet":
        return list(enumerate(load_rows(path), start=1))
    return read_jsonl_numbered(path)


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a JSONL / Parquet file or a `datasets` folder. Raises DataError naming the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a `datasets` folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        rows = ds.to_list()
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not path.is_file():
            raise DataError(f"{path}: dataset file not found")
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    else:
        rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: dataset has no rows")
    return rows
