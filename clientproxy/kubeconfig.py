"""Write or merge the kubeconfig context that points kubectl at the client proxy (or a gateway), and read
the user of an existing kubeconfig that the proxy is asked to wrap (``proxy --kubeconfig-user NAME``).

The context is named after the relay and the cluster unless the user names it, so that two relays' clusters
of the same name do not collide. A KUBECONFIG list is handled by kubectl's rules, and an entry that
clusterconnect did not write (no ``clusterconnect.io/created-by`` extension) is never overwritten.

The kubeconfig carries the proxy's client certificate (clientproxy/local_tls.py), so it is written
with mode 600 whatever the umask."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


# The relay's usual ports: left out of a context's name, which then reads like kubectl's own (host-cluster).
USUAL_RELAY_PORTS = (443, 8443)


def context_name(relay: str, cluster: str) -> str:
    """The default name of the proxy's context: ``HOST-CLUSTER``, ``HOST:PORT-CLUSTER`` for an unusual port
    (as Teleport's ``tsh kube login`` names its contexts after the proxy and the cluster)."""
    parsed = urlparse(relay if "://" in relay else f"https://{relay}")
    host = parsed.hostname or relay
    try:
        port = parsed.port
    except ValueError:
        port = None
    return f"{host}-{cluster}" if port is None or port in USUAL_RELAY_PORTS else f"{host}:{port}-{cluster}"


def files() -> list[Path]:
    """The kubeconfig files kubectl reads when it has no --kubeconfig: the KUBECONFIG list (empty entries
    and repeats dropped, as kubectl does), else ~/.kube/config."""
    listed = list(dict.fromkeys(Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p))
    return listed or [Path.home() / ".kube" / "config"]


def default_file(paths: list[Path]) -> Path:
    """Where kubectl creates a new entry: the first file of the list that exists, else the last one."""
    return next((path for path in paths if path.exists()), paths[-1])


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


# Every entry clusterconnect writes carries this extension (kubectl keeps extensions when it edits a
# file): an entry of that name without it is someone else's, and is never overwritten.
OWNER_EXTENSION = {"name": "clusterconnect.io/created-by", "extension": {"tool": "clusterconnect"}}
_KINDS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))


def _owned(entry: dict[str, Any], kind: str) -> dict[str, Any]:
    body = dict(entry[kind])
    body["extensions"] = [OWNER_EXTENSION]
    return {**entry, kind: body}


def created_by_us(entry: dict[str, Any], kind: str) -> bool:
    body = entry.get(kind)
    return isinstance(body, dict) and OWNER_EXTENSION in (body.get("extensions") or [])


def _put(config: dict[str, Any], key: str, kind: str, entry: dict[str, Any]) -> None:
    """Put ``entry`` (a cluster, user or context), marked as ours, in ``config``, in place of one of its name."""
    config.setdefault("apiVersion", "v1")
    config.setdefault("kind", "Config")
    config.setdefault("preferences", {})
    owned = _owned(entry, kind)
    previous = next((item for item in config.get(key) or [] if item.get("name") == owned["name"]), None)
    if kind == "context" and previous is not None and (previous.get("context") or {}).get("namespace"):
        owned["context"]["namespace"] = previous["context"]["namespace"]  # the user's choice, kept across restarts
    config[key] = [item for item in (config.get(key) or []) if item.get("name") != owned["name"]] + [owned]


def merge(existing: dict[str, Any] | None, entries: dict[str, Any]) -> dict[str, Any]:
    """``existing`` with ``entries`` (cluster, user and context) put in or replaced, and its context current."""
    config = dict(existing or {})
    for key, kind in _KINDS:
        _put(config, key, kind, entries[kind])
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


class NotOurs(KubeconfigInvalid):
    """A kubeconfig entry of the name clusterconnect would write exists and was not written by it."""


def write(paths: list[Path], entries: dict[str, Any], name_flag: str = "--context-name") -> Path:
    """Merge ``entries`` into the kubeconfig files ``paths`` by kubectl's rules for a KUBECONFIG list
    (kubectl config --help): an entry is modified in the first file that defines its name, a new one is
    created in the first file that exists (else the last of the list), and current-context is set in the
    first file that sets it (else that same default file). Refuses, writing nothing, when an entry of one
    of those names is not ours. Returns the file that holds the context."""
    configs = {path: read(path) for path in paths}
    default = default_file(paths)
    where: dict[str, Path] = {}
    for key, kind in _KINDS:
        name = entries[kind]["name"]
        for path, config in configs.items():
            found = next((item for item in (config or {}).get(key) or [] if isinstance(item, dict)
                          and item.get("name") == name), None)
            if found is not None:
                if not created_by_us(found, kind):
                    raise NotOurs(f"{path} already has a {kind} {name!r} that clusterconnect did not create:"
                                  f" name ours with {name_flag} NAME (or delete that one: kubectl config"
                                  f" delete-{kind} {name})")
                where[kind] = path
                break
        else:
            where[kind] = default
    current = next((path for path, config in configs.items() if (config or {}).get("current-context")), default)
    changed = {path: dict(configs[path] or {}) for path in {*where.values(), current}}
    for key, kind in _KINDS:
        _put(changed[where[kind]], key, kind, entries[kind])
    changed[current]["current-context"] = entries["context"]["name"]
    for path, config in changed.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, render(config).encode())
    return where["context"]


def find_user(paths: list[Path], name: str) -> tuple[Path, dict[str, Any]] | None:
    """The user ``name`` as kubectl sees it in ``paths`` (the first file that defines it wins)."""
    for path in paths:
        for item in (read(path) or {}).get("users") or []:
            if isinstance(item, dict) and item.get("name") == name:
                return path, item.get("user") or {}
    return None


def wrapped_credential(paths: list[Path], name: str) -> WrappedCredential:
    """The credential of user ``name`` in the kubeconfig files ``paths``, for the proxy to wrap: a bearer token
    or token file. Any other kind is refused with one line saying what to use instead."""
    found = find_user(paths, name)
    if found is None:
        raise UserNotWrappable(f"kubeconfig {os.pathsep.join(map(str, paths))} has no user {name!r}")
    path, user = found
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
