"""RL checkpoints: `checkpoints/rl/iter_N/{hf, trainer, state.json}`, written atomically, then `latest.json`
points at the new one; a kill during a save leaves the previous checkpoint intact. `state.json` holds
what the driver needs to continue exactly (iteration, sampler state, evaluations, wall time)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from thinkrl.fileio import atomic_directory, atomic_write_json

CHECKPOINT_STATE = "state.json"


def save_checkpoint(run_dir: Path, trainers: list, iteration: int, state: dict, keep: int = 2) -> Path:
    """Write iteration `iteration`'s checkpoint (every rank saves its DeepSpeed state); returns its folder.

    Then only the newest `keep` checkpoints stay (`prune`).
    """
    import ray

    final = run_dir / "checkpoints" / "rl" / f"iter_{iteration:06d}"
    with atomic_directory(final) as tmp:
        (tmp / "hf").mkdir()
        ray.get([t.save_hf.remote(str(tmp / "hf")) for t in trainers])  # under ZeRO-3 a gather: every rank
        ray.get([t.save_state.remote(str(tmp / "trainer")) for t in trainers])
        atomic_write_json(tmp / CHECKPOINT_STATE, {**state, "iteration": iteration})
    atomic_write_json(run_dir / "checkpoints" / "rl" / "latest.json", {"iteration": iteration, "path": final.name})
    prune(final.parent, keep)
    return final


def prune(folder: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints in `folder`, and what killed saves left; the names gone.

    The one `latest.json` points at always stays. A checkpoint is renamed away before it is deleted,
    so a kill mid-delete leaves no half checkpoint under a checkpoint's name; the leftovers of such a
    kill (and the temporary folders of a save that was killed) go on the next call.
    """
    pointer = folder / "latest.json"
    latest = json.loads(pointer.read_text())["path"] if pointer.exists() else None
    done = sorted(p.name for p in folder.glob("iter_*") if p.is_dir() and not p.name.endswith(".old"))
    old = [name for name in done[: max(0, len(done) - keep)] if name != latest]
    for name in old:
        (folder / name).rename(folder / f".{name}.deleting")
    for leftover in [*folder.glob(".iter_*.deleting"), *folder.glob(".iter_*.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return old


def latest_checkpoint(run_dir: Path) -> tuple[Path | None, dict]:
    """(the folder of the last complete checkpoint, its state), or (None, {}) for a fresh run."""
    pointer = run_dir / "checkpoints" / "rl" / "latest.json"
    if not pointer.exists():
        return None, {}
    path = pointer.parent / json.loads(pointer.read_text())["path"]
    if not (path / CHECKPOINT_STATE).exists():
        return None, {}
    return path, json.loads((path / CHECKPOINT_STATE).read_text())


def save_final(run_dir: Path, trainers: list) -> Path:
    """`checkpoints/final`: the policy after RL as a Hugging Face folder (transformers and vLLM load it)."""
    import ray

    final = run_dir / "checkpoints" / "final"
    with atomic_directory(final) as tmp:
        ray.get([t.save_hf.remote(str(tmp)) for t in trainers])
    return final
