"""Traces over OTLP (docs/tracing.md): the standard OTEL_* environment points every service's exporter at
an OTLP/gRPC receiver in the test (deploy/local/otlp_receiver.py, built from opentelemetry-proto); one
kubectl request through the real chain is one trace, client proxy -> relay -> agent -> auth proxy
connection -> request, each span the previous one's child across the process boundaries. And a
collector that never answers costs the data path nothing, nor the stop more than its bound."""

from __future__ import annotations

import time

import pytest
from blackhole import links
from chain import Chain, free_port, wait_until
from kube import kubectl
from otlp_receiver import ReceivedSpan, otlp_receiver

from clusterconnect.aadproxy.route import route
from clusterconnect.errors import StartupError
from clusterconnect.tracing import FLUSH_ON_STOP_SECONDS, exporter_names

PATH = "/api/v1/namespaces/kube-system"
ROUTE = "/api/v1/namespaces/{name}"
HOPS = [("clusterconnect-clientproxy", "clientproxy.connection"), ("clusterconnect-relay", "relay.dial"),
        ("clusterconnect-agent", "agent.connection"), ("clusterconnect-aadproxy", "aadproxy.connection")]


def _chain_of(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
    """The hops' spans of one trace, client proxy first, once every hop's span arrived (spans are exported
    when they end, and the hops end in no fixed order); None before."""
    by_hop = {(s.service, s.name): s for s in spans}
    found = [by_hop.get(hop) for hop in HOPS]
    return None if None in found else [s for s in found if s is not None]


def test_one_kubectl_request_is_one_trace_across_all_four_processes(
        devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path):
    with otlp_receiver() as receiver:
        tunnel = Chain(tmp_path / "chain", cluster_endpoint_kubeconfig, env=receiver.env())
        kubeconfig = tmp_path / "kubeconfig"
        with tunnel.running(admin_sa_token, kubeconfig):
            # Spans started from here on are the request's (startup's own, e.g. the proxy's first
            # request, began before; nothing in the chain starts a span by itself once idle).
            since = time.time_ns()
            out = kubectl(kubeconfig, "get", "--raw", PATH, env={"HOME": str(tmp_path)})
            assert '"kube-system"' in out.stdout

            def the_trace() -> tuple[str, list[ReceivedSpan]] | None:
                ours = [s for s in receiver.spans() if s.start_unix_nano >= since]
                requests = [s for s in ours if s.attributes.get("http.route") == ROUTE]
                if not requests:
                    return None
                trace_id = requests[0].trace_id
                hops = _chain_of([s for s in ours if s.trace_id == trace_id])
                return (trace_id, ours) if hops else None

            trace_id, ours = wait_until(the_trace, 30, "the request's spans at the OTLP receiver")

        assert {s.trace_id for s in ours} == {trace_id}, "one kubectl request, one trace"
        trace = [s for s in ours if s.trace_id == trace_id]
        hops = _chain_of(trace)
        assert hops is not None
        proxy, relay, agent, authproxy = hops
        assert proxy.parent_span_id == "", "the client proxy's span is the root"
        assert relay.parent_span_id == proxy.span_id
        assert agent.parent_span_id == relay.span_id
        assert authproxy.parent_span_id == agent.span_id
        assert proxy.attributes["cluster"] == relay.attributes["cluster"] == agent.attributes["cluster"] == "dev"
        requests = [s for s in trace if s.service == "clusterconnect-aadproxy" and s.name.startswith("GET ")]
        assert requests and all(r.parent_span_id == authproxy.span_id for r in requests)
        ours_request = next(r for r in requests if r.attributes["http.route"] == ROUTE)
        assert ours_request.name == f"GET {ROUTE}"
        assert ours_request.attributes["http.request.method"] == "GET"
        assert ours_request.attributes["http.response.status_code"] == 200
        # No object name leaves in a span: the path is exported as its template only.
        assert not any("kube-system" in str(value) for s in trace for value in (s.name, *s.attributes.values()))


def test_a_collector_that_never_answers_blocks_neither_requests_nor_the_stop(
        devcluster, admin_sa_token, cluster_endpoint_kubeconfig, tmp_path):
    # A port that accepts and then says nothing: each export waits out its whole deadline.
    with links([("127.0.0.1", free_port())]) as (silent,):
        silent.cut()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{silent.port}",
               "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
        tunnel = Chain(tmp_path / "chain", cluster_endpoint_kubeconfig, env=env)
        kubeconfig = tmp_path / "kubeconfig"
        with tunnel.running(admin_sa_token, kubeconfig):
            for _ in range(3):  # each one's spans queue behind an export that is still waiting
                started = time.monotonic()
                out = kubectl(kubeconfig, "get", "--raw", PATH, env={"HOME": str(tmp_path)})
                assert '"kube-system"' in out.stdout
                assert time.monotonic() - started < 5, "a request waited for the exporter"
            for name in ("proxy", "agent", "aadproxy", "relay"):
                process = tunnel.processes[name]
                started = time.monotonic()
                process.stop(timeout=FLUSH_ON_STOP_SECONDS + 7)
                took = time.monotonic() - started
                assert process.returncode == 0, (name, process.returncode, process.tail())
                assert took < FLUSH_ON_STOP_SECONDS + 4, (name, took)


def test_the_exporter_names_the_environment_asks_for():
    assert exporter_names({}) == []  # nothing set: quiet
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp, console,otlp"}) == ["otlp", "console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) == []
    assert exporter_names({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == []
    with pytest.raises(StartupError, match="unknown exporter 'jaeger'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "jaeger"})


@pytest.mark.parametrize(("path", "template"), [
    ("/", "/"),
    ("/version", "/version"),
    ("/api", "/api"),
    ("/api/v1", "/api/v1"),
    ("/apis/apps/v1", "/apis/apps/v1"),
    ("/api/v1/namespaces", "/api/v1/namespaces"),
    ("/api/v1/namespaces/kube-system", "/api/v1/namespaces/{name}"),
    ("/api/v1/namespaces/old/finalize", "/api/v1/namespaces/{name}/finalize"),
    ("/api/v1/namespaces/default/pods", "/api/v1/namespaces/{namespace}/pods"),
    ("/api/v1/namespaces/default/pods/web-1", "/api/v1/namespaces/{namespace}/pods/{name}"),
    ("/api/v1/namespaces/default/pods/web-1/exec", "/api/v1/namespaces/{namespace}/pods/{name}/exec"),
    ("/api/v1/namespaces/default/services/web:80/proxy/healthz",
     "/api/v1/namespaces/{namespace}/services/{name}/proxy/{path}"),
    ("/apis/apps/v1/namespaces/default/deployments/web/scale",
     "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"),
    ("/api/v1/nodes/node-1", "/api/v1/nodes/{name}"),
    ("/api/v1/watch/namespaces/default/pods", "/api/v1/watch/namespaces/{namespace}/pods"),
    ("/openapi/v3/apis/apps/v1", "/openapi/v3/{path}"),
])
def test_a_request_path_becomes_its_template(path, template):
    assert route(path) == template
