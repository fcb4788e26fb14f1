"""Who the end-to-end tests are: shared set-up for OIDC callers (test_oidc_e2e, test_user_identity,
test_tunnel_e2e).

- the auth proxy's own ServiceAccount for OIDC mode, with exactly the ClusterRole of deploy/k8s/aadproxy.yaml;
- a relay, an auth proxy trusting its built-in issuer and an agent (builtin_issuer_chain);
- AuthenticationConfiguration files (auth proxy and relay) trusting the relay's built-in issuer or an
  external provider (Hydra, tests/oidc_provider.py);
- logins: at the relay's built-in issuer with a one-time code (`users add` + `login --code`), or
  `login --token-command` with a command that prints a token of an external provider;
- RBAC for a test user's groups.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

# re-exported (`X as X`): the tests import them from here
from authentication import builtin_issuer as builtin_issuer
from authentication import issuer
from authentication import write_authentication_config as write_authentication_config
from chain import Chain, script

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def authproxy_kubeconfig(devcluster, namespace: str, path: Path, duration: str = "6h") -> tuple[Path, str]:
    """The auth proxy's identity in OIDC mode: ServiceAccount ``aadproxy`` in ``namespace`` bound to the
    deployed ClusterRole (impersonate + create SubjectAccessReviews, nothing else). Returns a kubeconfig
    for it at ``path`` and its token (tests that scan logs for secrets need it)."""
    role = next(d for d in yaml.safe_load_all((DEPLOY / "aadproxy.yaml").read_text())
                if d and d["kind"] == "ClusterRole")
    devcluster.apply(role)
    devcluster.create_namespace(namespace)
    devcluster.create_service_account(namespace, "aadproxy", cluster_role=role["metadata"]["name"])
    token = devcluster.token(namespace, "aadproxy", duration=duration)
    return Path(devcluster.write_kubeconfig(path, token)), token


@contextmanager
def builtin_issuer_chain(devcluster, state: Path, proxy_namespace: str, authproxy_args: tuple[str, ...] = (),
                         agent_args: tuple[str, ...] = (), **chain_options: Any) -> Iterator[Chain]:
    """Real processes for the chain's cluster (dev): a relay, an auth proxy in OIDC mode (its identity in
    ``proxy_namespace``) trusting the relay's built-in issuer, and an agent; all stopped on exit.
    ``chain_options`` are further Chain fields (relay_args, log_level ...)."""
    proxy_kubeconfig, _ = authproxy_kubeconfig(devcluster, proxy_namespace, state / "aadproxy.kubeconfig")
    config = state / "authentication.yaml"
    chain = Chain(state, proxy_kubeconfig, **chain_options)
    chain.authproxy_args = ["--authentication-config", str(config), "--cluster", chain.cluster, *authproxy_args]
    try:
        chain.start_relay()
        chain.add_cluster()
        # the auth proxy trusts the relay's built-in issuer like any OIDC issuer (discovery over HTTPS)
        write_authentication_config(config, builtin_issuer(chain))  # needs the relay's CA and issuer port
        chain.start_authproxy()
        chain.start_agent(extra_args=agent_args)
        yield chain
    finally:
        chain.stop_all()


def hydra_issuer(hydra, audience: str | None = None, prefix: str = "oidc:", groups: bool = True) -> dict:
    """Hydra (tests/oidc_provider.py) as a trusted issuer; ``audience`` defaults to its client id (the
    audience of the id_tokens ``Hydra.login`` returns)."""
    return issuer(hydra.issuer, [audience or hydra.client_id], hydra.ca_pem, prefix, prefix if groups else None)


def login_with_code(chain: Chain, user: str, groups: list[str], state_dir: Path) -> str:
    """`clusterconnect users add USER --group ...` at the relay (admin), then `clusterconnect login --code`
    into ``state_dir``; returns the (now spent) login code."""
    added = chain.cli("users", "add", user, *[arg for group in groups for arg in ("--group", group)])
    code = added.stdout.splitlines()[1].strip()
    login = subprocess.run([script("clusterconnect"), "login", "--relay", chain.relay_url, "--relay-ca",
                            str(chain.relay_ca), "--code", "-", "--state-dir", str(state_dir)],
                           input=code + "\n", capture_output=True, text=True, timeout=30)
    assert login.returncode == 0, login.stderr
    return code


def login_with_token_command(token: str, state_dir: Path, name: str) -> Path:
    """`clusterconnect login --token-command CMD --name NAME`, CMD printing ``token`` (e.g. an id_token of
    an external provider). Returns the command's path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    token_file = state_dir / f"{name}.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    command = state_dir / f"print-{name}-token"
    command.write_text(f"#!/bin/sh\nexec cat {token_file}\n")
    command.chmod(0o700)
    login = subprocess.run([script("clusterconnect"), "login", "--token-command", str(command), "--name", name,
                            "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=30)
    assert login.returncode == 0, login.stderr
    return command


def grant_role(devcluster, namespace: str, role: str, rules: list[dict], binding: str,
               groups: list[str] = (), users: list[str] = ()) -> None:
    """Role ``role`` with ``rules`` in ``namespace``, bound (RoleBinding ``binding``) to groups and users."""
    devcluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": {"name": role, "namespace": namespace}, "rules": rules})
    devcluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": {"name": binding, "namespace": namespace},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                      "subjects": _subjects(groups, users)})


def grant_cluster_role(devcluster, role: str, rules: list[dict], groups: list[str] = (),
                       users: list[str] = ()) -> None:
    """ClusterRole ``role`` with ``rules``, bound by a ClusterRoleBinding of the same name."""
    devcluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                      "metadata": {"name": role}, "rules": rules})
    devcluster.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                      "metadata": {"name": role},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                      "subjects": _subjects(groups, users)})


def _subjects(groups, users) -> list[dict]:
    return [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g} for g in groups] + \
           [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": u} for u in users]


POD_READER = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
