"""Model merging (a long2short method of Kimi k1.5): `thinkrl merge A B --alpha X --out DIR`.

    thinkrl merge runs/long/checkpoints/final runs/short/checkpoints/final --alpha 0.5 --out merged/

writes weights alpha * A + (1 - alpha) * B, parameter by parameter (k1.5 averages a long-CoT model with a
short-CoT one of the same architecture: the merge answers with lengths in between). Each tensor is
accumulated in float32 and saved in A's dtype; the tokenizer, config, generation and processor files are
A's, and so is the shard layout (`model.safetensors`, or A's shards and its index). Tensors that are not
floating point (integer buffers) must be equal in both and are copied.

Everything is checked before anything is written: alpha in [0, 1], both folders Hugging Face models with
safetensors weights, the same architecture (config.json equal but for bookkeeping keys such as the
transformers version or the dtype), the same parameter names and shapes; a refusal names the first key or
parameter that differs. The output folder is written under a temporary name and renamed into place
(`thinkrl.fileio.atomic_directory`): a kill never leaves a half model. Memory: one shard of A and its
tensors of B at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
# config.json keys that say how a folder was saved, not what the model computes
BOOKKEEPING_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash",
                              "use_cache"})


class MergeError(ValueError):
    """Two models that cannot be merged (or a bad request); the message names the first difference."""


def merge_tensor(a: torch.Tensor, b: torch.Tensor, alpha: float, name: str = "tensor") -> torch.Tensor:
    """alpha * a + (1 - alpha) * b, accumulated in float32, in a's dtype; a non-float tensor must equal b's.

    Example:
        >>> merge_tensor(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), torch.tensor([3.0, 5.0]), 0.25)
        tensor([2.5000, 4.5000], dtype=torch.bfloat16)
    """
    if a.shape != b.shape:
        raise MergeError(f"parameter {name!r} has shape {list(a.shape)} in A and {list(b.shape)} in B")
    if not a.is_floating_point():
        if not torch.equal(a, b.to(a.dtype)):
            raise MergeError(f"parameter {name!r} is not floating point ({a.dtype}) and differs between A and B")
        return a.clone()
    return (alpha * a.float() + (1 - alpha) * b.float()).to(a.dtype)


def config_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first key (dotted, nested configs included) whose value differs between two config.json dicts,
    with both values; None when they describe the same model. `BOOKKEEPING_KEYS` are ignored; the
    architecture keys are compared first, so an architecture mismatch is named as one.

    Example:
        >>> config_difference({"model_type": "qwen2", "hidden_size": 8}, {"model_type": "llama", "hidden_size": 4})
        "model_type: 'qwen2' in A, 'llama' in B"
    """
    first = [k for k in ("model_type", "architectures") if k in a or k in b]
    for key in first + sorted((set(a) | set(b)) - set(first) - BOOKKEEPING_KEYS):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            if inner := config_difference(va, vb, f"{prefix}{key}."):
                return inner
        elif va != vb:
            return f"{prefix}{key}: {va!r} in A, {vb!r} in B"
    return None


def weight_files(folder: Path) -> dict[str, str]:
    """{parameter name: safetensors file name} of a model folder (one file, or shards with their index).

    Raises MergeError naming the folder when it is not a Hugging Face model folder with safetensors weights.
    """
    from safetensors import safe_open

    if not folder.is_dir():
        raise MergeError(f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        raise MergeError(f"{folder}: not a Hugging Face model folder (no config.json)")
    if (folder / INDEX).is_file():
        try:
            mapping = json.loads((folder / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise MergeError(f"{folder / INDEX}: not a safetensors index ({e})") from None
        missing = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if missing:
            raise MergeError(f"{folder / INDEX}: shard {missing[0]} is missing")
        return dict(mapping)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = "no *.safetensors file" if not files else f"{len(files)} .safetensors files and no {INDEX}"
        raise MergeError(f"{folder}: {found} (only safetensors weights are merged; save the model with "
                         "safe_serialization=True)")
    try:
        with safe_open(str(files[0]), "pt") as f:
            return dict.fromkeys(f.keys(), files[0].name)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise MergeError(f"{files[0]}: not a readable safetensors file ({e})") from None


def _shapes(folder: Path, files: dict[str, str]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for name in sorted(set(files.values())):
        try:
            with safe_open(str(folder / name), "pt") as f:
                present = set(f.keys())
                for key in (k for k, file in files.items() if file == name):
                    if key not in present:
                        raise MergeError(f"{folder / name}: parameter {key!r} is listed in {INDEX} but not stored")
                    shapes[key] = list(f.get_slice(key).get_shape())
        except MergeError:
            raise
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise MergeError(f"{folder / name}: not a readable safetensors file ({e})") from None
    return shapes


def check_mergeable(a: Path, b: Path, alpha: float, out: Path, overwrite: bool = False) -> dict[str, str]:
    """Everything `merge` checks before it writes; returns A's {parameter: file}. Raises MergeError."""
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise MergeError(f"--alpha must be in [0, 1] (the weight of A), got {alpha}")
    files_a, files_b = weight_files(a), weight_files(b)
    out_real, a_real, b_real = (p.expanduser().resolve() for p in (out, a, b))
    for name, src in (("A", a_real), ("B", b_real)):
        if out_real == src or src in out_real.parents:
            raise MergeError(f"--out {out} is {'model ' + name if out_real == src else 'inside model ' + name} "
                             f"({src}): write the merge to a folder of its own")
        if out_real in src.parents:
            raise MergeError(f"--out {out} contains model {name} ({src}): write the merge to a folder of its own")
    if out_real.exists() and (not out_real.is_dir() or any(out_real.iterdir())) and not overwrite:
        raise MergeError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    try:
        config_a, config_b = (json.loads((p / "config.json").read_text()) for p in (a, b))
    except ValueError as e:
        raise MergeError(f"config.json is not valid JSON ({e})") from None
    if difference := config_difference(config_a, config_b):
        raise MergeError(f"the models differ in config.json ({difference}): only models of one architecture merge")
    for key in files_a:
        if key not in files_b:
            raise MergeError(f"parameter {key!r} is in A ({a}) but not in B ({b})")
    for key in files_b:
        if key not in files_a:
            raise MergeError(f"parameter {key!r} is in B ({b}) but not in A ({a})")
    shapes_a, shapes_b = _shapes(a, files_a), _shapes(b, files_b)
    for key, shape in shapes_a.items():
        if shape != shapes_b[key]:
            raise MergeError(f"parameter {key!r} has shape {shape} in A ({a}) and {shapes_b[key]} in B ({b})")
    return files_a


def merge(a: str | Path, b: str | Path, alpha: float, out: str | Path, overwrite: bool = False) -> dict:
    """Write alpha * A + (1 - alpha) * B to `out` (atomically; see the module docstring); returns a summary.

    Raises MergeError, naming the first difference, before anything is written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from thinkrl.fileio import atomic_directory, atomic_write_json

    a, b, out = Path(a).expanduser(), Path(b).expanduser(), Path(out).expanduser()
    files_a = check_mergeable(a, b, alpha, out, overwrite)
    files_b = weight_files(b)
    with atomic_directory(out) as tmp:
        for entry in sorted(a.iterdir()):  # A's tokenizer, config, generation and processor files
            if entry.name.startswith(".") or entry.suffix == ".safetensors" or entry.name == INDEX:
                continue
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, tmp / entry.name)
        if (a / INDEX).is_file():
            shutil.copy2(a / INDEX, tmp / INDEX)
        for shard in sorted(set(files_a.values())):
            keys = [k for k, f in files_a.items() if f == shard]
            merged = {}
            with safe_open(str(a / shard), "pt") as fa:
                for b_shard in sorted({files_b[k] for k in keys}):
                    with safe_open(str(b / b_shard), "pt") as fb:
                        for key in (k for k in keys if files_b[k] == b_shard):
                            merged[key] = merge_tensor(fa.get_tensor(key), fb.get_tensor(key), alpha, key)
            save_file(merged, str(tmp / shard), metadata={"format": "pt"})
        summary = {"a": str(a.resolve()), "b": str(b.resolve()), "alpha": alpha, "parameters": len(files_a),
                   "out": str(out.resolve())}
        atomic_write_json(tmp / "thinkrl_merge.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="model folder A (its tokenizer, config and dtype are the merge's)")
    parser.add_argument("b", help="model folder B (same architecture, parameter names and shapes)")
    parser.add_argument("--alpha", type=float, required=True, help="weight of A in [0, 1]: alpha*A + (1-alpha)*B")
    parser.add_argument("--out", required=True, help="output model folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.a, args.b, args.alpha, args.out, args.overwrite)
    except MergeError as e:
        print(f"error: cannot merge: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
