"""Two relay processes on one etcd store (#12, "one store interface"): what one replica writes or
issues, the other knows. Real `clusterconnect-relay serve --store etcd` processes on the 3-member TLS
etcd, the same sealing key file; real CLI and agents."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from chain import Chain, free_port, script, wait_until
from replicas import etcd_flags, two_replicas

from clusterconnect.relay.storage.sealing import SealingKey


@pytest.fixture(scope="module")
def replicas(etcd_cluster, tmp_path_factory):
    one, two = two_replicas(etcd_cluster, tmp_path_factory.mktemp("replicas"))
    try:
        one.start_relay()
        two.start_relay()
        yield one, two
    finally:
        two.stop_all()
        one.stop_all()


def _listed(chain: Chain) -> dict[str, str]:
    """Cluster name -> status, as `clusters list` prints them at this replica."""
    rows = chain.admin("list").stdout.splitlines()[1:]
    return {row.split()[0]: row.split()[1] for row in rows if row.strip()}


def test_both_replicas_serve_one_ca_and_one_admin_credential(replicas):
    one, two = replicas
    assert one.relay_ca.read_bytes() == two.relay_ca.read_bytes()
    assert one.admin_credential.read_bytes() == two.admin_credential.read_bytes()
    assert (one.relay_data / "pki" / "tls.crt").read_bytes() != (two.relay_data / "pki" / "tls.crt").read_bytes()
    # Replica 1's CA file and admin credential at replica 2: TLS verifies, the admin call is admitted.
    listed = subprocess.run(
        [script("clusterconnect"), "clusters", "list", "--relay", two.relay_url, "--relay-ca", str(one.relay_ca),
         "--admin-credential", str(one.admin_credential)], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr


def test_a_cluster_added_at_one_replica_is_listed_and_removed_at_the_other(replicas):
    one, two = replicas
    one.add_cluster("shared")
    wait_until(lambda: "shared" in _listed(two), 10, "replica 2 to list the cluster added at replica 1")
    two.admin("remove", "shared")
    wait_until(lambda: "shared" not in _listed(one), 10, "replica 1 to forget the cluster removed at replica 2")


def test_an_agent_joins_at_one_replica_with_a_token_of_the_other_and_moves(replicas):
    one, two = replicas
    two.joins["hop"] = one.add_cluster("hop")  # the join token is made at replica 1 ...
    agent = two.start_agent(name="agent-hop", cluster="hop", state_dir=one.agent_state("hop"))  # ... used at 2
    assert _listed(two)["hop"] == "Connected"
    agent.stop()
    # Its certificate, issued by replica 2, works at replica 1 (one agent CA, one record of its serial).
    one.start_agent(name="agent-hop-at-one", cluster="hop", state_dir=one.agent_state("hop")).stop()
    # Removed at replica 2: the certificate is refused at replica 1 as well.
    two.admin("remove", "hop")
    wait_until(lambda: "hop" not in _listed(one), 10, "replica 1 to forget the removed cluster")
    refused = one.start_agent(name="agent-hop-removed", cluster="hop", state_dir=one.agent_state("hop"), wait=False)
    wait_until(lambda: refused.popen.poll() is not None, 30, "the agent of a removed cluster to give up")
    last = refused.tail().splitlines()[-1]
    assert refused.returncode == 1 and "agent certificate of cluster hop is no longer valid" in last, last


def _serve(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    ports = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    return subprocess.run([script("clusterconnect-relay"), "serve", "--data-dir", str(data_dir), "--listen", ports[0],
                           "--agent-listen", ports[1], "--issuer-listen", ports[2], *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_replica_with_another_sealing_key_or_none_refuses_to_start(replicas, etcd_cluster, tmp_path):
    other = tmp_path / "other.key"
    SealingKey.load_or_create(other)
    wrong = _serve(tmp_path / "wrong", *etcd_flags(etcd_cluster, other))
    last = wrong.stderr.strip().splitlines()[-1]
    assert wrong.returncode == 2 and "does not open with this relay's sealing key" in last, wrong.stderr
    missing = _serve(tmp_path / "missing", *etcd_flags(etcd_cluster, tmp_path / "absent.key"))
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and "does not exist" in last, missing.stderr
    # Without --sealing-key-file, DATA_DIR/sealing.key is not made up either (each replica would have its own).
    flags = etcd_flags(etcd_cluster, other)[:-2]
    default = _serve(tmp_path / "default", *flags)
    assert default.returncode == 2 and "--store etcd" in default.stderr.strip().splitlines()[-1], default.stderr
    assert not (tmp_path / "default" / "sealing.key").exists()


def test_json_of_clusters_add_names_the_shared_ca(replicas):
    one, two = replicas
    added = one.add_cluster("pinned")
    via_two = json.loads(two.admin("add", "pinned-too", "--json").stdout)
    assert added["relay_ca_hash"] == via_two["relay_ca_hash"]


def test_with_etcd_down_admin_writes_get_one_line_and_the_relay_keeps_running(tmp_path):
    from etcd_cluster import EtcdCluster

    etcd = EtcdCluster(tmp_path / "etcd", size=1)  # its own: the session's etcd stays up for the others
    sealing = tmp_path / "sealing.key"
    SealingKey.load_or_create(sealing)
    relay = Chain(tmp_path / "relay", Path("/nonexistent"), relay_args=etcd_flags(etcd, sealing))
    with etcd.running():
        try:
            relay.start_relay()
            relay.add_cluster("before")
            etcd.stop()
            refused = relay.admin("add", "during", check=False)
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode != 0 and len(lines) == 1, refused.stderr
            assert "the store (etcd) is unreachable" in lines[0], lines
            # Reads are from the relay's memory: the registry is still listed.
            assert "before" in relay.admin("list").stdout
            assert relay.processes["relay"].alive()
        finally:
            relay.stop_all()
