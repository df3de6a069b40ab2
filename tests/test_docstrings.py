"""Every `>>>` example in a docstring of the packages runs, as a doctest, in the normal test run.

The modules are found by reading the source files for `>>>` (nothing is imported at collection, so
modules that import vLLM cost nothing unless they carry examples), and each is imported only by its own
test. A module that gains an example is covered without touching this file.
"""

import doctest
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("rl", "rewards", "samplers", "sft", "rollout", "thinkrl")


def _modules_with_examples() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(REPO).with_suffix("").parts
                modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


MODULES = _modules_with_examples()


def test_the_examples_are_found():
    assert {"rl.loss", "rl.batching", "rewards.pool", "rewards.combine", "rewards.math", "samplers.prioritized",
            "samplers.curriculum", "samplers.uniform", "thinkrl.chunks"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0, f"{module}: '>>>' in the source but no docstring example found"
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} examples failed (output above)"
