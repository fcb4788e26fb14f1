"""Wrong login codes and join tokens are limited per client address (a real relay process, real TLS).

After the burst of failures (clusterconnect.ratelimit.PER_SOURCE) the relay answers RESOURCE_EXHAUSTED with
one line, whatever the next attempt holds; the right secret is not spent by a refused attempt and works once
the limit allows (the agent retries by itself).
"""

from __future__ import annotations

import subprocess

import grpc
import pytest
from chain import Chain, script, wait_until
from cryptography.hazmat.primitives.asymmetric import ec

from clusterconnect.agentcert import build_csr
from clusterconnect.ratelimit import PER_SOURCE
from clusterconnect.v1 import enrollment_pb2, enrollment_pb2_grpc, identity_pb2, identity_pb2_grpc


@pytest.fixture
def relay(lone_relay):
    return lone_relay


def _channel(chain: Chain) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{chain.relay_port}",
                               grpc.ssl_channel_credentials(chain.relay_ca.read_bytes()))


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def test_wrong_login_codes_are_limited_per_address(relay, tmp_path):
    added = relay.cli("users", "add", "carol")
    code = added.stdout.splitlines()[1].strip()
    with _channel(relay) as channel:
        stub = identity_pb2_grpc.IdentityProviderStub(channel)

        def login(guess: str):
            return lambda: stub.Login(identity_pb2.LoginRequest(code=guess, device="test"), timeout=10)

        for i in range(PER_SOURCE.burst):
            error = _refusal(login(f"{i:048x}"))
            assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error
        error = _refusal(login("0" * 48))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert error.details().startswith("too many wrong login codes from this address; try again in ")
    # The right code through the real CLI (from stdin) is refused too, as one line, and not spent.
    refused = subprocess.run([script("clusterconnect"), "login", "--relay", relay.relay_url, "--relay-ca",
                              str(relay.relay_ca), "--code", "-", "--state-dir", str(tmp_path / "user")],
                             input=code + "\n", capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith("error: login failed: too many wrong login codes from this address")
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert code not in (relay.state_dir / "logs" / "relay.log").read_text()


def test_wrong_join_tokens_are_limited_and_the_agent_waits_for_the_limit(relay):
    join = relay.add_cluster("limited")
    csr = build_csr(ec.generate_private_key(ec.SECP256R1()), "limited")
    with _channel(relay) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)

        def join_with(token: str):
            request = enrollment_pb2.JoinRequest(cluster="limited", join_token=token, csr_pem=csr)
            return lambda: stub.Join(request, timeout=10)

        for i in range(PER_SOURCE.burst):
            assert _refusal(join_with(f"wrong-{i}")).code() == grpc.StatusCode.PERMISSION_DENIED
        error = _refusal(join_with(join["join_token"]))  # even the right one, from this address, for now
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert error.details().startswith("too many wrong join tokens from this address; try again in ")
    # The real agent with the right token: refused at first, it retries (no exit), and joins once a
    # token of the limit is back (PER_SOURCE.refill_seconds), since the refused attempt did not spend it.
    agent = relay.start_agent(name="agent-limited", cluster="limited", wait=False)
    log = relay.state_dir / "logs" / "agent-limited.log"
    try:
        wait_until(lambda: '"event": "joined relay"' in log.read_text(), PER_SOURCE.refill_seconds + 20,
                   "the agent to join once the limit allows", agent)
        assert "RESOURCE_EXHAUSTED" in log.read_text()
        assert agent.alive()
    finally:
        agent.stop()
