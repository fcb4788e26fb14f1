"""`-o table|json|yaml` for every list and show command: a table for people (the default), or JSON / YAML
with stable field names for scripts (no markup, unknown values null, times as Unix seconds)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from clusterconnect import cliargs

FORMATS = ("table", "json", "yaml")

Record = dict[str, Any]


def add_flag(parser: argparse.ArgumentParser) -> None:
    cliargs.add_flag(parser, "--output", "-o", choices=FORMATS, default="table",
                     help="table for people; json or yaml for scripts")


def machine_readable(args: argparse.Namespace) -> bool:
    return getattr(args, "output", "table") != "table"


def dump(args: argparse.Namespace, value: Any) -> None:
    """``value`` (a record or a list of records) as JSON or YAML on stdout."""
    if args.output == "json":
        print(json.dumps(value, indent=2))
    else:
        print(yaml.safe_dump(value, sort_keys=False), end="")


def emit(args: argparse.Namespace, value: Record | list[Record],
         columns: Sequence[tuple[str, Callable[[Record], str]]], width: int = 120) -> None:
    """A list of records (or one, for `show`) as a table with ``columns`` (header, cell of a record), or dumped."""
    if machine_readable(args):
        dump(args, value)
        return
    table = Table(*(header for header, _ in columns), box=None, header_style="bold")
    for record in value if isinstance(value, list) else [value]:
        table.add_row(*(cell(record) for _, cell in columns))
    Console(width=width).print(table)


def or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
