"""Chunked, resumable output: the one resume mechanism of the data tools (`sft.build_cot`, `rl.label`).

A tool works through n input rows in chunks of `chunk_size` and writes each chunk's result to its own
file; killed at any point and started again on the same directory, it redoes at most the chunk it was
in: no duplicated and no lost rows. The directory holds

    progress.json     the settings, the finished chunks (`done_chunks`), `completed_chunks`,
                      `completed_rows`, and a small record per finished chunk (the tool's counts)
    chunks/<name>     one file per finished chunk (the name from a format such as "{:06d}.jsonl")

A chunk is done when progress.json lists it and its file exists. `write` first removes any old file of
the chunk and lists the chunk in progress.json, then renames the new file into place: the rename is the
commit. A kill before it leaves the chunk listed without a file, so it is redone; a chunk file that
progress.json does not list (a stray copy, or one left by an older version killed between its two
writes) is not trusted: its chunk is redone and the file overwritten. Both files are written by rename
(`atomic_write_text`), so neither is ever seen half-written.

Settings: progress.json fingerprints the run (the tool's settings plus the row count and chunk size);
opening the directory with other settings raises ValueError naming the keys that differ, rather than
mixing two runs' chunks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thinkrl.fileio import atomic_write_json, atomic_write_text

PROGRESS = "progress.json"


class ChunkedOutput:
    """The chunks of one run in `directory` (see the module docstring); opening writes nothing.

    settings: what must not change between a run and its resumption (JSON-serialisable).
    n_rows, chunk_size: chunk i covers rows `[i * chunk_size, (i + 1) * chunk_size)` (the last one fewer).
    name: the format of a chunk's file name under `chunks/`, given the chunk index.
    Raises ValueError if the directory holds the progress of a run with other settings.

    Example:
        >>> import tempfile
        >>> out = ChunkedOutput(tempfile.mkdtemp(), {"k": 4}, n_rows=5, chunk_size=2)
        >>> out.todo, out.rows(2)
        ([0, 1, 2], slice(4, 5, None))
        >>> out.write(0, "rows 0 and 1\\n", record={"kept": 2})
        >>> again = ChunkedOutput(out.directory, {"k": 4}, n_rows=5, chunk_size=2)
        >>> again.done, again.completed_rows, again.records, again.read(0)
        ([0], 2, {0: {'kept': 2}}, 'rows 0 and 1\\n')
        >>> ChunkedOutput(out.directory, {"k": 8}, n_rows=5, chunk_size=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...: started with other settings (differs in ['k']); use another output directory, or delete this one to start over
    """

    def __init__(self, directory: str | Path, settings: dict[str, Any], n_rows: int, chunk_size: int,
                 name: str = "{:06d}.json") -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.directory = Path(directory)
        self.settings = {**settings, "n_rows": n_rows, "chunk_size": chunk_size}
        self.n_rows, self.chunk_size, self.name = n_rows, chunk_size, name
        self.n_chunks = -(-n_rows // chunk_size)
        self._done: set[int] = set()
        self._records: dict[int, Any] = {}
        path = self.directory / PROGRESS
        if path.exists():
            progress = json.loads(path.read_text())
            before = progress["settings"]
            if before != self.settings:
                changed = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
                raise ValueError(f"{self.directory}: started with other settings (differs in {changed}); "
                                 "use another output directory, or delete this one to start over")
            self._done = {i for i in progress["done_chunks"] if self.path(i).exists()}
            self._records = {int(i): r for i, r in progress.get("records", {}).items() if int(i) in self._done}

    def path(self, index: int) -> Path:
        """The file of chunk `index`."""
        return self.directory / "chunks" / self.name.format(index)

    def rows(self, index: int) -> slice:
        """The rows chunk `index` covers, as a slice of the input."""
        return slice(index * self.chunk_size, min((index + 1) * self.chunk_size, self.n_rows))

    @property
    def done(self) -> list[int]:
        """The finished chunks, in order."""
        return sorted(self._done)

    @property
    def todo(self) -> list[int]:
        """The chunks left to do, in order."""
        return [i for i in range(self.n_chunks) if i not in self._done]

    @property
    def completed_rows(self) -> int:
        """How many input rows the finished chunks cover."""
        return sum(self.rows(i).stop - self.rows(i).start for i in self._done)

    @property
    def records(self) -> dict[int, Any]:
        """The record `write` was given for each finished chunk, by index."""
        return {i: self._records[i] for i in sorted(self._records)}

    def read(self, index: int) -> str:
        """The text of finished chunk `index`."""
        return self.path(index).read_text(encoding="utf-8")

    def write(self, index: int, text: str, record: Any = None) -> None:
        """Finish chunk `index`: its file holds `text`; `record` (small, JSON) is kept in progress.json."""
        path = self.path(index)
        path.unlink(missing_ok=True)  # an old file must not pass for this chunk if the rename never happens
        self._done.add(index)
        if record is not None:
            self._records[index] = record
        atomic_write_json(self.directory / PROGRESS, {
            "settings": self.settings, "n_chunks": self.n_chunks, "done_chunks": self.done,
            "completed_chunks": len(self._done), "completed_rows": self.completed_rows,
            "records": {str(i): r for i, r in self.records.items()}})
        atomic_write_text(path, text)
