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
import contextlib
import datetime
import json
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from blackhole import Link, links
from chain import Chain, Process, free_port, script, wait_until
from https_client import Endpoint
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
from replicas import empty_store
from test_connection_identity import Connection, audit_events

from clusterconnect import credentials as tokens
from clusterconnect import metadata as md
from clusterconnect.agent.session import HEALTHY_AFTER
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.relay.routing.routes import ROUTES
from clusterconnect.v1 import tunnel_pb2_grpc

CLUSTER = "ha"
NS = "replicas"
PROXY_NS = "clusterconnect-replicas"
LEASE_TTL = 10
KILL_TRIALS = 10
# Long enough for the 1 GiB port-forward of the rolling restart to finish inside a drain; a drain ends as
# soon as its replica is idle, so the other tests do not wait for it.
GRACE = 90


@dataclass
class Fleet:
    chain: Chain
    replicas: ReplicaSet
    kubeconfig: Path  # kubectl -> client proxy -> HAProxy -> a replica
    token: Path  # the ServiceAccount token kubectl uses (cluster-admin; passed through)
    users: dict[str, Path]
    devcluster: object
    etcd_links: dict[str, list[Link]]  # replica name -> its links to the etcd members, to cut it off


@pytest.fixture(scope="module")
def fleet(devcluster, etcd_cluster, admin_sa_token, tmp_path_factory):
    empty_store(etcd_cluster)  # the session's etcd: another module's replicas sealed theirs with another key
    state = tmp_path_factory.mktemp("replicas")
    devcluster.create_namespace(NS)
    grant_role(devcluster, NS, "pod-reader", POD_READER, "replicas-pod-reader", users=["alice"])
    proxy_kubeconfig, _ = authproxy_kubeconfig(devcluster, PROXY_NS, state / "aadproxy.kubeconfig")
    config = state / "authentication.yaml"
    chain = Chain(state, proxy_kubeconfig, cluster=CLUSTER,
                  authproxy_args=["--authentication-config", str(config), "--cluster", CLUSTER])
    replicas = ReplicaSet(chain, etcd_cluster, relay_args=[
        "--lease-ttl-seconds", str(LEASE_TTL), "--shutdown-grace-seconds", str(GRACE), "--drain-seconds", "1"])
    members = [("127.0.0.1", m.client_port) for m in etcd_cluster.members]
    with contextlib.ExitStack() as owned:
        etcd_links = {}
        for replica in replicas.replicas:  # each replica reaches etcd through links of its own
            etcd_links[replica.name] = owned.enter_context(links(members))
            replica.etcd_endpoints = ",".join(f"https://{link.address}" for link in etcd_links[replica.name])
        owned.callback(chain.stop_all)  # before the links close
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
        yield Fleet(chain, replicas, kubeconfig, admin_sa_token, users, devcluster, etcd_links)


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


def session_age(agent_log: Path) -> float:
    """Seconds since the agent's last session began ("connected to relay" in its log)."""
    stamps = [json.loads(line)["timestamp"] for line in agent_log.read_text().splitlines()
              if '"event": "connected to relay"' in line]
    began = datetime.datetime.fromisoformat(stamps[-1].replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - began).total_seconds()


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


def test_clusters_list_at_every_replica_names_the_one_holding_the_agent(fleet):
    holder = fleet.replicas.holder()
    chain = fleet.chain

    def listed(replica: Replica) -> tuple[str, str]:
        """(STATUS, REPLICA) of our cluster in `clusters list` asked at ``replica`` itself."""
        listing = subprocess.run(
            [script("clusterconnect"), "clusters", "list", "--relay", replica.url, "--relay-ca", str(chain.relay_ca),
             "--admin-credential", str(chain.admin_credential)], capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        header, *rows = listing.splitlines()
        assert header.split()[-1] == "REPLICA", listing
        row = next(row.split() for row in rows if row.split()[0] == CLUSTER)
        return row[1], row[-1]

    for replica in fleet.replicas.replicas:  # the route reaches the others through etcd's watch: soon, not at once
        wait_until(lambda: listed(replica) == ("Connected", holder.name), 10,  # noqa: B023 (called at once)
                   f"{replica.name} to list {CLUSTER} as held by {holder.name}")


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
    """10 trials: kill -9 of whichever replica holds the agent, kubectl through the balancer until it works,
    the killed replica started again. Every dead replica's route goes when its lease runs out.

    Each trial begins once the agent's session is HEALTHY_AFTER old: a session that ends sooner counts as a
    failure and the agent backs off further each time (its defence against a crash-looping relay), which
    a kill every second would measure instead of the re-home."""
    replicas = fleet.replicas
    recoveries: list[float] = []
    killed_at: dict[str, float] = {}
    agent_log = fleet.chain.processes["agent"].log
    for _ in range(KILL_TRIALS):
        wait_until(lambda: session_age(agent_log) >= HEALTHY_AFTER, HEALTHY_AFTER + 5,
                   "the agent's session to be healthy")
        holder = replicas.holder()
        assert kubectl_works(fleet.kubeconfig)
        wait_until(lambda: f"{CLUSTER}/{holder.name}" in routes_in_etcd(fleet), 10,  # noqa: B023 (called at once)
                   f"{holder.name}'s route")
        killed = time.monotonic()
        replicas.kill(holder)
        killed_at[holder.name] = killed
        wait_until(lambda: kubectl_works(fleet.kubeconfig), 10, "kubectl to work again after kill -9", interval=0.2)
        recoveries.append(time.monotonic() - killed)
        replicas.start_replica(holder)  # a new process, a new lease: its old routes are not its own
    recoveries.sort()
    print(f"kubectl worked again after kill -9 of the agent's replica, {KILL_TRIALS} trials: "
          f"p50 {recoveries[len(recoveries) // 2]:.2f}s, max {recoveries[-1]:.2f}s")
    assert recoveries[-1] < 10
    # The newest kill's route is the last to go: within the TTL of that kill (the older ones went before).
    newest = max(killed_at.values())
    current = replicas.holder().name

    def dead_routes() -> list[str]:
        return [key for key in routes_in_etcd(fleet) if key != f"{CLUSTER}/{current}"]

    wait_until(lambda: not dead_routes(), LEASE_TTL + 1 - (time.monotonic() - newest),
               "the killed replicas' routes to go with their leases", interval=0.2)


def version_answers(kubeconfig: Path) -> bool:
    """One bounded try of `kubectl get --raw /version`; a try that hangs (on a stopped replica not yet
    marked down: kubectl's --request-timeout does not bound its dial and TLS handshake) is "not yet"."""
    try:
        return kubectl(kubeconfig, "get", "--raw", "/version", "--request-timeout=3s", check=False,
                       timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_sigstop_of_the_agents_replica_kubectl_works_again_within_20s(fleet):
    """A silent hang, not a crash: the stopped replica's kernel still accepts TCP connections, so only
    a check that needs the process (the balancer's HTTP check of /healthz) and keepalive find it."""
    replicas = fleet.replicas
    holder = replicas.holder()
    assert kubectl_works(fleet.kubeconfig)
    process = replicas.process(holder)
    stopped = time.monotonic()
    process.popen.send_signal(signal.SIGSTOP)
    try:
        # Each try bounded well below the 20 s, so a kubectl hung on the stopped replica cannot hide a recovery.
        wait_until(lambda: version_answers(fleet.kubeconfig), 20, "kubectl to work again after SIGSTOP",
                   interval=0.2)
        recovered = time.monotonic() - stopped
        print(f"kubectl worked again {recovered:.2f}s after SIGSTOP of the agent's replica")
        assert recovered < 20
        left = LEASE_TTL + 2 - (time.monotonic() - stopped)
        wait_until(lambda: f"{CLUSTER}/{holder.name}" not in routes_in_etcd(fleet), left,
                   "the stopped replica's route to go with its lease", interval=0.2)
    finally:
        process.popen.send_signal(signal.SIGCONT)
    # Woken up, it finds its lease gone: it drains and stops rather than serve routes it no longer owns.
    assert replicas.wait_exit(holder, GRACE + 15) != 0
    assert "etcd lease lost; draining" in process.log.read_text()
    assert kubectl_works(fleet.kubeconfig)
    replicas.start_replica(holder)  # back to 3 for the next test


# ---- etcd failures ------------------------------------------------------------------------------------


def agent_sessions(fleet: Fleet) -> dict[str, int]:
    """replica name -> the agent sessions it holds (live replicas only)."""
    return {r.name: fleet.replicas.process(r).stats().get("agents", 0) for r in fleet.replicas.replicas
            if fleet.replicas.process(r).alive()}


def add_and_remove_a_cluster(fleet: Fleet, replica: Replica, name: str) -> subprocess.CompletedProcess:
    """An admin write at ``replica`` itself; the result of `clusters add` (the cluster removed again)."""
    chain = fleet.chain
    flags = ["--relay", replica.url, "--relay-ca", str(chain.relay_ca),
             "--admin-credential", str(chain.admin_credential)]
    added = subprocess.run([script("clusterconnect"), "clusters", "add", name, *flags],
                           capture_output=True, text=True, timeout=60)
    if added.returncode == 0:
        subprocess.run([script("clusterconnect"), "clusters", "remove", name, *flags],
                       capture_output=True, text=True, timeout=60, check=True)
    return added


def test_one_etcd_member_killed_changes_nothing_visible(fleet):
    holder = fleet.replicas.holder()
    routes = routes_in_etcd(fleet)
    etcd = fleet.replicas.etcd
    member = etcd.members[0]
    assert member.process is not None
    member.process.popen.kill()
    member.process.popen.wait()
    try:
        for replica in fleet.replicas.replicas:  # admin writes at every replica
            added = add_and_remove_a_cluster(fleet, replica, f"member-down-{replica.index}")
            assert added.returncode == 0, added.stderr
        assert kubectl_works(fleet.kubeconfig)
        assert agent_sessions(fleet) == {r.name: int(r is holder) for r in fleet.replicas.replicas}
        assert routes_in_etcd(fleet) == routes  # the same route: the agent never moved
    finally:
        etcd.start_member(member, state="existing")
        wait_until(lambda: etcd.healthy(member), 30, f"etcd member {member.name} back", member.process)


def test_a_replica_cut_off_from_etcd_keeps_its_connections_refuses_writes_and_its_agent_moves_within_30s(fleet):
    replicas = fleet.replicas
    holder = replicas.holder()
    assert kubectl_works(fleet.kubeconfig)
    # In flight through the holder (it holds the agent): answers after the lease is gone and the drain began.
    in_flight = kubectl_popen(fleet.kubeconfig, "exec", "-n", NS, "shell", "--", "sh", "-c",
                              f"sleep {LEASE_TTL + 4}; echo finished", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: stats(fleet, holder).get("open_connections", 0) >= 1, 20, "the exec to be open")
        cut = time.monotonic()
        for link in fleet.etcd_links[holder.name]:
            link.cut()
        refused = add_and_remove_a_cluster(fleet, holder, "cut-off")
        assert refused.returncode != 0
        message = refused.stderr.strip()
        assert "\n" not in message and message.startswith("error: ") and "etcd" in message, message
        wait_until(lambda: any(n != holder.name and count == 1 for n, count in agent_sessions(fleet).items()),
                   30 - (time.monotonic() - cut), "the agent to move to a replica that reaches etcd", interval=0.2)
        moved = time.monotonic() - cut
        print(f"agent re-homed {moved:.2f}s after its replica was cut off from etcd")
        assert moved < 30
        out, err = in_flight.communicate(timeout=30)
        assert in_flight.returncode == 0 and out.decode().strip() == "finished", err.decode()
        assert kubectl_works(fleet.kubeconfig)
    finally:
        stop(in_flight)
        for link in fleet.etcd_links[holder.name]:
            link.heal()
    assert replicas.wait_exit(holder, GRACE + 15) != 0  # lease lost: drained and stopped
    assert "etcd lease lost; draining" in replicas.process(holder).log.read_text()
    replicas.start_replica(holder)


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


def test_a_rolling_restart_fails_no_new_connection_and_a_1gib_port_forward_begun_before_completes(fleet):
    """SIGTERM, wait for the exit, start again: each of the 3 replicas in turn, while new connections open at
    20 a second and a 1 GiB echo runs through a port-forward opened before the first drain."""
    replicas = fleet.replicas
    port = free_port()
    echo_pod(fleet.devcluster.kubeconfig, "echo-rolling", NS, port)
    forward, local = port_forward(fleet.kubeconfig, NS, "echo-rolling", port, websockets=True)
    endpoint = Endpoint(fleet.kubeconfig)
    failures: list[str] = []
    opened = [0]
    done = threading.Event()

    def keep_opening(offset: float) -> None:  # 2 threads x 10 a second, each request a new connection (a Dial)
        next_at = time.monotonic() + offset
        while not done.is_set():
            try:
                status, body = endpoint.one_exchange("/version")
                if status != 200:  # the Status message says which hop refused, and why
                    failures.append(f"{time.monotonic() - restarted:.1f}s: status {status} {body[:300]!r}")
            except OSError as exc:
                failures.append(f"{time.monotonic() - restarted:.1f}s: {exc!r}")
            opened[0] += 1
            next_at += 0.1
            done.wait(max(0.0, next_at - time.monotonic()))

    transfer: dict[str, object] = {}

    def echo() -> None:
        try:
            transfer["result"] = echo_roundtrip(local, 1 << 30, timeout=GRACE)
        except (OSError, AssertionError) as exc:
            transfer["error"] = exc
        finally:
            stop(forward)  # at once: its connection would hold a drain until the grace ran out

    openers = [threading.Thread(target=keep_opening, args=(i * 0.05,)) for i in range(2)]
    echoing = threading.Thread(target=echo)
    timeline: list[str] = []
    restarted = time.monotonic()
    try:
        for thread in openers:
            thread.start()
        wait_until(lambda: opened[0] >= 10, 20, "connections to open through the fleet")
        echoing.start()
        for replica in replicas.replicas:
            timeline.append(f"{time.monotonic() - restarted:.1f}s: SIGTERM {replica.name}")
            replicas.terminate(replica)
            assert replicas.wait_exit(replica, GRACE + 10) == 0
            timeline.append(f"{time.monotonic() - restarted:.1f}s: {replica.name} exited")
            replicas.start_replica(replica)
            timeline.append(f"{time.monotonic() - restarted:.1f}s: {replica.name} registered")
        echoing.join(GRACE)
        count = opened[0]
        wait_until(lambda: opened[0] >= count + 10, 20, "connections to go on opening after the restart")
    finally:
        done.set()
        for thread in openers:
            thread.join(30)
        echoing.join(GRACE)
        stop(forward)
    took = time.monotonic() - restarted
    print(f"rolling restart of 3 replicas: {took:.1f}s, {opened[0]} connections opened, {len(failures)} failed")
    assert "error" not in transfer, transfer
    sent, received, seconds = transfer["result"]  # type: ignore[misc]
    print(f"1 GiB echo through the port-forward: {seconds:.1f}s across the drains, SHA-256 intact: {sent == received}")
    assert sent == received
    assert failures == [], (failures[:5], timeline)
