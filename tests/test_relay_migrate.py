"""`clusterconnect-relay migrate --from sqlite:DIR --to etcd:ENDPOINTS` (#12): a single relay's store
copied to etcd, and a relay on etcd serving what was copied. Real processes: a SQLite relay used by
the CLI and an agent, the migrate command, a relay on the 3-member TLS etcd, the same agent again."""

from __future__ import annotations

import subprocess
from pathlib import Path

from chain import Chain, script
from replicas import empty_store, etcd_flags


def _migrate(etcd_cluster, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script("clusterconnect-relay"), "migrate", "--from", f"sqlite:{data_dir}",
         "--to", f"etcd:{etcd_cluster.endpoints}",
         "--etcd-ca", str(etcd_cluster.ca_file), "--etcd-cert", str(etcd_cluster.client_cert),
         "--etcd-key", str(etcd_cluster.client_key), *extra],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_used_sqlite_relay_migrated_to_etcd_serves_its_cluster_and_agent(etcd_cluster, tmp_path):
    empty_store(etcd_cluster)
    old = Chain(tmp_path / "sqlite", Path("/nonexistent"))
    try:
        old.start_relay()
        old.add_cluster("moved")
        old.start_agent(name="agent-moved", cluster="moved").stop()
    finally:
        old.stop_all()

    copied = _migrate(etcd_cluster, old.relay_data)
    assert copied.returncode == 0, copied.stderr
    line = copied.stdout.strip()
    assert line.startswith("copied ") and line.endswith(f"records from sqlite:{old.relay_data} to"
                                                        f" etcd:{etcd_cluster.endpoints}"), line
    assert int(line.split()[1]) >= 5  # cluster, join token, certificate, CAs, admin credential, canary ...
    again = _migrate(etcd_cluster, old.relay_data)
    assert again.returncode == 2 and "holds" in again.stderr and "--force" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    forced = _migrate(etcd_cluster, old.relay_data, "--force")
    assert forced.returncode == 0 and forced.stdout.split()[1] == line.split()[1], forced.stderr

    # A relay on etcd, new data directory, the old relay's sealing key: the same cluster, CA and admin.
    new = Chain(tmp_path / "etcd", Path("/nonexistent"),
                relay_args=etcd_flags(etcd_cluster, old.relay_data / "sealing.key"),
                relay_port=old.relay_port, agent_port=old.agent_port)  # where the agent's state says the relay is
    try:
        new.start_relay()
        assert new.relay_ca.read_bytes() == old.relay_ca.read_bytes()
        assert new.admin_credential.read_bytes() == old.admin_credential.read_bytes()
        assert "moved" in new.admin("list").stdout
        # The agent of the SQLite relay, its state as it was: its pinned CA and certificate work here.
        new.start_agent(name="agent-moved-etcd", cluster="moved", state_dir=old.agent_state("moved"))
        assert "Connected" in new.admin("list").stdout
    finally:
        new.stop_all()


def test_migrate_refuses_a_source_that_is_not_a_relay_data_dir(etcd_cluster, tmp_path):
    result = _migrate(etcd_cluster, tmp_path / "nothing")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'} holds no relay.db: --from names a relay's --data-dir"], result.stderr
