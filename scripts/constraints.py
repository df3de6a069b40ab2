"""The tested package set of the CPU install: write it from a venv, or check a venv against it.

    python scripts/constraints.py check constraints/cpu.txt    (what `make test` runs first)
    python scripts/constraints.py write constraints/cpu.txt    (`make constraints`: update it on purpose)

The Makefile passes the file to every `pip install` as a constraints file (`-c`), so a fresh machine
gets the versions the suite passed with, not whatever PyPI serves that day; pyproject.toml keeps ranges
for people who install thinkrl as a library. `check` fails, naming each package, when the environment
it runs in has drifted: a version that differs from the file, or a package the file does not list
(thinkrl itself and the listed exceptions aside). Run it with the venv's Python.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# Not part of the tested set: the project itself (editable), and packages that are never imported.
UNPINNED = {"thinkrl"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution in this interpreter's environment."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in UNPINNED:
            # local labels (torch's "+cpu") say which build, not which release; pip's `==` ignores them too
            out[canonical(name)] = dist.version.split("+", 1)[0]
    return out


def read(path: Path) -> dict[str, str]:
    """{canonical name: version} of a constraints file of `name==version` lines."""
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per package whose installed version is not the pinned one, or that is not pinned."""
    lines = []
    for name, version in sorted(have.items()):
        if name not in pins:
            lines.append(f"{name}=={version} is installed but not in the tested set")
        elif pins[name] != version:
            lines.append(f"{name}=={version} is installed, the tested set has {name}=={pins[name]}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "write"):
        print(__doc__, file=sys.stderr)
        return 2
    command, path = argv[0], Path(argv[1])
    if command == "write":
        header = ("# The tested CPU install (Linux x86_64, Python 3.11): `make` installs these, `make bench` adds its peers (TRL).\n"
                  "# Regenerate on purpose with `make constraints` after changing what is installed.\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(installed().items())))
        print(f"wrote {len(installed())} pins to {path}")
        return 0
    problems = drift(read(path), installed())
    if problems:
        print(f"the installed packages drifted from {path} ({len(problems)}):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("reinstall (`rm -rf .venv && make test`), or if the change is intended, `make constraints` "
              "and commit the file", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
