"""Every flag has its environment variable (common/cliargs.py): repeatable flags and mutually exclusive
required groups too; flags given on the command line win."""

from __future__ import annotations

import argparse

import pytest

from clusterconnect import cliargs
from clusterconnect.cli import main as cli_main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cliargs.add_flag(parser, "--group", action="append", default=[])
    how = parser.add_mutually_exclusive_group(required=True)
    cliargs.add_flag(how, "--code")
    cliargs.add_flag(how, "--issuer")
    cliargs.add_flag(parser, "--output", "-o", choices=("table", "json"), default="table")
    return parser


def test_a_repeatable_flag_from_the_environment_is_a_comma_list_and_flags_replace_it(monkeypatch):
    monkeypatch.setenv("CLUSTERCONNECT_GROUP", "dev,ops")
    monkeypatch.setenv("CLUSTERCONNECT_CODE", "x")
    assert _parser().parse_args([]).group == ["dev", "ops"]
    assert _parser().parse_args(["--group", "a", "--group", "b"]).group == ["a", "b"]


def test_a_required_choice_may_come_from_the_environment(monkeypatch):
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    monkeypatch.setenv("CLUSTERCONNECT_ISSUER", "https://login.example.com")
    assert _parser().parse_args([]).issuer == "https://login.example.com"
    monkeypatch.setenv("CLUSTERCONNECT_OUTPUT", "json")
    assert _parser().parse_args([]).output == "json"
    assert _parser().parse_args(["-o", "table"]).output == "table"


def _flags(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _flags(sub)
        elif action.option_strings and action.dest not in ("help", "version"):
            found.append((parser.prog, action))
    return found


def test_every_flag_of_the_cli_names_its_environment_variable():
    missing = [f"{prog} {action.option_strings[-1]}" for prog, action in _flags(cli_main.build_parser())
               if "[env CLUSTERCONNECT_" not in (action.help or "")]
    assert not missing, missing
