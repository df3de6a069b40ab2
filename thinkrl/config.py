"""Recipe loading: a YAML file plus dotted `key=value` overrides, validated by a pydantic model.

Configs stop at the door: drivers read a validated recipe once, in setup, and hand each component only
the plain values it needs. Every model here forbids unknown keys, so a typo fails before anything
starts, with the dotted key and the file named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key."""


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser where installed: faster, and it bounds the nesting depth) that
    refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # before merge keys (`<<`) are flattened: those may be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class names it
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str, lines: bool = True) -> Any:
    """`text` parsed as one YAML document; RecipeError starting with `where` (and the line, with `lines`)
    if it is not.

    Besides YAML's own errors: nesting too deep for the parser (RecursionError) and an integer of more
    digits than Python converts (ValueError) are bad input too, not crashes.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None and lines else ""
        context = f" ({e.context})" if e.context else ""
        raise RecipeError(f"{where}{line}: not valid YAML: {e.problem}{context}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise RecipeError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as e:
        raise RecipeError(f"{where}: not valid YAML: {e}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["rl.lr=1e-5", "run.output_dir=/x"]` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"override {item!r} has an empty key part")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = _parse_yaml(raw, f"override {item!r}", lines=False) if raw != "" else ""
    return nested


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(model: type[M], path: str | Path, overrides: list[str] = ()) -> M:
    """Load and validate a recipe. Raises RecipeError naming the file and the offending keys."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    raw = _parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    data = _merge(raw, parse_overrides(list(overrides)))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {msg}")
        raise RecipeError(f"{path}: invalid recipe\n" + "\n".join(lines)) from None


def dump_recipe(config: BaseModel, path: str | Path) -> None:
    """Write the resolved recipe (after overrides and defaults) as YAML, atomically."""
    from thinkrl.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
