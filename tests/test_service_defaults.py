"""A relay started as the README says, with only its required flags, serves on its documented ports:
users on 8443, agents on 8444, the built-in issuer on 8445 (the issuer's default used to be the
listen port + 1, the agents' port, and the relay exited at once)."""

from __future__ import annotations

import socket
import ssl
import subprocess

from chain import port_open, script, wait_until


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def test_relay_starts_with_defaults_on_distinct_ports(tmp_path):
    ports = (8443, 8444, 8445)
    assert all(_free(p) for p in ports), "the relay's default ports are taken on this machine"
    log = tmp_path / "relay-defaults.log"
    with log.open("wb") as out:
        relay = subprocess.Popen([script("clusterconnect-relay"), "serve", "--data-dir", str(tmp_path / "data")],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: all(port_open(p) for p in ports) or relay.poll() is not None, 30, "the default ports")
        assert relay.poll() is None, log.read_text()
        # The issuer's port speaks HTTPS (discovery), the other two gRPC over TLS: each answers a handshake.
        context = ssl.create_default_context(cafile=str(tmp_path / "data" / "pki" / "ca.crt"))
        context.check_hostname = False
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                if port == 8444:
                    continue  # the agent port wants a client certificate of the agent CA
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version() is not None
    finally:
        relay.terminate()
        assert relay.wait(15) == 0, log.read_text()
