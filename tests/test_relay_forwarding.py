"""Relay replicas on etcd (issue #12, routing, failover and drain): 3 relays on a 3-member etcd with TLS,
HAProxy in TCP mode in front of their user, agent and issuer ports, a real agent and auth proxy (OIDC
mode, trusting the relays' built-in issuer) on the devcluster, kubectl through client proxies.

- A Dial at a replica without the agent is forwarded to the one that holds it (the stats show it):
  get, watch, exec and port-forward work so, and the identity the entry replica verified binds the
  connection at the auth proxy (another user's token on it is refused).
- kill -9 of the replica holding the agent: kubectl works again within 10 s; its routes go within the
  lease TTL.
- SIGTERM of the replica holding the agent: a connection in flight finishes, new ones keep opening,
  the agent moves before it leaves (make before break), and the replica exits once drained.

The tests run in this order and share the fleet; each leaves 3 replicas running.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from chain import Chain, Process, free_port, wait_until
from identities import (
    POD_READER,
    authproxy_kubeconfig,
    builtin_issuer,
    grant_role,
    login_with_code,
    write_authentication_config,
)
from kube import LineReader, echo_pod, echo_roundtrip, kubectl, kubectl_popen, port_forward, shell_pod, stop
from relay_replicas import Replica, ReplicaSet
from test_connection_identity import Connection, audit_events

from clusterconnect import credentials as tokens
from clusterconnect import metadata as md
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.relay.routing.routes import ROUTES
from clusterconnect.v1 import tunnel_pb2_grpc

CLUSTER = "ha"
NS = "replicas"
PROXY_NS = "clusterconnect-replicas"
LEASE_TTL = 10
GRACE = 10


@dataclass
class Fleet:
    chain: Chain
    replicas: ReplicaSet
    kubeconfig: Path  # kubectl -> client proxy -> HAProxy -> a replica
    token: Path  # the ServiceAccount token kubectl uses (cluster-admin; passed through)
    users: dict[str, Path]
    devcluster: object


@pytest.fixture(scope="module")
def fleet(devcluster, etcd_cluster, admin_sa_token, tmp_path_factory):
    state = tmp_path_factory.mktemp("replicas")
    devcluster.create_namespace(NS)
    grant_role(devcluster, NS, "pod-reader", POD_READER, "replicas-pod-reader", users=["alice"])
    proxy_kubeconfig, _ = authproxy_kubeconfig(devcluster, PROXY_NS, state / "aadproxy.kubeconfig")
    config = state / "authentication.yaml"
    chain = Chain(state, proxy_kubeconfig, cluster=CLUSTER,
                  authproxy_args=["--authentication-config", str(config), "--cluster", CLUSTER])
    replicas = ReplicaSet(chain, etcd_cluster, relay_args=[
        "--lease-ttl-seconds", str(LEASE_TTL), "--shutdown-grace-seconds", str(GRACE), "--drain-seconds", "1"])
    try:
        replicas.start()
        chain.add_cluster()
        write_authentication_config(config, builtin_issuer(chain))
        chain.start_authproxy()
        chain.start_agent()
        users = {}
        for user in ("alice", "bob"):
            login_with_code(chain, user, [], state / user)
            users[user] = state / user
        kubeconfig = state / "kubeconfig"
        chain.start_proxy(admin_sa_token, kubeconfig)
        shell_pod(devcluster.kubeconfig, "shell", NS)
        yield Fleet(chain, replicas, kubeconfig, admin_sa_token, users, devcluster)
    finally:
        chain.stop_all()


def proxy_at(fleet: Fleet, replica: Replica, name: str) -> tuple[Process, Path]:
    """A client proxy whose relay is ``replica`` itself (not the balancer)."""
    kubeconfig = fleet.chain.state_dir / f"kubeconfig-{name}"
    process, _ = fleet.replicas.start_proxy_at(replica, fleet.token, kubeconfig, name)
    return process, kubeconfig


def elsewhere(fleet: Fleet, holder: Replica) -> Replica:
    return next(r for r in fleet.replicas.replicas if r is not holder)


def stats(fleet: Fleet, replica: Replica) -> dict:
    return fleet.replicas.process(replica).stats()


def routes_in_etcd(fleet: Fleet) -> list[str]:
    """routes/<cluster>/<replica> keys of our cluster, read from etcd itself."""
    async def read() -> list[str]:
        async with fleet.replicas.etcd.client() as etcd:
            values, _ = await etcd.get_prefix(ROUTES + CLUSTER.encode() + b"/")
            return [kv.key[len(ROUTES):].decode() for kv in values]

    return asyncio.run(read())


def kubectl_works(kubeconfig: Path) -> bool:
    return kubectl(kubeconfig, "get", "--raw", "/version", check=False, timeout=20).returncode == 0


# ---- forwarding ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forwarded(fleet):
    """A client proxy at a replica that does not hold the agent; yields (kubeconfig, entry, owner)."""
    owner = fleet.replicas.holder()
    entry = elsewhere(fleet, owner)
    process, kubeconfig = proxy_at(fleet, entry, "proxy-forwarded")
    try:
        yield kubeconfig, entry, owner
    finally:
        process.stop()


def test_kubectl_at_a_replica_without_the_agent_is_forwarded_to_the_one_holding_it(fleet, forwarded):
    kubeconfig, entry, owner = forwarded
    before_entry, before_owner = stats(fleet, entry), stats(fleet, owner)
    assert before_entry["agents"] == 0 and before_owner["agents"] == 1
    pods = kubectl(kubeconfig, "get", "pods", "-n", NS, "-o", "name").stdout
    assert "pod/shell" in pods
    after_entry, after_owner = stats(fleet, entry), stats(fleet, owner)
    assert after_entry["dials_forwarded"] > before_entry["dials_forwarded"], after_entry
    assert after_owner["dials_from_peers"] > before_owner["dials_from_peers"], after_owner
    assert after_entry["dials_local"] == before_entry["dials_local"]


def test_watch_exec_and_port_forward_work_forwarded(fleet, forwarded):
    kubeconfig, entry, _ = forwarded
    forwarded_before = stats(fleet, entry)["dials_forwarded"]
    # watch: an object created by another client shows up on the forwarded watch
    watch = kubectl_popen(kubeconfig, "get", "configmaps", "-n", NS, "-w", "-o", "name",
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = LineReader(watch.stdout)
        lines.wait_line(r"kube-root-ca\.crt", 30)
        fleet.devcluster.kubectl("create", "configmap", "seen-forwarded", "-n", NS)
        lines.wait_line(r"^configmap/seen-forwarded$", 5)
    finally:
        stop(watch)
        fleet.devcluster.kubectl("delete", "configmap", "seen-forwarded", "-n", NS, "--ignore-not-found")
    # exec, both protocols: stdin through, exit code back
    for websockets in ("true", "false"):
        result = kubectl(kubeconfig, "exec", "-i", "-n", NS, "shell", "--", "sh", "-c", "cat; exit 7",
                         input="across replicas\n", check=False, env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets})
        assert (result.stdout, result.returncode) == ("across replicas\n", 7), result.stderr
    # port-forward: 8 MiB each way, intact
    port = free_port()
    echo_pod(fleet.devcluster.kubeconfig, "echo-forwarded", NS, port)
    process, local = port_forward(kubeconfig, NS, "echo-forwarded", port, websockets=True)
    try:
        sent, received, _ = echo_roundtrip(local, 8 * 1024 * 1024)
        assert sent == received
    finally:
        stop(process)
        fleet.devcluster.kubectl("delete", "pod", "echo-forwarded", "-n", NS, "--wait=false", "--ignore-not-found")
    assert stats(fleet, entry)["dials_forwarded"] >= forwarded_before + 4


def fresh_token(fleet: Fleet, user: str) -> str:
    state = fleet.users[user]
    token, _ = tokens.refresh(tokens.load(state, tokens.list_logins(state)[0]))
    return token


def test_the_identity_verified_at_the_entry_replica_binds_the_forwarded_connection(fleet, forwarded):
    _, entry, owner = forwarded
    alice, bob = fresh_token(fleet, "alice"), fresh_token(fleet, "bob")
    as_bob, canary = f"bob-{secrets.token_hex(4)}", f"canary-{secrets.token_hex(4)}"
    before = stats(fleet, owner)["dials_from_peers"]

    async def main() -> None:
        credentials = grpc.ssl_channel_credentials(fleet.chain.relay_ca.read_bytes())
        async with grpc.aio.secure_channel(grpc_target(entry.url), credentials, options=CHANNEL_OPTIONS) as channel:
            stub = tunnel_pb2_grpc.ClientTunnelStub(channel)

            def dial(token: str) -> Connection:
                return Connection(stub.Dial(metadata=((md.CLUSTER, CLUSTER), bearer(token))))

            connection = dial(alice)
            assert await connection.opened()
            assert await connection.get(alice, f"/api/v1/namespaces/{NS}/pods/none") == 404
            # bob's token on the connection alice opened: refused by the auth proxy, never at the apiserver
            assert await connection.get(bob, f"/api/v1/namespaces/{NS}/pods/{as_bob}") == 403
            connection = dial(alice)
            assert await connection.get(alice, f"/api/v1/namespaces/{NS}/pods/{canary}") == 404
            connection.call.cancel()

    asyncio.run(main())
    assert stats(fleet, owner)["dials_from_peers"] >= before + 2  # both went through the owner

    class Holder:
        devcluster = fleet.devcluster

    wait_until(lambda: audit_events(Holder, canary), 10, "the canary's audit event")
    assert audit_events(Holder, as_bob) == []
    assert audit_events(Holder, canary)[-1]["impersonatedUser"]["username"] == "alice"


# ---- failover ----------------------------------------------------------------------------------------


def test_kill_9_of_the_agents_replica_kubectl_works_again_within_10s_and_its_routes_go(fleet):
    replicas = fleet.replicas
    holder = replicas.holder()
    assert kubectl_works(fleet.kubeconfig)
    assert f"{CLUSTER}/{holder.name}" in routes_in_etcd(fleet)
    killed = time.monotonic()
    replicas.kill(holder)
    wait_until(lambda: kubectl_works(fleet.kubeconfig), 10, "kubectl to work again after kill -9", interval=0.2)
    recovered = time.monotonic() - killed
    print(f"kubectl worked again {recovered:.2f}s after kill -9 of the agent's replica")
    assert recovered < 10
    left = LEASE_TTL + 1 - (time.monotonic() - killed)
    wait_until(lambda: f"{CLUSTER}/{holder.name}" not in routes_in_etcd(fleet), left,
               "the dead replica's route to go with its lease", interval=0.2)
    assert any(key.startswith(f"{CLUSTER}/") for key in routes_in_etcd(fleet))  # the new holder's
    replicas.start_replica(holder)  # back to 3 for the next test


# ---- drain -------------------------------------------------------------------------------------------


def test_sigterm_of_the_agents_replica_drains_it_without_failing_a_connection(fleet):
    replicas = fleet.replicas
    holder = replicas.holder()
    # In flight: an exec that answers after the drain began.
    in_flight = kubectl_popen(fleet.kubeconfig, "exec", "-n", NS, "shell", "--", "sh", "-c", "sleep 4; echo finished",
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    failures: list[str] = []
    opened = [0]
    done = threading.Event()

    def keep_opening() -> None:  # new connections all along, each a new Dial
        while not done.is_set():
            result = kubectl(fleet.kubeconfig, "get", "--raw", "/version", check=False, timeout=20)
            opened[0] += 1
            if result.returncode != 0:
                failures.append(result.stderr.strip())

    opener = threading.Thread(target=keep_opening)
    opener.start()
    try:
        wait_until(lambda: opened[0] >= 3, 20, "kubectl to run through the fleet")
        replicas.terminate(holder)
        out, err = in_flight.communicate(timeout=30)
        assert in_flight.returncode == 0 and out.decode().strip() == "finished", err.decode()
        assert replicas.wait_exit(holder, GRACE + 10) == 0
        count = opened[0]
        wait_until(lambda: opened[0] >= count + 3, 20, "kubectl to go on after the replica left")
    finally:
        done.set()
        opener.join(30)
        stop(in_flight)
    assert failures == [], failures
    log = replicas.process(holder).log.read_text()
    events = [json.loads(line).get("event") for line in log.splitlines() if line.startswith("{")]
    assert "draining" in events and "drained" in events, events[-20:]
    agent_log = fleet.chain.processes["agent"].log.read_text()
    assert "left the draining relay; its open connections go on" in agent_log
    replicas.start_replica(holder)
