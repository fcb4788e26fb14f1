"""Shared fixtures: the devcluster (tests/devcluster/fixture.py) and the whole clusterconnect chain; and,
once the session ends, the check of every service log it produced (the plugin log_audit.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

pytest_plugins = ["devcluster.fixture", "oidc_provider", "log_audit", "pytester"]

from chain import Chain, endpoint_only  # noqa: E402

from clusterconnect.relay.storage.kv import EtcdKV, SqliteKV  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "devcluster: needs the devcluster (real kube-apiserver)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "devcluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.devcluster)


@pytest.fixture
def lone_relay(tmp_path):
    """A relay process alone, no cluster behind it: for what it tells agents and logins (nothing is dialled)."""
    chain = Chain(tmp_path, Path("/nonexistent"))
    try:
        chain.start_relay()
        yield chain
    finally:
        chain.stop_all()


@pytest.fixture(scope="module")
def relay_chain(devcluster, cluster_endpoint_kubeconfig, tmp_path_factory):
    """relay + auth proxy + agent (token passthrough), real processes; no client proxy."""
    chain = Chain(tmp_path_factory.mktemp("relay-chain"), cluster_endpoint_kubeconfig)
    try:
        chain.start_relay()
        chain.add_cluster()
        chain.start_authproxy()
        chain.start_agent()
        yield chain
    finally:
        chain.stop_all()


@pytest.fixture(params=["sqlite", "etcd"])
def open_kv(request, tmp_path):
    """A function that opens a fresh, empty store of the parametrized kind inside the running loop: the
    store tests make the same assertions on SQLite and on the real etcd."""
    if request.param == "sqlite":
        return lambda: SqliteKV(tmp_path / "relay.db")
    cluster = request.getfixturevalue("etcd_cluster")
    return lambda: EtcdKV(cluster.client())


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory):
    """A real 3-member etcd (upstream etcd from the devcluster binary, TLS with client certificates)."""
    from etcd_cluster import DEVCLUSTER, EtcdCluster

    if not DEVCLUSTER.exists():
        pytest.skip("needs the devcluster binary (make devcluster)")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    with cluster.running():
        yield cluster


@pytest.fixture(scope="session")
def admin_sa_token(devcluster, tmp_path_factory) -> Path:
    """A token file for a ServiceAccount bound to cluster-admin: the caller in the tunnel tests."""
    devcluster.create_namespace("clusterconnect-tests")
    devcluster.create_service_account("clusterconnect-tests", "tunnel-admin", cluster_role="cluster-admin")
    path = tmp_path_factory.mktemp("tokens") / "tunnel-admin.token"
    path.write_text(devcluster.token("clusterconnect-tests", "tunnel-admin", duration="6h"))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def cluster_endpoint_kubeconfig(devcluster, tmp_path_factory) -> Path:
    """Server and CA of the devcluster, no credentials: all the auth proxy needs in token passthrough mode."""
    return endpoint_only(devcluster.kubeconfig, tmp_path_factory.mktemp("authproxy") / "kubeconfig")


@pytest.fixture(scope="session")
def chain(devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path_factory):
    """relay + auth proxy + agent + client proxy, real processes; yields (chain, kubeconfig path)."""
    state = tmp_path_factory.mktemp("chain")
    tunnel = Chain(state, cluster_endpoint_kubeconfig)
    kubeconfig = state / "kubeconfig"
    with tunnel.running(admin_sa_token, kubeconfig):
        yield tunnel, kubeconfig
