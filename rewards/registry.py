"""Finding a reward by name: built-ins, `module:attr` paths, and the `thinkrl.rewards` entry-point group.

Resolution order: a built-in name (`BUILTINS`), then a name containing ":" as `module:attr` (attr may be
dotted), then an installed entry point of group `thinkrl.rewards` whose name is the reward's name. What a
name points at is a reward class (instantiated with the spec's options as keyword arguments) or a reward
function (options, if any, bound as keyword arguments). Either way the result must be picklable, since it
is shipped to worker processes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from rewards.types import DEFAULT_SCORE_RANGE, RewardKind

ENTRY_POINT_GROUP = "thinkrl.rewards"
BUILTINS: dict[str, str] = {
    "math": "rewards.math:MathReward",
    "length": "rewards.length:LengthPenalty",
    "format": "rewards.format:FormatReward",
    "code": "rewards.code:CodeReward",
    "repeat": "rewards.repeat:RepeatPenalty",
    "reasoning_gym": "rewards.reasoning_gym:ReasoningGymReward",
}


@dataclass(frozen=True)
class LoadedReward:
    """A reward ready to call: its metric name, the callable, and what it declares about itself."""

    name: str
    fn: Callable[..., Any]
    kind: RewardKind
    score_range: tuple[float, float]
    gate: bool
    preload: tuple[str, ...]


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise LookupError(f"'{path}' is not of the form module:attr")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise LookupError(f"cannot import module '{module_name}' ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"module '{module_name}' has no attribute '{attr}'") from None
    return obj


def installed_entry_points() -> dict[str, Any]:
    """The entry points of group `thinkrl.rewards` visible to this interpreter, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def find_reward(name: str) -> tuple[str, Any]:
    """(metric name, class or function) for a reward name; LookupError saying what exists if unknown."""
    if name in BUILTINS:
        return name, _import_path(BUILTINS[name])
    if ":" in name:
        return name.rsplit(":", 1)[1].rsplit(".", 1)[-1], _import_path(name)
    installed = installed_entry_points()
    if name in installed:
        try:
            return name, installed[name].load()
        except Exception as e:
            raise LookupError(f"entry point '{name}' ({installed[name].value}) fails to load: "
                              f"{type(e).__name__}: {e}") from e
    plugins = f"; installed plugins: {', '.join(sorted(installed))}" if installed else ""
    raise LookupError(f"unknown reward '{name}' (built-ins: {', '.join(BUILTINS)}{plugins}; "
                      f"or a module:attr path)")


def build_reward(name: str, options: Mapping[str, Any] | None = None) -> LoadedReward:
    """Find `name`, apply `options`, check the result is a picklable reward; errors say what is wrong."""
    metric_name, obj = find_reward(name)
    options = dict(options or {})
    if inspect.isclass(obj):
        try:
            fn = obj(**options)
        except TypeError as e:
            raise ValueError(f"options {options} do not fit {obj.__name__}: {e}") from e
        except Exception as e:  # a plugin's own constructor checks
            raise ValueError(f"{obj.__name__}({options}) failed: {type(e).__name__}: {e}") from e
        if not callable(fn):
            raise TypeError(f"{obj.__name__} instances are not callable (define __call__)")
    elif callable(obj):
        if options:
            try:
                inspect.signature(obj).bind(None, **options)
            except TypeError as e:
                raise ValueError(f"options {options} do not fit {getattr(obj, '__name__', obj)}: {e}") from e
            fn = functools.partial(obj, **options)
        else:
            fn = obj
    else:
        raise TypeError(f"'{name}' is a {type(obj).__name__}, not a reward function or class")
    kind = getattr(fn, "reward_kind", getattr(obj, "reward_kind", "sample"))
    if kind not in ("sample", "group"):
        raise ValueError(f"reward_kind must be 'sample' or 'group', got {kind!r}")
    low, high = getattr(fn, "score_range", getattr(obj, "score_range", DEFAULT_SCORE_RANGE))
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise TypeError(f"the reward must be picklable to run in worker processes ({type(e).__name__}: {e}); "
                        "define it at module level and keep its state plain data") from e
    preload = tuple(getattr(fn, "preload", getattr(obj, "preload", ())))
    module = getattr(obj, "__module__", None)
    return LoadedReward(metric_name, fn, kind, (float(low), float(high)), bool(getattr(fn, "gate", False)),
                        preload + ((module,) if module else ()))
