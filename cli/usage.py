"""How the command line reports a problem: raise a ClusterConnectError; main() prints it as one line
on stderr and exits with its exit code."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from clusterconnect.errors import ClusterConnectError


class CommandFailed(ClusterConnectError):
    """The command could not do what was asked (exit code 1); the message says why."""


def fail(message: str) -> NoReturn:
    raise CommandFailed(message)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror}")
