"""Secrets the command line takes (login codes, client secrets) without putting them on the command line.

Another local user sees every process's argv (``ps``, /proc/PID/cmdline), and a one-time login code
seen there can be redeemed first. So a secret flag takes ``-`` (read from stdin: typed without echo
on a terminal, else the first line of a pipe), and its ``-file`` twin takes a path (or ``-``). A
literal value still works, for scripts written before, with a warning.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from clusterconnect.cli.usage import fail, read_file


def _from_stdin(what: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(f"{what}: ").strip()
    return sys.stdin.readline().strip()


def read_secret(value: str | None, path: str | None, what: str, flag: str) -> str | None:
    """The secret of ``flag VALUE`` or ``flag-file PATH``; None if neither was given."""
    if path is not None:
        secret = _from_stdin(what) if path == "-" else read_file(Path(path), f"{what} file").decode().strip()
        source = "stdin" if path == "-" else path
    elif value == "-":
        secret, source = _from_stdin(what), "stdin"
    elif value is not None:
        print(f"warning: a {what} on the command line is visible to other local users (ps); give {flag} -"
              f" (stdin) or {flag}-file PATH", file=sys.stderr)
        secret, source = value.strip(), flag
    else:
        return None
    if not secret:
        fail(f"no {what} in {source}")
    return secret
