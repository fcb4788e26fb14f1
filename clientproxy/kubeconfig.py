"""Write or merge the kubeconfig context that points kubectl at the client proxy."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import yaml

from clusterconnect.pki import write_private


def default_path() -> Path:
    """The file kubectl would write to: the first entry of KUBECONFIG, else ~/.kube/config."""
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    return Path(first) if first else Path.home() / ".kube" / "config"


def exec_credential(command: str, args: list[str]) -> dict[str, Any]:
    """A kubeconfig user that runs ``command args`` (``clusterconnect token ...``) for each fresh token."""
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": command, "args": args,
                     "interactiveMode": "Never", "provideClusterInfo": False}}


def build_entries(
    context: str, server: str, ca_pem: bytes, token: str | None, token_file: Path | None,
    exec_user: dict[str, Any] | None = None,
) -> dict[str, Any]:
    user: dict[str, Any] = {}
    if exec_user is not None:
        user = exec_user
    elif token_file is not None:
        user["tokenFile"] = str(token_file.resolve())
    elif token is not None:
        user["token"] = token
    user_name = f"clusterconnect-{context}"
    return {
        "cluster": {
            "name": context,
            "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()},
        },
        "user": {"name": user_name, "user": user},
        "context": {"name": context, "context": {"cluster": context, "user": user_name}},
    }


def merge(existing: dict[str, Any] | None, entries: dict[str, Any]) -> dict[str, Any]:
    config = dict(existing or {})
    config.setdefault("apiVersion", "v1")
    config.setdefault("kind", "Config")
    config.setdefault("preferences", {})
    for key, entry in (("clusters", entries["cluster"]), ("users", entries["user"]), ("contexts", entries["context"])):
        items = [item for item in (config.get(key) or []) if item.get("name") != entry["name"]]
        items.append(entry)
        config[key] = items
    config["current-context"] = entries["context"]["name"]
    return config


def render(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write(path: Path, entries: dict[str, Any]) -> None:
    existing = None
    if path.exists():
        try:
            existing = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if existing is not None and not isinstance(existing, dict):
            raise ValueError(f"{path} is not a kubeconfig")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, render(merge(existing, entries)).encode())
