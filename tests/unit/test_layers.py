"""The layers that pyproject.toml's import-linter contracts describe, checked at run time: what a
process actually loads (lazy imports included), and the CLI's lazily assembled groups."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from services.cli.main import GROUPS, build_parser
from shared.cli import Parser

HEAVY = ("torch", "diffusers", "transformers")


def _loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_studio_gateway_imports_neither_torch_nor_diffusers():
    assert _loaded_after("import services.studio.service") == []


@pytest.mark.parametrize("argv", [["--help"], ["nope"], ["train"], ["batch", "--help"]])
def test_cli_help_and_usage_errors_import_no_model_code(argv):
    code = f"from services.cli.main import main\nassert main({argv!r}) in (0, 2)"
    assert _loaded_after(code) == []


def _help_lines(sub: argparse._SubParsersAction) -> dict[str, str]:
    return {action.dest: action.help for action in sub._choices_actions}


def test_the_static_group_table_matches_what_each_group_registers():
    for name, (module, help_line) in GROUPS.items():
        parser = Parser(prog="fashionchameleon")
        sub = parser.add_subparsers(dest="command", parser_class=Parser)
        importlib.import_module(module).register(sub)
        assert _help_lines(sub).get(name) == help_line, f"{name}: GROUPS says {help_line!r}, {module} registers another"


@pytest.mark.parametrize("command", [None, *GROUPS])
def test_every_command_is_listed_in_order_whichever_group_is_loaded(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(GROUPS)
    assert _help_lines(sub) == {name: help_line for name, (_, help_line) in GROUPS.items()}
    for name, choice in sub.choices.items():  # placeholders take nothing but --help
        loaded = command is not None and GROUPS[name][0] == GROUPS[command][0]
        assert (len(choice._actions) > 1) == loaded, name
