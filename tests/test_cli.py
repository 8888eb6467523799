"""The `tvtool` command table: every entry is the command of its name, and importing the CLI imports none
of them (a command's module loads when it runs or `--help` lists it)."""

from __future__ import annotations

import subprocess
import sys

import click

from helpers import cli
from tvtool.cli import COMMANDS, main


def test_every_command_in_the_table_is_a_click_command_of_that_name():
    for name in COMMANDS:
        assert isinstance(main.commands[name], click.Command) and main.commands[name].name == name
    assert main.get_command(None, "no-such-command") is None
    r = cli("--help")
    listed = r.stdout.split("Commands:")[1].split()
    assert r.exit_code == 0 and [w for w in listed if w in COMMANDS] == sorted(COMMANDS)


def test_importing_the_cli_imports_no_command_module():
    code = ("import sys, tvtool.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('tvtool.cli.') or m.startswith('tvtool.sweep')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
