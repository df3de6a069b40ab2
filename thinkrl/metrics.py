"""Run metrics: JSONL (the record), TensorBoard (to watch), and a PNG plot at the end."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Append one record per step to `metrics.jsonl` and TensorBoard; resumable.

    On resume, records past `resume_step` (written after the checkpoint the run resumes from) are
    dropped, so the file holds each step once.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, key: str = "iteration") -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.key = key
        truncate_jsonl(self.path, key, resume_step)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; a broken install should not stop a run
            pass

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {self.key: step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_jsonl(path: Path, key: str, last_step: int | None) -> None:
    """Keep only the records of `path` with `key` <= `last_step` (all gone if None), atomically."""
    from thinkrl.fileio import atomic_write_text

    if not path.exists():
        return
    if last_step is None:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get(key, -1) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_curves(records: list[dict], out_png: str | Path, x: str, panels: dict[str, list[str]]) -> None:
    """One panel per entry of `panels` (title -> metric names) against `x`, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, names) in zip(list(axes) if len(panels) > 1 else [axes], panels.items(), strict=True):
        for name in names:
            pts = [(r[x], r[name]) for r in records if name in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
