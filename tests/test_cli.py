"""The `thinkrl` command dispatches to the module CLIs and says what exists."""

import subprocess
import sys


def test_help_lists_every_command_and_unknown_ones_fail():
    from thinkrl.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "thinkrl.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name, (module, _) in COMMANDS.items():
        assert name in out.stdout and module in out.stdout
    bad = subprocess.run([sys.executable, "-m", "thinkrl.cli", "trian"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


def test_subcommand_reaches_its_module():
    out = subprocess.run([sys.executable, "-m", "thinkrl.cli", "score", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--reward" in out.stdout
