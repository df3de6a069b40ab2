"""Run metrics: JSONL (the record), TensorBoard (to watch), and a PNG plot at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class MetricsLogger:
    """Append one record per step to `metrics.jsonl` and TensorBoard; resumable.

    On resume from `resume_step`, records past it (written after the checkpoint the run resumes from)
    are dropped, and so are records at `resume_step` itself holding a key of `redone` (work after the
    checkpoint that the resumed run does again, e.g. the final evaluation): the file holds each step
    once. TensorBoard gets the same cut: events from `resume_step` on are purged (`purge_step`) and the
    kept records of `resume_step` are written again. A fresh run (`resume_step` None) starts both empty.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, key: str = "iteration",
                 redone: tuple[str, ...] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.key = key
        truncate_jsonl(self.path, key, resume_step, redone)
        self._tb = None
        tb_dir = Path(run_dir) / "tensorboard"
        if resume_step is None:
            shutil.rmtree(tb_dir, ignore_errors=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tb_dir), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; a broken install should not stop a run
            return
        for record in self.records():
            if record[key] == resume_step:
                self._scalars(record)

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {self.key: step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record)

    def _scalars(self, record: dict) -> None:
        if self._tb is None:
            return
        for name, value in record.items():
            if name != self.key and isinstance(value, (int, float)):
                self._tb.add_scalar(name, value, record[self.key])
        self._tb.flush()

    def records(self) -> list[dict]:
        return read_jsonl_records(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl_records(path: Path) -> list[dict]:
    """The records of an append-only JSONL log; a last line torn by a kill mid-append is left out."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON record (only the last line may be torn)") from None
    return records


def truncate_jsonl(path: Path, key: str, last_step: int | None, redone: tuple[str, ...] = ()) -> None:
    """Keep only the records of `path` with `key` <= `last_step` (all gone if None), atomically.

    Records at `last_step` holding any key in `redone` go too, and so does a torn last line.
    """
    from thinkrl.fileio import atomic_write_text

    if not path.exists():
        return
    if last_step is None:
        path.unlink()
        return
    kept = [r for r in read_jsonl_records(path)
            if r.get(key, -1) < last_step or (r.get(key) == last_step and not any(k in r for k in redone))]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_curves(records: list[dict], out_png: str | Path, x: str, panels: dict[str, list[str]],
                marks: list[tuple[float, str]] = ()) -> None:
    """One panel per entry of `panels` (title -> metric names) against `x`, saved as PNG; `marks`: (x, label)
    drawn as dashed vertical lines on every panel (e.g. the curriculum's level changes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, names) in zip(list(axes) if len(panels) > 1 else [axes], panels.items(), strict=True):
        for name in names:
            pts = [(r[x], r[name]) for r in records if name in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=name)
        for at, label in marks:
            ax.axvline(at, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(label, (at, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="grey")
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_test_time_scaling(points: list[dict], out_png: str | Path, subtitle: str) -> None:
    """Accuracy (and mean response tokens, right axis) against the token budget, log2 x axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [p["max_tokens"] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(budgets, [p["accuracy"] for p in points], marker="o", color="tab:blue", label="accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("thinking budget (max tokens)")
    ax.set_ylabel("held-out accuracy", color="tab:blue")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    tokens = ax.twinx()
    tokens.plot(budgets, [p["mean_response_tokens"] for p in points], marker=".", linestyle="--", color="tab:orange")
    tokens.set_ylabel("mean response tokens", color="tab:orange")
    ax.set_title(f"test-time scaling\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
