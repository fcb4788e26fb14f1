"""Write or merge the kubeconfig context that points kubectl at the client proxy, and read the user
of an existing kubeconfig that the proxy is asked to wrap (``proxy --kubeconfig-user NAME``).

The kubeconfig carries the proxy's client certificate (clientproxy/local_tls.py), so it is written
with mode 600 whatever the umask."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clusterconnect.errors import InvalidInput
from clusterconnect.pki import KeyPair, write_private


class KubeconfigInvalid(InvalidInput):
    """The kubeconfig file cannot be read or is not a kubeconfig."""


class UserNotWrappable(InvalidInput):
    """A kubeconfig user whose credential cannot cross the tunnel (or that the proxy cannot dial with)."""


# TLS from kubectl ends at the client proxy, so a client certificate never reaches the cluster: the
# auth proxy sees a request without credentials and kubectl shows "401 no Authorization header".
# (The proxy's own client certificate in the kubeconfig it writes only opens the local port.)
CLIENT_CERTIFICATE_ADVICE = (
    "authenticates with a client certificate, which cannot reach the cluster through the tunnel (TLS ends"
    " at the client proxy): use a bearer token instead (--token/--token-file, e.g. a ServiceAccount token),"
    " the exec plugin (clusterconnect login, then --login) or a built-in user of the relay (clusterconnect"
    " users add)"
)


@dataclass
class WrappedCredential:
    """What the proxy dials with for a wrapped kubeconfig user; kubectl keeps sending the same."""

    token: str | None = None
    token_file: Path | None = None


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
    context: str, server: str, ca_pem: bytes, client: KeyPair, token: str | None, token_file: Path | None,
    exec_user: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The cluster, user and context for the proxy. The user is always one of our own, also when the
    proxy wraps an existing user (``token``/``token_file`` are then that user's): it must carry the
    client certificate, and the wrapped user, used elsewhere too, stays as it was."""
    user: dict[str, Any] = {}
    if exec_user is not None:
        # No client certificate here: kubectl skips the exec plugin of a user that has one (and would
        # send no token); `clusterconnect token` hands the certificate over with each token instead.
        user = exec_user
    else:
        if token_file is not None:
            user["tokenFile"] = str(token_file.resolve())
        elif token is not None:
            user["token"] = token
        user["client-certificate-data"] = base64.b64encode(client.cert_pem).decode()
        user["client-key-data"] = base64.b64encode(client.key_pem).decode()
    user_name = f"clusterconnect-{context}"
    return {**_cluster_and_context(context, server, ca_pem, user_name), "user": {"name": user_name, "user": user}}


def _cluster_and_context(context: str, server: str, ca_pem: bytes, user_name: str) -> dict[str, Any]:
    return {
        "cluster": {
            "name": context,
            "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()},
        },
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


def read(path: Path) -> dict[str, Any] | None:
    """The kubeconfig at ``path``; None if there is none yet."""
    if not path.exists():
        return None
    try:
        existing = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise KubeconfigInvalid(f"{path} is not valid YAML: {exc}") from None
    except OSError as exc:
        raise KubeconfigInvalid(f"cannot read {path}: {exc.strerror}") from None
    if existing is not None and not isinstance(existing, dict):
        raise KubeconfigInvalid(f"{path} is not a kubeconfig")
    return existing


def write(path: Path, entries: dict[str, Any]) -> None:
    existing = read(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, render(merge(existing, entries)).encode())


def wrapped_credential(path: Path, name: str) -> WrappedCredential:
    """The credential of user ``name`` in the kubeconfig at ``path``, for the proxy to wrap: a bearer token
    or token file. Any other kind is refused with one line saying what to use instead."""
    config = read(path) or {}
    users = {item.get("name"): item.get("user") or {} for item in config.get("users") or [] if isinstance(item, dict)}
    if name not in users:
        raise UserNotWrappable(f"kubeconfig {path} has no user {name!r}")
    user = users[name]
    what = f"kubeconfig user {name!r}"
    if user.get("token"):
        return WrappedCredential(token=str(user["token"]))
    if user.get("tokenFile"):
        token_file = Path(user["tokenFile"]).expanduser()
        return WrappedCredential(token_file=token_file if token_file.is_absolute() else path.parent / token_file)
    if user.get("client-certificate-data") or user.get("client-certificate"):
        raise UserNotWrappable(f"{what} {CLIENT_CERTIFICATE_ADVICE}")
    if user.get("exec"):
        raise UserNotWrappable(f"{what} gets its token from an exec plugin: log in with it instead"
                               " (clusterconnect login --token-command 'COMMAND ARGS'), then use --login")
    raise UserNotWrappable(f"{what} has no bearer token (token or tokenFile) the proxy could send"
                           " through the tunnel")
