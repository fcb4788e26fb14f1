"""The gateway's pure parts: the cluster from a server name, the token from a first head, the kubeconfig's server."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from silent_stream import Blocks

from clusterconnect.cli.kubeconfig_command import entries, server_entry
from clusterconnect.errors import InvalidInput
from clusterconnect.gateway.first_request import MAX_HEAD, BadRequest, HeadParser, HeadTimeout, read_first_request
from clusterconnect.gateway.sni import UnknownCluster, cluster_domain, cluster_of

HEAD = (b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\nHost: 127.0.0.1:8447\r\n"
        b"Authorization: Bearer abc.def\r\nUser-Agent: kubectl\r\n\r\n")


def test_cluster_of_a_server_name():
    assert cluster_of("prod.clusters.example.com", "clusters.example.com") == "prod"
    assert cluster_of("PROD.Clusters.Example.com.", "clusters.example.com") == "prod"  # DNS is case-insensitive
    for name in (None, "", "clusters.example.com", "a.prod.clusters.example.com", "prod.example.com",
                 "prodclusters.example.com", "-x.clusters.example.com", "under_score.clusters.example.com"):
        with pytest.raises(UnknownCluster):
            cluster_of(name, "clusters.example.com")


def test_cluster_domain_flag():
    assert cluster_domain("*.Clusters.Example.com.") == "clusters.example.com"
    for bad in ("", ".", "a..b", "under_score.test", "*"):
        with pytest.raises(InvalidInput):
            cluster_domain(bad)


def test_the_head_is_kept_byte_for_byte_and_its_token_taken():
    parser = HeadParser()
    # split anywhere, even inside the blank line; a body's first bytes may come with it
    assert not parser.feed(HEAD[:10])
    assert not parser.feed(HEAD[10:-1])
    assert parser.feed(HEAD[-1:] + b"BODY")
    first = parser.first_request()
    assert first.raw == HEAD + b"BODY"
    assert first.token == "abc.def"
    assert first.target == "/api/v1/namespaces/default/pods?watch=1"


@pytest.mark.parametrize("authorization", [b"", b"Authorization: Basic eDp5\r\n", b"Authorization: Bearer \r\n",
                                           b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"])
def test_no_single_bearer_token_is_none(authorization):
    parser = HeadParser()
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n" + authorization + b"\r\n")
    assert parser.first_request().token is None


@pytest.mark.parametrize("data", [b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 1)])
def test_not_a_head_is_bad_request(data):
    with pytest.raises(BadRequest):
        HeadParser().feed(data)


def test_read_first_request_waits_for_the_whole_head_within_the_deadline():
    first = asyncio.run(read_first_request(Blocks(HEAD[:20], HEAD[20:]), 5))
    assert first is not None and first.raw == HEAD
    assert asyncio.run(read_first_request(Blocks(b""), 5)) is None  # hung up unused
    with pytest.raises(HeadTimeout, match="20 bytes received"):
        asyncio.run(read_first_request(Blocks(HEAD[:20]), 0.1))


def test_kubeconfig_server_by_name_or_by_tls_server_name():
    # the gateway's host is the cluster domain: wildcard DNS, the name in the URL
    assert server_entry("prod", "https://clusters.example.com:8447", None) == {
        "server": "https://prod.clusters.example.com:8447"}
    assert server_entry("prod", "https://clusters.example.com", "clusters.example.com") == {
        "server": "https://prod.clusters.example.com:443"}
    # an address, or a balancer's name: the URL stays, SNI from tls-server-name
    assert server_entry("prod", "https://127.0.0.1:8447", "clusters.test") == {
        "server": "https://127.0.0.1:8447", "tls-server-name": "prod.clusters.test"}
    assert server_entry("prod", "https://lb.example.com:8447", "clusters.example.com") == {
        "server": "https://lb.example.com:8447", "tls-server-name": "prod.clusters.example.com"}
    assert server_entry("prod", "https://[::1]:8447", "clusters.test")["server"] == "https://[::1]:8447"


@pytest.mark.parametrize(("cluster", "gateway", "domain", "says"), [
    ("prod", "http://127.0.0.1:8447", "clusters.test", "must be https://HOST:PORT"),
    ("prod", "https://127.0.0.1:8447/clusters/prod", "clusters.test", "must be https://HOST:PORT"),
    ("prod", "https://127.0.0.1:8447", None, "give --cluster-domain"),
    ("Prod.x", "https://127.0.0.1:8447", "clusters.test", "is not a cluster name"),
    ("prod", "https://127.0.0.1:99999", "clusters.test", "no valid port"),
])
def test_kubeconfig_bad_input_is_one_line(cluster, gateway, domain, says):
    with pytest.raises(InvalidInput, match=says):
        server_entry(cluster, gateway, domain)


def test_kubeconfig_entries_with_a_token_file(tmp_path: Path):
    token = tmp_path / "sa.token"
    token.write_text("t")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"PEM")
    args = argparse.Namespace(cluster="prod", gateway="https://127.0.0.1:8447", cluster_domain="clusters.test",
                              gateway_ca=ca, token_file=token, login=None, context=None, state_dir=tmp_path)
    written = entries(args)
    assert written["cluster"]["cluster"]["certificate-authority-data"] == "UEVN"
    assert written["user"]["user"] == {"tokenFile": str(token.resolve())}
    assert written["context"] == {"name": "prod", "context": {"cluster": "prod", "user": "clusterconnect-gateway-prod"}}
