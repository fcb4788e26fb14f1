"""Scenario 7: N idle simulated agents on one relay process; connect time, relay RSS per agent, dial latency."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chain import Chain, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from endpoints import Endpoint, proxy_client_files
from scenarios import Context, dial, rss_mib

from clusterconnect.agentcert import build_csr
from clusterconnect.relay.agent_identity import pki as agent_pki
from clusterconnect.relay.agent_identity.enrollment import EnrollmentStore
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.kv import EtcdKV, SqliteKV
from clusterconnect.relay.storage.sealing import SealingKey
from clusterconnect.relay.storage.store import Store

HERE = Path(__file__).resolve().parent
SIM_PROCESSES = 4
REGISTER_BATCH = 32


def _register(data_dir: Path, n: int) -> Path:
    """Register N clusters and enroll their simulated agents directly in the relay's store (as a Join
    would): each gets its own key and a client certificate from the relay's agent CA."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sealing = SealingKey.load_or_create(data_dir / "sealing.key")
    return register(lambda: SqliteKV(data_dir / "relay.db"), sealing, data_dir / "pki", n, data_dir.parent)


def register(open_kv: Callable[[], SqliteKV | EtcdKV], sealing: SealingKey, pki_dir: Path, n: int,
             out_dir: Path) -> Path:
    """Clusters sim-00000 ... in the store ``open_kv()`` opens (SQLite of a lone relay, or the replicas'
    etcd: its client needs the event loop, so it is made in it), each with an agent certificate of the
    store's agent CA; their credentials in OUT_DIR/sim-credentials-N.json."""
    entries = asyncio.run(_register_in_store(open_kv, sealing, pki_dir, n))
    path = out_dir / f"sim-credentials-{n}.json"
    path.write_text(json.dumps(entries))
    return path


async def _register_in_store(open_kv: Callable[[], SqliteKV | EtcdKV], sealing: SealingKey, pki_dir: Path,
                             n: int) -> list[list[str]]:
    store = await Store.open(open_kv())
    try:
        async with asyncio.TaskGroup() as group:
            mirror = group.create_task(store.run())  # etcd: the watch that feeds the store's reads
            await store.ready(30)
            try:
                return await _enroll(store, sealing, pki_dir, n)
            finally:
                mirror.cancel()
    finally:
        await store.close()


async def _enroll(store: Store, sealing: SealingKey, pki_dir: Path, n: int) -> list[list[str]]:
    clusters = await ClusterStore.open(store)
    enrollment = await EnrollmentStore.open(store)
    agent_ca = await agent_pki.ensure_agent_ca(store, sealing, pki_dir)

    async def one(i: int) -> list[str]:
        name = f"sim-{i:05d}"
        if clusters.get(name) is not None:
            await clusters.remove(name)
        await clusters.add(name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = agent_pki.issue(agent_ca, agent_pki.validate_csr(build_csr(key, name), name), name,
                               datetime.timedelta(days=1))
        await enrollment.record_certificate(name, cert.serial_number, int(cert.not_valid_after_utc.timestamp()))
        return [name, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode(),
                cert.public_bytes(serialization.Encoding.PEM).decode()]

    # A few at a time: on etcd each write is a round trip (~2 ms), so one after another 10,000
    # clusters would take minutes; SQLite serializes them anyway.
    entries: list[list[str]] = []
    for first in range(0, n, REGISTER_BATCH):
        entries += await asyncio.gather(*(one(i) for i in range(first, min(n, first + REGISTER_BATCH))))
    return entries


def start_sims(target: str, relay_ca: Path, credentials: Path, n: int, logs: Path) -> list[subprocess.Popen]:
    """N simulated agents (bench/sim_agents.py) in SIM_PROCESSES processes, dialling ``target`` (host:port)."""
    sims = []
    per = -(-n // SIM_PROCESSES)
    for first in range(0, n, per):
        with open(logs / f"sim-{first}.log", "wb") as log:
            sims.append(subprocess.Popen(
                [sys.executable, str(HERE / "sim_agents.py"), "--relay", target, "--relay-ca", str(relay_ca),
                 "--credentials", str(credentials), "--first", str(first), "--count", str(min(per, n - first))],
                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True))
    return sims


def wait_sims(sims: list[subprocess.Popen], n: int, logs: Path) -> int:
    """Until every simulated agent is welcomed; returns the failed attempts on the way."""
    per = -(-n // SIM_PROCESSES)
    failed_attempts = 0
    for first, sim in zip(range(0, n, per), sims, strict=True):
        line = sim.stdout.readline() if sim.stdout else ""
        if not line.startswith("connected"):
            tail = (logs / f"sim-{first}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"simulated agents failed: {line!r}\n{tail}")
        # "connected N after K failed attempts": each failed attempt is a handshake done in vain.
        failed_attempts += int(line.split()[3])
    return failed_attempts


def stop_sims(sims: list[subprocess.Popen]) -> None:
    for sim in sims:
        sim.kill()
        sim.wait()


def _agents_connected(relay) -> int:
    import os
    import signal
    before = relay.log.read_text(errors="replace").count('"event": "stats"')
    os.kill(relay.popen.pid, signal.SIGUSR1)

    def newest():
        lines = [line for line in relay.log.read_text(errors="replace").splitlines() if '"event": "stats"' in line]
        return json.loads(lines[-1]) if len(lines) > before else None

    return wait_until(newest, 10, "relay stats")["agents"]


def scale(ctx: Context, n: int, cluster_kubeconfig: Path, token_file: Path) -> dict:
    chain = Chain(ctx.work_dir / f"scale-{n}", cluster_kubeconfig, cluster="real")
    credentials = _register(chain.relay_data, n)
    sims = []
    try:
        relay = chain.start_relay()
        chain.add_cluster("real")
        chain.start_authproxy()
        chain.start_agent()
        rss_before = rss_mib(relay.popen.pid)
        start = time.monotonic()
        logs = chain.state_dir / "logs"
        sims = start_sims(f"127.0.0.1:{chain.agent_port}", chain.relay_ca, credentials, n, logs)
        failed_attempts = wait_sims(sims, n, logs)
        connect_seconds = time.monotonic() - start
        connected = _agents_connected(relay)
        time.sleep(2)
        rss_after = rss_mib(relay.popen.pid)
        kubeconfig = chain.state_dir / "kubeconfig"
        _, ready = chain.start_proxy(token_file, kubeconfig)
        port = int(ready.split("https://127.0.0.1:")[1].split()[0])
        proxy_ca = (chain.state_dir / "proxy-state" / "tls" / "ca.crt").read_text()
        tunnel = Endpoint("tunnel", "127.0.0.1", port, proxy_ca, token_file.read_text().strip(),
                          client_files=proxy_client_files(chain.state_dir / "proxy-state"))
        dials = dial(ctx, tunnel)["latencies"]
        return {
            "agents": n, "connected": connected, "connect_seconds": connect_seconds,
            "failed_attempts": failed_attempts,
            "relay_rss_mib_before": rss_before, "relay_rss_mib_after": rss_after,
            "relay_kib_per_agent": (rss_after - rss_before) * 1024 / n, "dial_latencies": dials,
        }
    finally:
        stop_sims(sims)
        chain.stop_all()
