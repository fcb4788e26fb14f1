"""`-o table|json|yaml` on the list and show commands, against a real relay: JSON and YAML parse, carry
stable field names and no markup; `clusters show NAME` shows one cluster, an unknown one is one line, exit 1."""

from __future__ import annotations

import json

import yaml

CLUSTER_FIELDS = ["name", "status", "connected", "last_seen_unix", "created_unix", "agent_version",
                  "kubernetes_version", "replica"]


def test_clusters_list_and_show_as_json_yaml_and_table(lone_relay):
    lone_relay.add_cluster("alpha")
    lone_relay.add_cluster("beta")
    listed = json.loads(lone_relay.admin("list", "-o", "json").stdout)
    assert [c["name"] for c in listed] == ["alpha", "beta"]
    assert list(listed[0]) == CLUSTER_FIELDS
    assert listed[0]["connected"] is False and listed[0]["status"] == "Disconnected"
    assert listed[0]["last_seen_unix"] is None and listed[0]["agent_version"] is None  # never seen: null
    assert isinstance(listed[0]["created_unix"], int)
    assert yaml.safe_load(lone_relay.admin("list", "--output", "yaml").stdout) == listed

    shown = json.loads(lone_relay.admin("show", "beta", "-o", "json").stdout)
    assert shown == listed[1]
    assert yaml.safe_load(lone_relay.admin("show", "beta", "-o", "yaml").stdout) == shown
    table = lone_relay.admin("show", "beta").stdout  # the default
    assert table.split()[:6] == ["NAME", "STATUS", "LAST", "SEEN", "AGENT", "KUBERNETES"]
    assert "beta" in table and "alpha" not in table and "\x1b[" not in table


def test_show_of_an_unknown_cluster_is_one_line_and_exit_1(lone_relay):
    result = lone_relay.admin("show", "nope", "-o", "json", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: cluster nope is not registered\n"


def test_the_output_format_comes_from_the_environment_too(lone_relay, monkeypatch):
    lone_relay.add_cluster("gamma")
    monkeypatch.setenv("CLUSTERCONNECT_OUTPUT", "json")
    assert json.loads(lone_relay.admin("list").stdout)[0]["name"] == "gamma"
    assert lone_relay.admin("list", "-o", "table").stdout.split()[0] == "NAME"  # the flag wins


def test_an_unknown_format_is_refused_by_the_parser(lone_relay):
    result = lone_relay.admin("list", "-o", "xml", check=False)
    assert result.returncode == 2 and "invalid choice: 'xml'" in result.stderr


def test_cluster_add_users_and_access_as_json(lone_relay):
    added = json.loads(lone_relay.admin("add", "delta", "-o", "json").stdout)
    assert set(added) == {"cluster", "join_token", "relay_ca_hash", "expires_unix", "agent_command"}
    assert yaml.safe_load(lone_relay.admin("add", "epsilon", "-o", "yaml").stdout)["cluster"] == "epsilon"

    lone_relay.cli("users", "add", "alice", "--group", "dev", "--group", "ops")
    users = json.loads(lone_relay.cli("users", "list", "-o", "json").stdout)
    assert users == [{"name": "alice", "groups": ["dev", "ops"], "created_unix": users[0]["created_unix"],
                      "logins": 0}]
    assert json.loads(lone_relay.cli("users", "credentials", "alice", "-o", "json").stdout) == []

    lone_relay.cli("clusters", "grant", "delta", "--group", "dev")
    lone_relay.cli("clusters", "grant", "delta", "--user", "bob")
    access = json.loads(lone_relay.cli("clusters", "access", "delta", "-o", "json").stdout)
    assert access == {"cluster": "delta", "entries": [{"user": "bob"}, {"group": "dev"}]}  # the relay's order
    assert yaml.safe_load(lone_relay.cli("clusters", "access", "delta", "-o", "yaml").stdout) == access
