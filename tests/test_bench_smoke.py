"""`make bench` keeps working: every scenario at tiny sizes, one round (figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _in_session(tmp_path_factory) -> dict[str, str]:
    """The bench's work directory (its own devcluster and chain: tempfile.mkdtemp) inside this session's, so
    that the end-of-session audit reads its service logs too (log_audit.py)."""
    return {**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("bench-work"))}


def test_bench_smoke_run_writes_json_markdown_and_plot(tmp_path, tmp_path_factory, devcluster):
    # `devcluster` only orders this test after the cluster build; the bench starts a cluster of its own.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200, env=_in_session(tmp_path_factory))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [data] = tmp_path.glob("*.json")
    results = json.loads(data.read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == {"small_get", "big_list", "port_forward", "dial", "watches", "head_of_line", "scale",
                              "replicas"}, results.get("errors")
    check_replicas(scenarios["replicas"])
    # Konnectivity, the peer, beside the tunnel wherever a client of ours can reach it (not kubectl's port-forward).
    for name in ("small_get", "big_list", "dial", "watches", "head_of_line"):
        assert scenarios[name]["konnectivity"], name
    assert "konnectivity" not in scenarios["port_forward"]
    # The gateway (kubectl's kubeconfig alone, no client proxy) beside the client proxy in every scenario,
    # kubectl's port-forward included; each watch through it saw its events.
    for name in ("small_get", "big_list", "port_forward", "dial", "watches", "head_of_line"):
        assert scenarios[name]["gateway"], name
    for watched in scenarios["watches"]["gateway"]:
        assert len(watched["latencies"]) == watched["expected"], watched
    # The traced and scraped chain, its small GETs interleaved with the plain tunnel's (bench/observed.py): it
    # exported spans and was scraped while it ran.
    [paired] = results["observed_small_get"]
    assert len(paired["plain"]) == len(paired["observed"]) == results["sizes"]["get_requests"]
    assert results["observed"]["spans_received"] > 0 and results["observed"]["scrapes"] > 0, results["observed"]
    [table] = tmp_path.glob("*.md")
    text = table.read_text()
    assert "| small GET, traced + scraped | p50 latency (ms) |" in text
    assert "| scenario | metric | direct | tunnel | gateway | Konnectivity |" in text
    small_get = next(line for line in text.splitlines() if line.startswith("| small GET | p50 latency (ms) |"))
    assert small_get.split(" | ")[4].strip(), small_get  # the gateway's figure
    assert "| replicas: dial, connect → first byte | forwarded p50 (ms) |" in text
    assert list(tmp_path.glob("*.png"))


def check_replicas(r: dict) -> None:
    """3 replicas on etcd (bench/replicas.py): every figure is there and the invariants hold."""
    assert not r.get("errors"), r["errors"]
    forwarding = r["forwarding"]
    assert forwarding["owner"] != forwarding["entry"]
    for name in ("dial", "small_get"):
        assert forwarding[name]["local"] and forwarding[name]["forwarded"], name
    # the forwarded proxy's Dials went to the owner over RelayPeer: the entry replica counted each
    assert forwarding["dials_forwarded"] >= forwarding["dials_expected"], forwarding["dials_forwarded"]
    rehome = r["rehome"]
    assert rehome["trials"] == 2 and len(rehome["seconds"]) == len(rehome["routes_gone_seconds"]) == 2
    agents = r["agents"]
    n = agents["agents"]
    assert n == 300
    assert agents["routes"] == n and agents["routes_distinct_clusters"] == n  # one route per agent, in etcd
    assert len(agents["per_replica"]) == 3 and sum(agents["per_replica"].values()) == n, agents["per_replica"]
    # 300 agents heartbeat ~150 times in the 5 s window: had heartbeats written, this would be ~30/s
    assert agents["steady_writes_per_second"] <= 5, agents
    assert set(agents["steady_mvcc"]) == {"put", "delete", "txn"} and agents["lease_lost"] == []


def test_cpu_profile_smoke_prints_cpu_per_operation_per_process(tmp_path_factory, devcluster):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_profile.py"), "--smoke", "--requests", "20",
                             "--dials", "3", "--lists", "1"], capture_output=True, text=True, timeout=600,
                            env=_in_session(tmp_path_factory))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("small GET: p50 tunnel", "dial: p50 tunnel", "LIST: MB/s median tunnel"):
        assert line in result.stdout
    assert "aadproxy" in result.stdout
    # the budget's other parts: the kernel's share, the apiserver, the load generator, the machine
    for part in ("of it kernel", "apiserver", "client", "cores busy"):
        assert part in result.stdout, result.stdout
    # and the peer's two processes, per operation too
    assert result.stdout.count("; Konnectivity: ") == 3, result.stdout
    assert "server " in result.stdout and "agent " in result.stdout
    # and each tunnel process's CPU by thread: its event loop, grpc core's threads, the others
    assert result.stdout.count("the tunnel's CPU by thread: relay event loop ") == 3, result.stdout


def test_forwarder_micro_measures_the_auth_proxy_alone():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "forwarder_micro.py"), "--requests", "50"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "µs CPU per small GET" in result.stdout


def test_grpc_transport_micro_measures_tcp_tls_and_a_unix_socket():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "grpc_transport_micro.py"), "--round-trips", "50"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["tcp", "tcp+tls", "unix"], result.stdout
    assert all(line.count("µs CPU") == 2 for line in lines), result.stdout


def test_clientproxy_rss_smoke_reports_rss_at_each_step(devcluster):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "clientproxy_rss.py"), "--smoke", "--requests", "500",
                             "--step", "250", "--concurrency", "4"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    counts = [row["requests"] for row in rows]  # sampled as the workers go: a step is "at least 250 more"
    assert len(counts) == 3 and counts[0] == 0 and 250 <= counts[1] < 500 and counts[2] == 500, result.stdout
    assert all(row["rss_mib"] > 0 and row["tasks"] >= 1 for row in rows)
    assert "client proxy RSS" in result.stdout and "(0 failed)" in result.stdout
