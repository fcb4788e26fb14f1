"""Scenario 8: relay replicas on etcd (issue #12, docs/replicas.md).

3 replicas behind HAProxy on a 3-member etcd (TLS), one agent and auth proxy (token passthrough) on
the devcluster:

1. forwarded vs local Dial: a client proxy pinned at the replica holding the agent (local) and one
   at another replica (forwarded over RelayPeer); `dial` and `small_get` through both, alternating;
2. re-home after kill -9: the replica holding the agent killed, the time until a request through the
   balancer works again, then the replica started again (K trials);
3. N simulated agents through HAProxy's agent port: time until all connected, agents per replica,
   routes in etcd, and etcd's writes per second in a steady window (heartbeats must not write).
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import re
import ssl
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from chain import Chain, service_stats
from endpoints import Endpoint, proxy_client_files
from etcd_cluster import EtcdCluster
from relay_replicas import Replica, ReplicaSet, balancers_for
from scale import register, start_sims, stop_sims, wait_sims
from scenarios import Context, dial, small_get
from waiting import wait_until

from clusterconnect.agent.session import HEALTHY_AFTER
from clusterconnect.relay.routing.routes import ROUTES
from clusterconnect.relay.storage.kv import EtcdKV
from clusterconnect.relay.storage.sealing import SealingKey

CLUSTER = "ha"
LEASE_TTL = 10  # the relay's default: a killed replica's routes go within it


@dataclass
class ReplicaSizes:
    rehome_trials: int = 10
    agents: int = 10000
    steady_window: float = 30.0  # seconds between the two readings of etcd's revision

    @classmethod
    def smoke(cls) -> ReplicaSizes:
        return cls(rehome_trials=2, agents=300, steady_window=5.0)


@contextmanager
def fleet(work: Path, cluster_kubeconfig: Path, agents: int) -> Iterator[ReplicaSet]:
    """etcd, 3 replicas behind HAProxy (enough processes of it for ``agents``), the auth proxy and the
    agent of cluster ``ha``; all stopped after."""
    etcd = EtcdCluster(work / "etcd")
    chain = Chain(work / "chain", cluster_kubeconfig, cluster=CLUSTER)
    replicas = ReplicaSet(chain, etcd, relay_args=["--lease-ttl-seconds", str(LEASE_TTL)],
                          balancers=balancers_for(agents))
    try:
        etcd.start()
        replicas.start()
        chain.add_cluster()
        chain.start_authproxy()
        chain.start_agent()
        yield replicas
    finally:
        chain.stop_all()
        etcd.stop()


def proxy_endpoint(replicas: ReplicaSet, name: str, token_file: Path, replica: Replica | None = None) -> Endpoint:
    """A client proxy at ``replica`` (None: at the balancer), as a bench endpoint named ``name``."""
    chain = replicas.chain
    kubeconfig = chain.state_dir / f"kubeconfig-{name}"
    if replica is None:
        _, ready = chain.start_proxy(token_file, kubeconfig, name=name, state_dir=chain.state_dir / name)
    else:
        _, ready = replicas.start_proxy_at(replica, token_file, kubeconfig, name)
    port = int(ready.split("https://127.0.0.1:")[1].split()[0])
    state = chain.state_dir / name
    return Endpoint(name, "127.0.0.1", port, (state / "tls" / "ca.crt").read_text(), token_file.read_text().strip(),
                    client_files=proxy_client_files(state))


# -- 1. forwarded vs local Dial -------------------------------------------------------------------------

def forwarded_vs_local(ctx: Context, replicas: ReplicaSet, token_file: Path, rounds: int) -> dict:
    owner = replicas.holder()
    entry = next(r for r in replicas.replicas if r is not owner)
    endpoints = [proxy_endpoint(replicas, "local", token_file, owner),
                 proxy_endpoint(replicas, "forwarded", token_file, entry)]
    before = replicas.process(entry).stats()["dials_forwarded"]
    data: dict = {"owner": owner.name, "entry": entry.name}
    for name, measure in (("dial", dial), ("small_get", small_get)):
        data[name] = {e.name: [] for e in endpoints}
        for round_number in range(rounds):
            order = endpoints if round_number % 2 == 0 else list(reversed(endpoints))
            for endpoint in order:
                print(f"[replicas] {name} round {round_number + 1}/{rounds} {endpoint.name}", flush=True)
                data[name][endpoint.name].append(measure(ctx, endpoint))
    # The forwarded proxy's connections really went through a peer: the entry replica counted them.
    data["dials_forwarded"] = replicas.process(entry).stats()["dials_forwarded"] - before
    data["dials_expected"] = rounds * (ctx.sizes.dials + 1)  # each dial round, and small_get's one connection
    return data


# -- 2. re-home after kill -9 ---------------------------------------------------------------------------

def request_works(endpoint: Endpoint) -> bool:
    """A new connection (a new Dial) through the endpoint answers GET /version. A Dial made while the
    agent re-homes waits for its route (up to the relay's Accept timeout, 5 s): a long attempt is fine."""
    try:
        conn = endpoint.connect(timeout=15)
        try:
            endpoint.get(conn, "/version")
        finally:
            conn.close()
        return True
    except (OSError, RuntimeError, http.client.HTTPException, ssl.SSLError):
        return False


def routes(replicas: ReplicaSet) -> list[str]:
    """Every routes/<cluster>/<replica> key, read from etcd itself."""
    async def read() -> list[str]:
        async with replicas.etcd.client() as etcd:
            values, _ = await etcd.get_prefix(ROUTES)
            return [kv.key[len(ROUTES):].decode() for kv in values]

    return asyncio.run(read())


def agent_session_age(replicas: ReplicaSet) -> float:
    """Seconds since the agent's newest "connected to relay" (its current session's start)."""
    lines = [line for line in replicas.chain.processes["agent"].log.read_text(errors="replace").splitlines()
             if '"event": "connected to relay"' in line]
    started = datetime.datetime.fromisoformat(json.loads(lines[-1])["timestamp"].replace("Z", "+00:00"))
    return time.time() - started.timestamp()


def rehome(replicas: ReplicaSet, balancer: Endpoint, trials: int) -> dict:
    seconds, routes_gone, ages = [], [], []
    for trial in range(trials):
        holder = replicas.holder()
        wait_until(lambda: request_works(balancer), 30, "a request through the balancer before the kill")
        # A settled agent, as in a real failure: a session younger than HEALTHY_AFTER does not reset
        # the agent's reconnect backoff, so kills every few seconds would measure its growth instead
        # (up to 28 s in a run with trials ~10 s apart).
        wait_until(lambda: agent_session_age(replicas) > HEALTHY_AFTER + 0.5, HEALTHY_AFTER + 30,
                   "the agent's session to be older than HEALTHY_AFTER", interval=0.2)
        ages.append(agent_session_age(replicas))
        print(f"[replicas] re-home trial {trial + 1}/{trials}: kill -9 {holder.name}", flush=True)
        killed = time.monotonic()
        replicas.kill(holder)
        wait_until(lambda: request_works(balancer), 60, f"a request to work again after kill -9 of {holder.name}")
        seconds.append(time.monotonic() - killed)
        # Its routes go with its lease; only then does it start again under the same name.
        wait_until(lambda h=holder: not any(r.endswith(f"/{h.name}") for r in routes(replicas)), LEASE_TTL + 10,
                   f"the routes of {holder.name} to go with its lease", interval=0.2)
        routes_gone.append(time.monotonic() - killed)
        replicas.start_replica(holder)
    return {"trials": trials, "seconds": seconds, "routes_gone_seconds": routes_gone, "session_age_at_kill": ages}


# -- 3. N simulated agents on 3 replicas ------------------------------------------------------------------

def etcd_revision(replicas: ReplicaSet) -> int:
    """The store's revision: it moves by one with every write (put, delete, or a Txn that writes)."""
    async def read() -> int:
        async with replicas.etcd.client() as etcd:
            _, revision = await etcd.get_prefix(b"/clusterconnect/none/")
            return revision

    return asyncio.run(read())


MVCC = re.compile(r"^etcd_mvcc_(put|delete|txn)_total (\S+)$", re.M)


def etcd_mvcc_counts(etcd: EtcdCluster) -> dict[str, float]:
    """One member's etcd_mvcc_{put,delete,txn}_total from its /metrics (every member applies every write)."""
    context = ssl.create_default_context(cafile=str(etcd.ca_file))
    context.load_cert_chain(str(etcd.client_cert), str(etcd.client_key))
    with urllib.request.urlopen(f"{etcd.members[0].client_url}/metrics", context=context, timeout=5) as response:
        text = response.read().decode()
    return {kind: float(value) for kind, value in MVCC.findall(text)}


def agents_per_replica(replicas: ReplicaSet) -> dict[str, int]:
    """Agent sessions at each replica (0 for one that exited); a busy replica gets 30 s to answer."""
    out = {}
    for replica in replicas.replicas:
        process = replicas.process(replica)
        out[replica.name] = service_stats(process.log, process.popen.pid, 30)["agents"] if process.alive() else 0
    return out


def sim_agents(replicas: ReplicaSet, n: int, window: float) -> dict:
    chain = replicas.chain
    # Only the simulated agents from here on: the real agent's route goes with its session.
    chain.processes["agent"].stop()
    wait_until(lambda: not routes(replicas), 20, "the real agent's route to go", interval=0.2)
    print(f"[replicas] registering {n} clusters in etcd", flush=True)
    started = time.monotonic()
    sealing = SealingKey.load_or_create(replicas.sealing_key, create=False)
    credentials = register(lambda: EtcdKV(replicas.etcd.client()), sealing, chain.state_dir / "no-legacy-pki", n,
                           chain.state_dir)
    register_seconds = time.monotonic() - started
    logs = chain.state_dir / "logs"
    print(f"[replicas] {n} simulated agents through HAProxy", flush=True)
    start = time.monotonic()
    sims = start_sims(f"127.0.0.1:{replicas.front['agents']}", chain.relay_ca, credentials, n, logs)
    try:
        failed_attempts = wait_sims(sims, n, logs)
        connect_seconds = time.monotonic() - start
        # Route claims are flushed in transactions after the welcome: wait for them (they may never reach N).
        try:
            wait_until(lambda: len(routes(replicas)) >= n, 60, f"{n} routes in etcd", interval=0.5)
        except RuntimeError as exc:
            print(f"[replicas] {exc}", flush=True)
        routes_seconds = time.monotonic() - start
        found = routes(replicas)
        per_replica = agents_per_replica(replicas)
        revision, counts = etcd_revision(replicas), etcd_mvcc_counts(replicas.etcd)
        time.sleep(window)  # the measurement window, with every agent heartbeating through it
        revision_after, counts_after = etcd_revision(replicas), etcd_mvcc_counts(replicas.etcd)
        per_replica_after = agents_per_replica(replicas)
    finally:
        stop_sims(sims)
    return {
        # A replica that could not renew its etcd lease (etcd starved of CPU in the connect storm) drains
        # itself and its agents move to the others: the run says so instead of hiding it in the counts.
        "lease_lost": [r.name for r in replicas.replicas
                       if "etcd lease lost" in replicas.process(r).log.read_text(errors="replace")],
        "agents": n, "register_seconds": register_seconds, "connect_seconds": connect_seconds,
        "failed_attempts": failed_attempts, "routes_seconds": routes_seconds, "routes": len(found),
        "routes_distinct_clusters": len({r.rsplit("/", 1)[0] for r in found}),
        "per_replica": per_replica, "per_replica_after_window": per_replica_after,
        "steady_window_seconds": window, "steady_revisions": revision_after - revision,
        "steady_writes_per_second": (revision_after - revision) / window,
        "steady_mvcc": {k: counts_after.get(k, 0.0) - counts.get(k, 0.0) for k in ("put", "delete", "txn")},
    }


def replicas_scenario(ctx: Context, cluster_kubeconfig: Path, token_file: Path, rounds: int, smoke: bool) -> dict:
    sizes = ReplicaSizes.smoke() if smoke else ReplicaSizes()
    with fleet(ctx.work_dir / "replicas", cluster_kubeconfig, sizes.agents) as replicas:
        result: dict = {"sizes": asdict(sizes), "balancers": replicas.balancers}
        # Each part's figures are kept when a later one fails (the failure is in result["errors"]).
        try:
            result["forwarding"] = forwarded_vs_local(ctx, replicas, token_file, rounds)
            balancer = proxy_endpoint(replicas, "balancer", token_file)
            result["rehome"] = rehome(replicas, balancer, sizes.rehome_trials)
            for name in ("local", "forwarded", "balancer"):
                replicas.chain.processes[name].stop()
            result["agents"] = sim_agents(replicas, sizes.agents, sizes.steady_window)
        except Exception as exc:
            print(f"[replicas] failed: {exc}", flush=True)
            result["errors"] = [str(exc)]
    return result
