"""Writing the proxy's context into a KUBECONFIG list (clientproxy/kubeconfig.py), checked against what the
real kubectl then reads: an entry is modified in the first file that defines it, a new one goes to the first
file that exists, current-context to the first file that sets it; an entry clusterconnect did not write is
never overwritten (one line, no file touched)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from clusterconnect.clientproxy import kubeconfig
from clusterconnect.pki import KeyPair

KUBECTL = "/usr/bin/kubectl"


def _entries(context: str, port: int = 47011) -> dict:
    return kubeconfig.build_entries(context, f"https://127.0.0.1:{port}", b"CA", KeyPair(b"CERT", b"KEY"), "tok", None)


def _theirs(path: Path, name: str, current: bool = True) -> None:
    """A kubeconfig with a cluster, user and context ``name`` that someone else (kubectl) wrote."""
    config = {"apiVersion": "v1", "kind": "Config",
              "clusters": [{"name": name, "cluster": {"server": f"https://{name}.example.com"}}],
              "users": [{"name": name, "user": {"token": f"their-{name}"}}],
              "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}
    if current:
        config["current-context"] = name
    path.write_text(yaml.safe_dump(config))


def _kubectl_view(paths: list[Path]) -> dict:
    result = subprocess.run([KUBECTL, "config", "view", "--minify", "-o", "json"], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "KUBECONFIG": os.pathsep.join(map(str, paths))})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_new_context_goes_to_the_first_file_that_exists_and_kubectl_uses_it(tmp_path):
    first, second, third = tmp_path / "absent", tmp_path / "b", tmp_path / "c"
    _theirs(second, "b")
    _theirs(third, "c", current=False)
    assert kubeconfig.write([first, second, third], _entries("relay-dev")) == second
    assert not first.exists()
    assert yaml.safe_load(third.read_text())["contexts"][0]["name"] == "c"  # untouched
    view = _kubectl_view([first, second, third])
    assert view["current-context"] == "relay-dev"
    assert view["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:47011"
    assert [c["name"] for c in yaml.safe_load(second.read_text())["contexts"]] == ["b", "relay-dev"]


def test_an_existing_context_is_modified_where_it_is_defined_and_current_context_where_it_is_set(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _theirs(first, "a")
    second.write_text(yaml.safe_dump(kubeconfig.merge(None, _entries("relay-dev", port=1))))
    second_before = yaml.safe_load(second.read_text())
    assert second_before["current-context"] == "relay-dev"
    assert kubeconfig.write([first, second], _entries("relay-dev", port=2)) == second
    # the context (and its cluster and user) stayed in the second file and changed there ...
    assert yaml.safe_load(second.read_text())["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:2"
    # ... and current-context went to the first file, which sets it (as `kubectl config use-context` does)
    assert yaml.safe_load(first.read_text())["current-context"] == "relay-dev"
    assert [c["name"] for c in yaml.safe_load(first.read_text())["contexts"]] == ["a"]
    view = _kubectl_view([first, second])
    assert view["current-context"] == "relay-dev"
    assert view["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:2"


@pytest.mark.parametrize("kind", ["context", "cluster", "user"])
def test_an_entry_clusterconnect_did_not_write_is_never_overwritten(tmp_path, kind):
    first, second = tmp_path / "a", tmp_path / "b"
    _theirs(first, "a")
    entries = _entries("prod")
    name = entries[kind]["name"]  # the user is clusterconnect-prod
    second.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        {"context": "contexts", "cluster": "clusters", "user": "users"}[kind]: [
            {"name": name, kind: {"context": {"cluster": "x", "user": "y"}, "cluster": {"server": "https://x"},
                                  "user": {"token": "theirs"}}[kind]}]}))
    before = {path: path.read_bytes() for path in (first, second)}
    with pytest.raises(kubeconfig.NotOurs) as raised:
        kubeconfig.write([first, second], entries)
    assert str(raised.value) == (
        f"{second} already has a {kind} {name!r} that clusterconnect did not create: name ours with"
        f" --context-name NAME (or delete that one: kubectl config delete-{kind} {name})")
    assert {path: path.read_bytes() for path in (first, second)} == before


def test_kubectl_keeps_the_mark_when_it_edits_our_context_and_we_keep_its_namespace(tmp_path):
    path = tmp_path / "config"
    kubeconfig.write([path], _entries("relay-dev"))
    edited = subprocess.run([KUBECTL, "config", "set-context", "relay-dev", "--namespace", "apps"],
                            capture_output=True, text=True, timeout=30, env={**os.environ, "KUBECONFIG": str(path)})
    assert edited.returncode == 0, edited.stderr
    kubeconfig.write([path], _entries("relay-dev", port=3))  # still ours: no NotOurs
    assert yaml.safe_load(path.read_text())["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:3"
    assert _kubectl_view([path])["contexts"][0]["context"]["namespace"] == "apps"
