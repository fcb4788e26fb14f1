"""argparse with environment defaults: every flag --foo-bar may come from CLUSTERCONNECT_FOO_BAR; flags win."""

from __future__ import annotations

import argparse
import os
from typing import Any

from clusterconnect import __version__


def env_name(flag: str) -> str:
    return "CLUSTERCONNECT_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse._ActionsContainer, flag: str, **kwargs: Any) -> None:  # a parser or a group
    """Add ``flag`` whose default comes from its environment variable when set."""
    env = env_name(flag)
    built_in = kwargs.get("default")
    # --help names the built-in default, never the environment's value (that may be a secret, e.g. a token).
    if built_in is not None and built_in is not False and built_in != "" and "default" not in kwargs.get("help", ""):
        kwargs["help"] = f"{kwargs.get('help', '')} (default: {built_in})".strip()
    if env in os.environ:
        value = os.environ[env]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = value.lower() in ("1", "true", "yes", "on")
        else:
            kwargs["default"] = value
            kwargs.pop("required", None)
    kwargs["help"] = f"{kwargs.get('help', '')} [env {env}]".strip()
    parser.add_argument(flag, **kwargs)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
