"""argparse with environment defaults: every flag --foo-bar may come from CLUSTERCONNECT_FOO_BAR; flags win."""

from __future__ import annotations

import argparse
import os
from typing import Any

from clusterconnect import __version__


def env_name(flag: str) -> str:
    return "CLUSTERCONNECT_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse._ActionsContainer, flag: str, *aliases: str, **kwargs: Any) -> None:
    """Add ``flag`` (to a parser or a group; ``aliases`` e.g. ``-o``) whose default comes from its environment
    variable when set."""
    env = env_name(flag)
    built_in = kwargs.get("default")
    # --help names the built-in default, never the environment's value (that may be a secret, e.g. a token).
    shown = built_in is not None and built_in is not False and built_in != "" and built_in != []
    if shown and "default" not in kwargs.get("help", ""):
        kwargs["help"] = f"{kwargs.get('help', '')} (default: {built_in})".strip()
    if env in os.environ:
        value = os.environ[env]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = value.lower() in ("1", "true", "yes", "on")
        elif kwargs.get("action") == "append":  # comma-separated; flags given replace the list
            convert = kwargs.get("type", str)
            kwargs["default"] = [convert(item) for item in value.split(",") if item]
            kwargs["action"] = _AppendReplacingDefault
        else:
            kwargs["default"] = value
            kwargs.pop("required", None)
        if isinstance(parser, argparse._MutuallyExclusiveGroup):
            parser.required = False  # one of the group came from the environment
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
    parser.add_argument(*aliases, flag, **kwargs)


class _AppendReplacingDefault(argparse._AppendAction):
    """``append`` whose first flag replaces the default list (from the environment) instead of extending it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = namespace.__dict__.setdefault("_flags_given", set())
        if self.dest not in seen:
            seen.add(self.dest)
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
