"""kubectl through the whole tunnel: client proxy -> relay -> agent -> auth proxy -> kube-apiserver, and the
same with kubectl's kubeconfig alone: gateway -> relay -> ... (`clusterconnect kubeconfig`, no local process).

Real processes from the console scripts, the real kubectl, the devcluster. Every test runs once per
caller identity, each with a chain of its own (stopped before the next identity's starts), and in each
chain once per path (``client-proxy``, ``gateway``):

- ``serviceaccount``: a ServiceAccount token (cluster-admin) in the proxy's kubeconfig; the relay's
  access list is empty and the auth proxy passes the token through to the apiserver.
- ``builtin-oidc``: alice, a user of the relay's built-in issuer (`users add` + `login --code`); kubectl
  gets her token from the exec credential plugin (`clusterconnect token`); the relay admits her group
  on its access list; the auth proxy (OIDC mode) trusts the built-in issuer and impersonates her.
- ``external-oidc``: alice with an id_token of an external provider (Hydra, groups ["dev"]) through
  `login --token-command`; relay and auth proxy trust Hydra with the prefix "oidc:", the access list
  names group "oidc:dev".

alice may do in namespace NS what these tests do (a Role bound to "dev" and "oidc:dev") and get that
namespace, nothing more.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from chain import Chain, free_port
from identities import (
    authproxy_kubeconfig,
    builtin_issuer,
    grant_cluster_role,
    grant_role,
    hydra_issuer,
    login_with_code,
    login_with_token_command,
    write_authentication_config,
)
from kube import (
    LineReader,
    echo_pod,
    echo_roundtrip,
    exec_in_pty,
    kubectl,
    kubectl_popen,
    port_forward,
    run_pod,
    shell_pod,
    stop,
)

NS = "tunnel-e2e"
PROXY_NS = "clusterconnect-tunnel-e2e"  # the auth proxy's ServiceAccount in OIDC mode
MiB = 1024 * 1024

# What the tests do as alice, and nothing else.
ALICE_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/exec", "pods/portforward"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps"],
     "verbs": ["get", "list", "watch", "create", "delete", "patch", "update"]},
]


@dataclass(frozen=True)
class Identity:
    id: str
    username: str  # as the apiserver sees it
    group: str  # a group the apiserver sees it in (besides system:authenticated)
    port_forward_bytes: int  # each way


IDENTITIES = [
    Identity("serviceaccount", "system:serviceaccount:clusterconnect-tests:tunnel-admin",
             "system:serviceaccounts:clusterconnect-tests", 100 * MiB),
    Identity("builtin-oidc", "alice", "dev", 20 * MiB),
    Identity("external-oidc", "oidc:alice", "oidc:dev", 20 * MiB),
]


PATHS = ["client-proxy", "gateway"]


@pytest.fixture(scope="module", params=IDENTITIES, ids=[i.id for i in IDENTITIES])
def chains(request, devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """A chain of its own for one caller identity, with a client proxy and a gateway; yields the kubeconfig
    kubectl uses through each (path -> kubeconfig)."""
    identity: Identity = request.param
    devcluster.create_namespace(NS)
    state = tmp_path_factory.mktemp(f"tunnel-{identity.id}")
    kubeconfig = state / "kubeconfig"
    through_gateway = state / "gateway.kubeconfig"
    if identity.id == "serviceaccount":
        with Chain(state, cluster_endpoint_kubeconfig).running(admin_sa_token, kubeconfig) as chain:
            chain.start_gateway()
            chain.gateway_kubeconfig(through_gateway, token_file=admin_sa_token)
            yield {"client-proxy": kubeconfig, "gateway": through_gateway}
        return

    grant_role(devcluster, NS, "tunnel-e2e-user", ALICE_RULES, "tunnel-e2e-user", groups=["dev", "oidc:dev"])
    grant_cluster_role(devcluster, "tunnel-e2e-namespace-reader",
                       [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"], "resourceNames": [NS]}],
                       groups=["dev", "oidc:dev"])
    proxy_kubeconfig, _ = authproxy_kubeconfig(devcluster, PROXY_NS, state / "aadproxy.kubeconfig")
    config = state / "authentication.yaml"
    user_state = state / "alice"
    if identity.id == "builtin-oidc":
        chain = Chain(state, proxy_kubeconfig,
                      authproxy_args=["--authentication-config", str(config), "--cluster", "dev"])
    else:
        hydra = request.getfixturevalue("oidc_provider")
        write_authentication_config(config, hydra_issuer(hydra, prefix="oidc:"))
        chain = Chain(state, proxy_kubeconfig, relay_args=["--authentication-config", str(config)],
                      authproxy_args=["--authentication-config", str(config), "--cluster", "dev"])
    try:
        chain.start_relay()
        chain.add_cluster()
        if identity.id == "builtin-oidc":
            write_authentication_config(config, builtin_issuer(chain))  # needs the relay's CA and issuer port
            login_with_code(chain, "alice", ["dev"], user_state)
            login = None  # the relay's login
        else:
            login_with_token_command(hydra.login("alice", ["dev"]), user_state, "hydra")
            login = "hydra"
        chain.cli("clusters", "grant", chain.cluster, "--group", identity.group)
        chain.start_authproxy()
        chain.start_agent()
        chain.start_proxy(None, kubeconfig, login=login, state_dir=user_state)
        chain.start_gateway()
        chain.gateway_kubeconfig(through_gateway, login=login, state_dir=user_state)
        for path in (kubeconfig, through_gateway):
            user = yaml.safe_load(path.read_text())["users"][0]["user"]
            # only the plugin (and our mark): no client certificate, which would make kubectl skip the plugin
            assert set(user) == {"exec", "extensions"}, f"the kubeconfig should use the exec credential plugin: {user}"
        yield {"client-proxy": kubeconfig, "gateway": through_gateway}
    finally:
        chain.stop_all()


@pytest.fixture(params=PATHS)
def tunnel(request, chains) -> Path:
    """The kubeconfig of one path through this identity's chain."""
    return chains[request.param]


@pytest.fixture
def identity(request, chains) -> Identity:
    return request.node.callspec.params["chains"]


@pytest.fixture
def path(request, tunnel) -> str:
    return request.node.callspec.params["tunnel"]


def test_get_and_whoami_go_through_with_the_callers_token(tunnel, identity):
    assert "gitVersion" in kubectl(tunnel, "get", "--raw", "/version").stdout
    kubectl(tunnel, "get", "namespaces", NS)
    whoami = json.loads(kubectl(tunnel, "auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == identity.username
    assert identity.group in whoami["status"]["userInfo"]["groups"], whoami


def test_apply_get_delete(tunnel):
    manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "applied", "namespace": NS}, "data": {"k": "v" * 1000}})
    kubectl(tunnel, "apply", "-f", "-", input=manifest)
    assert json.loads(kubectl(tunnel, "get", "cm", "applied", "-n", NS, "-o", "json").stdout)["data"]["k"] == "v" * 1000
    kubectl(tunnel, "delete", "cm", "applied", "-n", NS)
    assert kubectl(tunnel, "get", "cm", "applied", "-n", NS, check=False).returncode != 0


def test_watch_sees_object_created_by_another_client_within_a_second(tunnel, devcluster):
    watch = kubectl_popen(tunnel, "get", "configmaps", "-n", NS, "-w", "-o", "name",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = LineReader(watch.stdout)
        lines.wait_line(r"kube-root-ca\.crt", 30)  # the initial list arrived: the watch is established
        created = time.monotonic()
        devcluster.kubectl("create", "configmap", "watched", "-n", NS)
        lines.wait_line(r"^configmap/watched$", 5)
        assert time.monotonic() - created < 1.0
    finally:
        stop(watch)
        devcluster.kubectl("delete", "configmap", "watched", "-n", NS, "--ignore-not-found")


def test_logs_follow_streams_lines_as_written(tunnel, devcluster):
    run_pod(devcluster.kubeconfig, "ticker", NS,
            ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"])
    logs = kubectl_popen(tunnel, "logs", "-f", "-n", NS, "ticker", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = LineReader(logs.stdout)
        first = int(lines.wait_line(r"^tick \d+", 30).split()[1])
        lines.wait_line(rf"^tick {first + 5}$", 10)
    finally:
        stop(logs)


@pytest.fixture(scope="module")
def shell(chains, devcluster):
    shell_pod(devcluster.kubeconfig, "shell", NS)
    return "shell"


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
def test_exec_passes_stdin_and_exit_code(tunnel, shell, websockets):
    result = kubectl(tunnel, "exec", "-i", "-n", NS, shell, "--", "sh", "-c", "cat; exit 7",
                     input="through the tunnel\n", check=False,
                     env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if websockets else "false"})
    assert result.stdout == "through the tunnel\n"
    assert result.returncode == 7, result.stderr


def test_exec_tty(tunnel, shell):
    screen = exec_in_pty(tunnel, NS, shell, "tty; exit 3")
    assert "/dev/pts/" in screen


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
def test_port_forward_each_way(tunnel, identity, path, devcluster, websockets):
    """100 MiB each way as the ServiceAccount, 20 MiB as alice."""
    port = free_port()
    name = f"echo-{'ws' if websockets else 'spdy'}-{identity.id}-{path}"
    echo_pod(devcluster.kubeconfig, name, NS, port)
    forward, local = port_forward(tunnel, NS, name, port, websockets)
    try:
        sent, received, seconds = echo_roundtrip(local, identity.port_forward_bytes)
        assert sent == received
        print(f"port-forward {'websocket' if websockets else 'spdy'} as {identity.id} through {path}: "
              f"{identity.port_forward_bytes // MiB} MiB each way in {seconds:.1f}s")
    finally:
        stop(forward)
        devcluster.kubectl("delete", "pod", name, "-n", NS, "--wait=false", "--ignore-not-found")
