"""/metrics of every service, scraped before and after a workload through the real chain (HTTPS requests
with kubectl's kubeconfig): the counters move by exactly what the workload did (clusterconnect.metrics;
docs/metrics.md)."""

from __future__ import annotations

import pytest
from chain import STDOUT_SUFFIX, script, wait_until
from https_client import Endpoint

from clusterconnect.metrics import sample

GETS = 5
SERVICES = ("relay", "aadproxy", "agent", "proxy")


def _scrape(tunnel) -> dict[str, str]:
    return {name: tunnel.processes[name].metrics() for name in SERVICES}


def _value(text: str, name: str, **labels: str) -> float:
    return sample(text, name, **labels) or 0.0


def _dial_count(text: str, route: str = "local") -> float:
    return sum(_value(text, "clusterconnect_relay_dial_duration_seconds_count", stream=stream, route=route)
               for stream in ("warm", "requested"))


def _refused(text: str) -> dict[str, float]:
    """Refused dials by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "clusterconnect_relay_dials_total" and s.labels["outcome"] == "refused"}


def _idle(tunnel) -> bool:
    return all(tunnel.processes[name].stats().get("open_connections", 0) == 0 for name in SERVICES)


def test_kubectl_gets_move_every_hops_counters_by_their_number(chain):
    tunnel, kubeconfig = chain
    wait_until(lambda: _idle(tunnel), 30, "the chain to be idle")
    before = _scrape(tunnel)
    endpoint = Endpoint(kubeconfig)  # kubectl's kubeconfig: the proxy's client certificate and the token
    for _ in range(GETS):
        # One request on a connection of its own, so one Dial each (`kubectl get --raw` sends /version twice).
        assert endpoint.one_request("/version") == 200
    wait_until(lambda: _idle(tunnel), 30, "the connections to end")
    after = _scrape(tunnel)

    def moved(service: str, name: str, **labels: str) -> float:
        return _value(after[service], name, **labels) - _value(before[service], name, **labels)

    relay, proxy, agent = "relay", "proxy", "agent"
    assert moved(relay, "clusterconnect_relay_dials_total", outcome="ok", reason="none") == GETS
    assert _dial_count(after[relay]) - _dial_count(before[relay]) == GETS  # the histogram saw each one
    assert moved(relay, "clusterconnect_relay_dials_warm_total") + moved(
        relay, "clusterconnect_relay_dials_requested_total") == GETS
    assert moved("aadproxy", "clusterconnect_aadproxy_requests_total", verb="get", code="200") == GETS
    assert moved(proxy, "clusterconnect_clientproxy_connections_total") == GETS
    assert moved(agent, "clusterconnect_agent_connections_warm_total") + moved(
        agent, "clusterconnect_agent_connections_requested_total") == GETS

    # The same bytes cross every hop: the client proxy counts the payload; the relay and the agent, which never
    # decode a Chunk, count each one whole (the payload and a few bytes of framing per message).
    for direction in ("to_cluster", "from_cluster"):
        at_proxy = moved(proxy, f"clusterconnect_clientproxy_tunnel_{direction}_bytes_total")
        at_agent = moved(agent, f"clusterconnect_agent_tunnel_{direction}_bytes_total")
        at_relay = moved(relay, f"clusterconnect_relay_tunnel_{direction}_bytes_total")
        assert at_proxy > 0 and at_relay == at_agent, (direction, at_relay, at_agent)
        assert at_proxy <= at_relay <= at_proxy + 16 * GETS * 8, (direction, at_proxy, at_relay)
    assert moved("aadproxy", "clusterconnect_aadproxy_response_body_bytes_total") > 0

    for name in SERVICES:  # and every process reports itself
        assert _value(after[name], "process_resident_memory_bytes") > 0


def test_a_refused_dial_is_counted_with_its_reason(chain, admin_sa_token, tmp_path):
    """Dials for a cluster the relay does not know: refused, counted under their reason, nothing opened."""
    tunnel, _ = chain
    relay = tunnel.processes["relay"]
    before = relay.metrics()
    # A second client proxy, for a cluster the relay does not know: each of its probes is a refused Dial.
    out = tunnel.state_dir / "logs" / f"proxy-unknown{STDOUT_SUFFIX}"
    process = None
    try:
        with open(out, "wb") as handle:
            process = tunnel.spawn("proxy-unknown", [
                script("clusterconnect"), "proxy", "no-such-cluster", "--relay", tunnel.relay_url,
                "--relay-ca", str(tunnel.relay_ca), "--token-file", str(admin_sa_token), "--port", "0",
                "--kubeconfig-out", str(tmp_path / "unknown.kubeconfig"), "--state-dir", str(tmp_path / "state"),
            ], stdout=handle.fileno())

        def refusals() -> dict[str, float] | None:
            now, then = _refused(relay.metrics()), _refused(before)
            moved = {reason: value - then.get(reason, 0) for reason, value in now.items()}
            return {reason: value for reason, value in moved.items() if value} or None

        reasons = wait_until(refusals, 30, "a refused dial in the relay's metrics", process)
        # One answer for a cluster the relay does not know and one that does not admit the caller.
        assert set(reasons) == {"access-denied"}, reasons
        after = relay.metrics()
        assert _value(after, "clusterconnect_relay_dials_total", outcome="ok", reason="none") == _value(
            before, "clusterconnect_relay_dials_total", outcome="ok", reason="none")
    finally:
        if process is not None:
            process.stop()
            tunnel.processes.pop("proxy-unknown", None)


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_each_service_answers_on_its_metrics_port(chain, path):
    tunnel, _ = chain
    for name in SERVICES:
        status, body = tunnel.processes[name].http_get(path)
        assert status == 200, (name, path, body)


def test_the_stats_line_and_the_metrics_agree(chain):
    """SIGUSR1's stats line and /metrics read the same numbers."""
    tunnel, _ = chain
    relay = tunnel.processes["relay"]
    wait_until(lambda: _idle(tunnel), 30, "the chain to be idle")
    stats, text = relay.stats(), relay.metrics()
    assert stats["agents"] == _value(text, "clusterconnect_relay_agent_sessions") == 1
    assert stats["dials_warm"] == _value(text, "clusterconnect_relay_dials_warm_total")
    assert stats["dials_requested"] == _value(text, "clusterconnect_relay_dials_requested_total")
