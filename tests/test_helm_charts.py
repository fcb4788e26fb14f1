"""The Helm charts in deploy/helm/: lint, render, and what a real apiserver accepts.

helm is the one `make helm` builds from its Go module (tools/helm); the session fixture runs that make,
a no-op when the binary is up to date. deploy/k8s/ is the charts' output with default values.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "deploy" / "helm"
DEPLOY = ROOT / "deploy" / "k8s"
AGENT_CHART = CHARTS / "clusterconnect-agent"
RELAY_CHART = CHARTS / "clusterconnect-relay"

# Traces to a collector, with one more OTEL_* variable (docs/tracing.md).
TRACING = {"otlpEndpoint": "http://otel-collector.observability:4317",
           "env": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}}
TRACING_ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT": TRACING["otlpEndpoint"], **TRACING["env"]}

# Values that switch on every optional part of the agent chart.
AGENT_EVERYTHING = {
    "cluster": "prod-eu",
    "agent": {
        "relay": "https://relay.test:8443",
        "join": {"token": "canary-join-token-7f3a", "relayCAHash": "sha256:" + "ab" * 32},
        "relayCA": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "persistence": {"enabled": False},
    },
    "authProxy": {
        "tls": {"generate": True},
        "serviceAccountIssuers": ["https://kubernetes.default.svc"],
        "auditLog": "/var/log/clusterconnect/audit.log",
        "authentication": {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "AuthenticationConfiguration",
            "jwt": [{"issuer": {"url": "https://idp.test", "audiences": ["clusterconnect"]},
                     "claimMappings": {"username": {"claim": "sub", "prefix": "idp:"}}}],
        },
    },
    "tracing": TRACING,
}
RELAY_EVERYTHING = {
    "hostnames": ["relay.test", "10.9.8.7"],
    "tlsSecret": "relay-serving",
    "issuerURL": "https://issuer.relay.test",
    "accessTokenLifetime": 300,
    "signingKeyMaxAge": 0,
    "agentAdvertisePort": 443,
    "authentication": {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration",
                       "jwt": [{"issuer": {"url": "https://idp.test", "audiences": ["relay"]},
                                "claimMappings": {"username": {"claim": "sub", "prefix": "idp:"}}}]},
    "persistence": {"enabled": False},
    "service": {"type": "ClusterIP"},
    "tracing": TRACING,
}


@pytest.fixture(scope="session")
def helm() -> Path:
    subprocess.run(["make", "--no-print-directory", "-s", "-C", str(ROOT / "tools/helm")], check=True)
    return ROOT / "tools/helm/bin/helm"


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False)


def template(helm: Path, chart: Path, namespace: str, values: dict | None = None, tmp_path: Path | None = None) -> str:
    args = ["template", "clusterconnect", str(chart), "--namespace", namespace]
    if values is not None:
        assert tmp_path is not None
        values_file = tmp_path / f"{chart.name}-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["-f", str(values_file)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(rendered: str) -> dict[tuple[str, str], dict]:
    """(kind, name) -> object."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


# -- deploy/k8s is the rendered output ---------------------------------------------------------------


def test_deploy_k8s_is_the_charts_output_with_default_values(helm, tmp_path):
    subprocess.run([sys.executable, str(CHARTS / "render.py"), "--helm", str(helm), "--out", str(tmp_path)],
                   check=True)
    rendered = sorted(p.name for p in tmp_path.iterdir())
    assert rendered == ["aadproxy.yaml", "agent.yaml", "relay.yaml"]
    for name in rendered:
        assert (tmp_path / name).read_text() == (DEPLOY / name).read_text(), \
            f"deploy/k8s/{name} is stale: run `make manifests`"


def test_rendered_files_hold_one_component_each():
    agent = objects((DEPLOY / "agent.yaml").read_text())
    aadproxy = objects((DEPLOY / "aadproxy.yaml").read_text())
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in agent.values()} == {"agent"}
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in aadproxy.values()} == {"auth-proxy"}
    # The names (and so the selectors) of the manifests from before the charts.
    assert ("Deployment", "clusterconnect-agent") in agent
    assert ("Deployment", "clusterconnect-aadproxy") in aadproxy
    assert ("ClusterRole", "clusterconnect-aadproxy-impersonator") in aadproxy
    relay = objects((DEPLOY / "relay.yaml").read_text())
    assert relay[("Deployment", "clusterconnect-relay")]["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "clusterconnect-relay"}


# -- helm lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chart, values", [(AGENT_CHART, None), (AGENT_CHART, AGENT_EVERYTHING),
                                           (RELAY_CHART, None), (RELAY_CHART, RELAY_EVERYTHING)],
                         ids=["agent-defaults", "agent-everything", "relay-defaults", "relay-everything"])
def test_helm_lint_strict(helm, tmp_path, chart, values):
    args = ["lint", "--strict", str(chart)]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        args += ["-f", str(tmp_path / "values.yaml")]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_lint_fails_on_a_broken_chart(helm, tmp_path):
    # The canary for the lint test above: the same lint refuses a chart whose template does not parse.
    broken = tmp_path / "clusterconnect-relay"
    shutil.copytree(RELAY_CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("{{ if }}\n")
    result = run_helm(helm, "lint", "--strict", str(broken))
    assert result.returncode != 0
    assert "1 chart(s) failed" in result.stdout + result.stderr


@pytest.mark.parametrize("chart, values, complaint", [
    (AGENT_CHART, {"agent": {"warmStreams": 9}}, "/agent/warmStreams"),
    (AGENT_CHART, {"agent": {"warmStreamz": 1}}, "'warmStreamz' not allowed"),
    (AGENT_CHART, {"cluster": "Prod_EU"}, "/cluster"),
    (AGENT_CHART, {"agent": {"relay": "http://relay.test:8443"}}, "/agent/relay"),
    (AGENT_CHART, {"authProxy": {"authentication": {"jwt": []}}}, "/authProxy/authentication"),
    (RELAY_CHART, {"accessTokenLifetime": 901}, "/accessTokenLifetime"),
    (RELAY_CHART, {"issuerPort": 70000}, "/issuerPort"),
    (RELAY_CHART, {"logLevel": "verbose"}, "/logLevel"),
    (AGENT_CHART, {"authProxy": {"auditLog": "audit.log"}}, "/authProxy/auditLog"),
    (AGENT_CHART, {"authProxy": {"auditLog": "/audit.log"}}, "/authProxy/auditLog"),
    (AGENT_CHART, {"tracing": {"otlpEndpoint": "otel-collector:4317"}}, "/tracing/otlpEndpoint"),
    (RELAY_CHART, {"tracing": {"env": {"PATH": "/tmp"}}}, "invalid propertyName 'PATH'"),
], ids=["warm-streams", "typo", "cluster-name", "plain-http-relay", "empty-authn", "token-lifetime", "port",
        "log-level", "relative-audit-log", "audit-log-at-the-root", "otlp-endpoint-without-scheme",
        "not-an-otel-variable"])
def test_values_schema_refuses_what_the_services_would(helm, tmp_path, chart, values, complaint):
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    result = run_helm(helm, "template", "clusterconnect", str(chart), "-f", str(tmp_path / "values.yaml"))
    assert result.returncode != 0, result.stdout
    assert complaint in result.stderr, result.stderr


# -- what the agent chart renders ----------------------------------------------------------------------


def test_join_token_reaches_the_agent_only_through_its_secret(helm, tmp_path):
    rendered = template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path)
    token = AGENT_EVERYTHING["agent"]["join"]["token"]
    found = objects(rendered)
    secret = found[("Secret", "clusterconnect-agent")]
    assert secret["stringData"]["join-token"] == token
    others = [o for key, o in found.items() if key != ("Secret", "clusterconnect-agent")]
    assert token not in yaml.safe_dump_all(others)
    agent = found[("Deployment", "clusterconnect-agent")]
    assert env(agent)["CLUSTERCONNECT_JOIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "clusterconnect-agent"
    assert "args" not in container(agent)


def test_existing_join_secret_replaces_the_charts(helm, tmp_path):
    values = {"agent": {"join": {"existingSecret": "from-vault", "token": "", "relayCAHash": ""}}}
    found = objects(template(helm, AGENT_CHART, "cc", values, tmp_path))
    assert ("Secret", "clusterconnect-agent") not in found
    refs = env(found[("Deployment", "clusterconnect-agent")])
    assert refs["CLUSTERCONNECT_JOIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "from-vault"
    assert refs["CLUSTERCONNECT_RELAY_CA_HASH"]["valueFrom"]["secretKeyRef"]["name"] == "from-vault"


def test_agent_flags_and_volumes_follow_the_values(helm, tmp_path):
    found = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    agent = found[("Deployment", "clusterconnect-agent")]
    variables = env(agent)
    assert variables["CLUSTERCONNECT_RELAY"]["value"] == "https://relay.test:8443"
    assert variables["CLUSTERCONNECT_CLUSTER"]["value"] == "prod-eu"
    assert variables["CLUSTERCONNECT_AUTHPROXY"]["value"] == "clusterconnect-aadproxy.cc.svc:8443"
    volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    assert ("PersistentVolumeClaim", "clusterconnect-agent-state") not in found
    # --relay-ca: the bundle from a ConfigMap, at the path the flag names.
    assert variables["CLUSTERCONNECT_RELAY_CA"]["value"] == "/etc/clusterconnect/relay/ca.crt"
    assert volumes["relay-ca"]["configMap"]["name"] == "clusterconnect-agent-relay-ca"
    assert found[("ConfigMap", "clusterconnect-agent-relay-ca")]["data"]["ca.crt"] == \
        AGENT_EVERYTHING["agent"]["relayCA"]
    mounts = {m["name"]: m["mountPath"] for m in container(agent)["volumeMounts"]}
    assert mounts["relay-ca"] == "/etc/clusterconnect/relay"


def test_auth_proxy_oidc_mode_mounts_its_configuration(helm, tmp_path):
    found = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    proxy = found[("Deployment", "clusterconnect-aadproxy")]
    args = container(proxy)["args"]
    assert "--authentication-config=/etc/clusterconnect/authn/config.yaml" in args
    assert "--serviceaccount-issuer=https://kubernetes.default.svc" in args
    assert "--cluster=prod-eu" in args
    config = yaml.safe_load(found[("ConfigMap", "clusterconnect-aadproxy-authn")]["data"]["config.yaml"])
    assert config == AGENT_EVERYTHING["authProxy"]["authentication"]
    volumes = {v["name"]: v for v in proxy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["authn"]["configMap"]["name"] == "clusterconnect-aadproxy-authn"
    mounts = {m["name"]: m["mountPath"] for m in container(proxy)["volumeMounts"]}
    assert mounts["authn"] == "/etc/clusterconnect/authn"


def test_auth_proxy_rolls_when_its_oidc_configuration_changes(helm, tmp_path):
    def checksum(audience: str) -> str:
        values = yaml.safe_load(yaml.safe_dump(AGENT_EVERYTHING))
        values["authProxy"]["authentication"]["jwt"][0]["issuer"]["audiences"] = [audience]
        proxy = objects(template(helm, AGENT_CHART, "cc", values, tmp_path))[("Deployment", "clusterconnect-aadproxy")]
        return str(proxy["spec"]["template"]["metadata"]["annotations"]["checksum/authentication"])

    assert checksum("one") != checksum("two")
    assert checksum("one") == checksum("one")


def test_auth_proxy_audit_log_follows_the_value(helm, tmp_path):
    def proxy(values: dict | None) -> dict:
        return objects(template(helm, AGENT_CHART, "cc", values, tmp_path))[("Deployment", "clusterconnect-aadproxy")]

    default = proxy(None)
    assert not any(a.startswith("--audit-log") for a in container(default)["args"])
    to_stdout = proxy({"authProxy": {"auditLog": "-"}})
    assert "--audit-log=-" in container(to_stdout)["args"]
    assert "audit-log" not in {v["name"] for v in to_stdout["spec"]["template"]["spec"]["volumes"]}
    to_file = proxy(AGENT_EVERYTHING)
    assert "--audit-log=/var/log/clusterconnect/audit.log" in container(to_file)["args"]
    volumes = {v["name"]: v for v in to_file["spec"]["template"]["spec"]["volumes"]}
    assert volumes["audit-log"] == {"name": "audit-log", "emptyDir": {}}
    mounts = {m["name"]: m["mountPath"] for m in container(to_file)["volumeMounts"]}
    assert mounts["audit-log"] == "/var/log/clusterconnect"


def test_token_passthrough_by_default(helm):
    found = objects(template(helm, AGENT_CHART, "cc"))
    proxy = found[("Deployment", "clusterconnect-aadproxy")]
    assert not any(a.startswith("--authentication-config") for a in container(proxy)["args"])
    assert not any(kind == "ConfigMap" for kind, _ in found)
    # The pod template has no annotations, so nothing rolls it but a change of the template itself.
    assert "annotations" not in proxy["spec"]["template"]["metadata"]


def projected_serviceaccount(proxy: dict) -> list[dict]:
    volumes = proxy["spec"]["template"]["spec"]["volumes"]
    return list(next(v for v in volumes if v["name"] == "serviceaccount")["projected"]["sources"])


def test_auth_proxy_token_is_projected_in_oidc_mode_only(helm, tmp_path):
    oidc = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    assert oidc[("ServiceAccount", "clusterconnect-aadproxy")]["automountServiceAccountToken"] is False
    proxy = oidc[("Deployment", "clusterconnect-aadproxy")]
    assert proxy["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    sources = projected_serviceaccount(proxy)
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token == {"path": "token", "expirationSeconds": 3600}
    files = [s.get("configMap") or s.get("downwardAPI") or {} for s in sources]
    assert {item["path"] for f in files for item in f.get("items", [])} == {"ca.crt", "namespace"}
    mounts = {m["name"]: m["mountPath"] for m in container(proxy)["volumeMounts"]}
    # Where aadproxy/apiserver.py in_cluster() reads them.
    assert mounts["serviceaccount"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    # Token passthrough: the cluster's CA, and no credential of the proxy's own.
    passthrough = objects(template(helm, AGENT_CHART, "cc"))[("Deployment", "clusterconnect-aadproxy")]
    assert passthrough["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert not any("serviceAccountToken" in s for s in projected_serviceaccount(passthrough))
    assert any(s.get("configMap", {}).get("name") == "kube-root-ca.crt" for s in projected_serviceaccount(passthrough))


def _verify(ca: x509.Certificate, cert: x509.Certificate) -> None:
    key = ca.public_key()
    assert cert.signature_hash_algorithm is not None
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_generated_auth_proxy_certificate_names_the_service_and_chains_to_its_ca(helm, tmp_path):
    found = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    secret = found[("Secret", "clusterconnect-aadproxy-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    # The name the agent dials (CLUSTERCONNECT_AUTHPROXY) is on the certificate.
    dialled = env(found[("Deployment", "clusterconnect-agent")])["CLUSTERCONNECT_AUTHPROXY"]["value"]
    assert dialled.rsplit(":", 1)[0] in names
    _verify(ca, cert)
    assert b"PRIVATE KEY" in data["tls.key"]
    # The agent trusts exactly this Secret's CA.
    agent_volumes = found[("Deployment", "clusterconnect-agent")]["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in agent_volumes if v["name"] == "aadproxy-ca")["secret"]["secretName"] == \
        "clusterconnect-aadproxy-tls"


def test_auth_proxy_keeps_one_replica_through_disruptions(helm):
    found = objects(template(helm, AGENT_CHART, "cc"))
    budget = found[("PodDisruptionBudget", "clusterconnect-aadproxy")]
    proxy = found[("Deployment", "clusterconnect-aadproxy")]
    assert proxy["spec"]["replicas"] - budget["spec"]["maxUnavailable"] >= 1
    assert budget["spec"]["selector"]["matchLabels"] == proxy["spec"]["selector"]["matchLabels"]
    # No budget for the single agent: it would block every node drain.
    assert not any(kind == "PodDisruptionBudget" and "agent" in name.removeprefix("clusterconnect-aadproxy")
                   for kind, name in found)


def test_impersonation_role_grants_nothing_but_impersonation_and_reviews(helm, tmp_path):
    found = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    role = found[("ClusterRole", "clusterconnect-aadproxy-impersonator")]
    verbs = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
             for resource in rule["resources"] for verb in rule["verbs"]}
    assert {v for _, _, v in verbs} == {"impersonate", "create"}
    assert {(g, r) for g, r, v in verbs if v == "create"} == {("authorization.k8s.io", "subjectaccessreviews")}
    binding = found[("ClusterRoleBinding", "clusterconnect-aadproxy-impersonator")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "clusterconnect-aadproxy", "namespace": "cc"}]


def test_token_passthrough_binds_no_role(helm):
    found = objects(template(helm, AGENT_CHART, "cc"))
    # The role is there (tests and operators read it from deploy/k8s/aadproxy.yaml), bound to nobody.
    assert ("ClusterRole", "clusterconnect-aadproxy-impersonator") in found
    assert not [key for key in found if key[0] in ("ClusterRoleBinding", "RoleBinding")]


# -- what the relay chart renders ----------------------------------------------------------------------


def test_relay_ports_are_distinct_and_match_the_service(helm):
    found = objects(template(helm, RELAY_CHART, "relay"))
    relay = found[("Deployment", "clusterconnect-relay")]
    args = container(relay)["args"]
    listens = {a.split("=", 1)[0]: a.rsplit(":", 1)[1] for a in args if "-listen=" in a}
    assert listens == {"--listen": "8443", "--agent-listen": "8444", "--issuer-listen": "8445",
                       "--metrics-listen": "9443", "--peer-listen": "8446"}
    ports = {p["name"]: p["containerPort"] for p in container(relay)["ports"]}
    assert sorted(ports.values()) == sorted(int(p) for p in listens.values())
    # The metrics port is the pod's, for the kubelet's probes and Prometheus, and the peer port is for the
    # other replicas (pod to pod); the Service (the public's) has the other three.
    assert ports.pop("metrics") == 9443
    assert ports.pop("peer") == 8446
    probes = container(relay)
    assert probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service_ports = found[("Service", "clusterconnect-relay")]["spec"]["ports"]
    service = {p["name"]: (p["port"], p["targetPort"]) for p in service_ports}
    assert service == {name: (port, name) for name, port in ports.items()}


def test_relay_optional_flags_only_when_set(helm, tmp_path):
    defaults = container(objects(template(helm, RELAY_CHART, "relay"))[("Deployment", "clusterconnect-relay")])["args"]
    assert not any(a.startswith(("--issuer-url", "--access-token-lifetime", "--tls-cert", "--authentication-config"))
                   for a in defaults)
    found = objects(template(helm, RELAY_CHART, "relay", RELAY_EVERYTHING, tmp_path))
    relay = found[("Deployment", "clusterconnect-relay")]
    args = container(relay)["args"]
    for flag in ("--hostname=relay.test", "--hostname=10.9.8.7", "--issuer-url=https://issuer.relay.test",
                 "--access-token-lifetime=300", "--signing-key-max-age=0", "--agent-advertise-port=443",
                 "--tls-cert=/etc/clusterconnect/tls/tls.crt", "--tls-key=/etc/clusterconnect/tls/tls.key",
                 "--authentication-config=/etc/clusterconnect/authn/config.yaml"):
        assert flag in args
    assert not any(a.startswith(("--token-audience", "--clock-skew-seconds")) for a in args)
    volumes = {v["name"]: v for v in relay["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "relay-serving"
    assert yaml.safe_load(found[("ConfigMap", "clusterconnect-relay-authn")]["data"]["config.yaml"]) == \
        RELAY_EVERYTHING["authentication"]


def test_tracing_variables_reach_every_container_only_when_set(helm, tmp_path):
    def otel(deployment: dict) -> dict[str, str]:
        return {name: v["value"] for name, v in env(deployment).items() if name.startswith("OTEL_")}

    agent_defaults = objects(template(helm, AGENT_CHART, "cc"))
    relay_defaults = objects(template(helm, RELAY_CHART, "relay"))
    for deployment in [o for o in (*agent_defaults.values(), *relay_defaults.values()) if o["kind"] == "Deployment"]:
        assert otel(deployment) == {}, deployment["metadata"]["name"]
    agent = objects(template(helm, AGENT_CHART, "cc", {"tracing": TRACING}, tmp_path))
    assert otel(agent[("Deployment", "clusterconnect-agent")]) == TRACING_ENV
    assert otel(agent[("Deployment", "clusterconnect-aadproxy")]) == TRACING_ENV
    for store in ("etcd", "sqlite"):  # with etcd the relay has variables of its own beside them
        relay = objects(template(helm, RELAY_CHART, "relay", {"store": store, "tracing": TRACING}, tmp_path))
        assert otel(relay[("Deployment", "clusterconnect-relay")]) == TRACING_ENV, store


# -- the services take what the charts give them ------------------------------------------------------


def parsed(deployment: dict, parse_args, monkeypatch) -> argparse.Namespace:
    """The service's own argument parser on the container's argv and plain environment (a Secret's
    variables get a stand-in value)."""
    for name in list(os.environ):
        if name.startswith("CLUSTERCONNECT_"):
            monkeypatch.delenv(name)
    for name, variable in env(deployment).items():
        monkeypatch.setenv(name, variable.get("value", f"from-secret-{name}"))
    return parse_args(container(deployment)["command"][1:] + container(deployment).get("args", []))


def test_the_relay_parses_its_deployment(helm, tmp_path, monkeypatch):
    from clusterconnect.relay.main import parse_args

    found = objects(template(helm, RELAY_CHART, "relay", RELAY_EVERYTHING, tmp_path))
    relay = found[("Deployment", "clusterconnect-relay")]
    args = parsed(relay, parse_args, monkeypatch)
    assert (args.listen, args.agent_listen, args.issuer_listen) == ("0.0.0.0:8443", "0.0.0.0:8444", "0.0.0.0:8445")
    assert args.hostname == ["relay.test", "10.9.8.7"]
    assert (args.access_token_lifetime, args.signing_key_max_age, args.agent_advertise_port) == (300, 0, 443)
    # Inside the data volume, but not its mount point (which the relay could not chmod 700).
    mount = Path(next(m["mountPath"] for m in container(relay)["volumeMounts"] if m["name"] == "data"))
    assert args.data_dir.parent == mount


def test_the_relay_by_default_is_3_replicas_on_etcd_that_drain_and_parse_their_flags(helm, tmp_path, monkeypatch):
    from clusterconnect.relay.main import parse_args

    found = objects(template(helm, RELAY_CHART, "relay"))
    relay = found[("Deployment", "clusterconnect-relay")]
    spec, pod = relay["spec"], relay["spec"]["template"]["spec"]
    assert spec["replicas"] == 3 and spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert found[("PodDisruptionBudget", "clusterconnect-relay")]["spec"]["maxUnavailable"] == 1
    assert ("PersistentVolumeClaim", "clusterconnect-relay") not in found  # the state is in etcd
    args = parsed(relay, parse_args, monkeypatch)
    assert args.store == "etcd" and args.etcd_endpoints.count("https://") == 3
    assert (args.replica_name, args.peer_advertise) == ("$(POD_NAME)", "$(POD_IP):8446")  # kubelet expands them
    assert args.peer_server_name == "clusterconnect-relay-peer"
    # Every file a flag names is in a mounted Secret, the sealing key readable by the relay alone.
    mounts = {m["mountPath"]: m["name"] for m in container(relay)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (args.etcd_ca, args.etcd_cert, args.etcd_key, args.sealing_key_file, args.peer_ca, args.peer_cert,
                 args.peer_key):
        volume = volumes[mounts[str(Path(path).parent)]]
        assert "secret" in volume and volume["secret"]["defaultMode"] == 0o400, (path, volume)
    # Room for the preStop pause, the Drain spread and the connections' grace.
    pre_stop = container(relay)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.drain_seconds + args.shutdown_grace_seconds
    assert {"name": "peer", "containerPort": 8446} in container(relay)["ports"]


def test_the_relay_on_sqlite_is_one_replica_on_its_volume(helm, tmp_path):
    found = objects(template(helm, RELAY_CHART, "relay", {"store": "sqlite"}, tmp_path))
    relay = found[("Deployment", "clusterconnect-relay")]
    assert relay["spec"]["replicas"] == 1 and relay["spec"]["strategy"] == {"type": "Recreate"}
    assert ("PodDisruptionBudget", "clusterconnect-relay") not in found
    assert ("PersistentVolumeClaim", "clusterconnect-relay") in found
    assert not any(a.startswith(("--store", "--peer", "--etcd")) for a in container(relay)["args"])


def test_the_agent_and_auth_proxy_parse_their_deployments(helm, tmp_path, monkeypatch):
    from clusterconnect.aadproxy.main import parse_args as aadproxy_args
    from clusterconnect.agent.main import parse_args as agent_args

    found = objects(template(helm, AGENT_CHART, "cc", AGENT_EVERYTHING, tmp_path))
    agent = parsed(found[("Deployment", "clusterconnect-agent")], agent_args, monkeypatch)
    assert (agent.relay, agent.cluster, agent.warm_streams) == ("https://relay.test:8443", "prod-eu", 2)
    assert agent.join_token == "from-secret-CLUSTERCONNECT_JOIN_TOKEN"
    assert str(agent.relay_ca) == "/etc/clusterconnect/relay/ca.crt"
    proxy = parsed(found[("Deployment", "clusterconnect-aadproxy")], aadproxy_args, monkeypatch)
    assert proxy.listen == "0.0.0.0:8443"
    assert proxy.serviceaccount_issuer == ["https://kubernetes.default.svc"]
    assert proxy.authentication_config == "/etc/clusterconnect/authn/config.yaml"
    assert proxy.audit_log == "/var/log/clusterconnect/audit.log"


# -- a real apiserver accepts the output ---------------------------------------------------------------


@pytest.mark.parametrize("chart, namespace, values", [
    (AGENT_CHART, "clusterconnect-helm", None), (AGENT_CHART, "clusterconnect-helm", AGENT_EVERYTHING),
    (RELAY_CHART, "clusterconnect-helm-relay", None), (RELAY_CHART, "clusterconnect-helm-relay", RELAY_EVERYTHING),
], ids=["agent-defaults", "agent-everything", "relay-defaults", "relay-everything"])
def test_helm_template_passes_server_side_dry_run(devcluster, helm, tmp_path, chart, namespace, values):
    devcluster.kubectl("create", "namespace", namespace, check=False)
    rendered = template(helm, chart, namespace, values, tmp_path)
    result = devcluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(objects(rendered)), result.stdout


def test_server_side_dry_run_rejects_what_the_apiserver_would(devcluster, helm, tmp_path):
    # The canary for the dry run above: a value the chart's schema lets through but the apiserver
    # refuses (an annotation key with a space) fails it.
    namespace = "clusterconnect-helm-relay"
    devcluster.kubectl("create", "namespace", namespace, check=False)
    rendered = template(helm, RELAY_CHART, namespace, {"podAnnotations": {"not a key": "x"}}, tmp_path)
    result = devcluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert result.returncode != 0
    assert "not a key" in result.stderr, result.stderr


def test_rendering_with_default_values_is_deterministic(helm):
    # No random names or certificates unless asked for: the staleness test relies on it.
    renders = [template(helm, AGENT_CHART, "clusterconnect") + template(helm, RELAY_CHART, "clusterconnect-relay")
               for _ in range(2)]
    assert renders[0] == renders[1]


RESTRICTED = "clusterconnect-helm-restricted"


def restricted_namespace(devcluster, rendered: dict[tuple[str, str], dict]) -> None:
    """The namespace, labelled like deploy/k8s/namespace.yaml, with the chart's ServiceAccounts created for
    real (the ServiceAccount admission refuses a pod whose account does not exist, even in a dry run)."""
    devcluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": RESTRICTED, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    for obj in rendered.values():
        if obj["kind"] == "ServiceAccount":
            devcluster.apply(obj)


def dry_run_pod(devcluster, deployment: dict) -> subprocess.CompletedProcess[str]:
    """The Deployment's pod, as its ReplicaSet would create it, through the apiserver's PodSecurity admission."""
    template_ = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": deployment["metadata"]["name"], "namespace": RESTRICTED,
                        "labels": template_["metadata"]["labels"]},
           "spec": template_["spec"]}
    return devcluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod), check=False)


@pytest.mark.parametrize("chart, values", [(AGENT_CHART, None), (AGENT_CHART, AGENT_EVERYTHING),
                                           (RELAY_CHART, None), (RELAY_CHART, RELAY_EVERYTHING)],
                         ids=["agent-defaults", "agent-everything", "relay-defaults", "relay-everything"])
def test_every_pod_meets_the_restricted_pod_security_level(devcluster, helm, tmp_path, chart, values):
    rendered = objects(template(helm, chart, RESTRICTED, values, tmp_path))
    restricted_namespace(devcluster, rendered)
    deployments = [o for o in rendered.values() if o["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        result = dry_run_pod(devcluster, deployment)
        assert result.returncode == 0, result.stderr
        assert "(server dry run)" in result.stdout and "Warning" not in result.stderr, result.stderr


def test_restricted_level_refuses_a_pod_that_breaks_it(devcluster, helm):
    # The canary for the test above: the same dry run refuses the agent's pod once it may escalate.
    rendered = objects(template(helm, AGENT_CHART, RESTRICTED))
    restricted_namespace(devcluster, rendered)
    agent = rendered[("Deployment", "clusterconnect-agent")]
    container(agent)["securityContext"]["allowPrivilegeEscalation"] = True
    result = dry_run_pod(devcluster, agent)
    assert result.returncode != 0
    assert "allowPrivilegeEscalation != false" in result.stderr, result.stderr
