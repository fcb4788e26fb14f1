"""A minimal HTTPS client for load-style tests through the client proxy (http.client from the stdlib)."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import tempfile
from pathlib import Path

import yaml


class Endpoint:
    """Server, CA, client certificate and token of a kubeconfig's current context (as written by
    `clusterconnect proxy`), or another token."""

    def __init__(self, kubeconfig: Path, token: str | None = None) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context = next(c for c in config["contexts"] if c["name"] == config["current-context"])["context"]
        cluster = next(c for c in config["clusters"] if c["name"] == context["cluster"])["cluster"]
        user = next(u for u in config["users"] if u["name"] == context["user"])["user"]
        self.host, port = cluster["server"].removeprefix("https://").rsplit(":", 1)
        self.port = int(port)
        self.ssl = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        certificate = client_certificate(user)
        if certificate is not None:
            load_client_certificate(self.ssl, *certificate)
        token = token or user.get("token") or Path(user["tokenFile"]).read_text().strip()
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def connect(self, timeout: float = 30) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ssl, timeout=timeout)

    def get_json(self, conn: http.client.HTTPSConnection, path: str) -> dict:
        conn.request("GET", path, headers=self.headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"GET {path}: {response.status} {body[:300]!r}")
        return json.loads(body)

    def one_request(self, path: str = "/version") -> int:
        """GET ``path`` on a connection of its own (``Connection: close``); the response status."""
        return self.one_exchange(path)[0]

    def one_exchange(self, path: str = "/version") -> tuple[int, bytes]:
        """GET ``path`` on a connection of its own (``Connection: close``); the response status and body."""
        conn = self.connect()
        try:
            conn.request("GET", path, headers={**self.headers, "Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def create_configmaps(self, name: str, count: int, size: int) -> str:
        """``count`` ConfigMaps of ``size`` bytes each in namespace default, labelled ``name=1`` (existing
        ones kept), for a LIST big enough to still be downloading when a client resets; the label selector."""
        conn = self.connect()
        try:
            for i in range(count):
                item = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"v": "x" * size},
                        "metadata": {"name": f"{name}-{i}", "namespace": "default", "labels": {name: "1"}}}
                conn.request("POST", "/api/v1/namespaces/default/configmaps", body=json.dumps(item),
                             headers={**self.headers, "Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                assert response.status in (201, 409), response.status
        finally:
            conn.close()
        return f"{name}%3D1"


def client_certificate(user: dict) -> tuple[bytes, bytes] | None:
    """(certificate, key) PEM of a kubeconfig user, found where kubectl finds them: in the user, or in
    the ExecCredential its exec plugin prints."""
    if user.get("client-certificate-data"):
        return base64.b64decode(user["client-certificate-data"]), base64.b64decode(user["client-key-data"])
    if user.get("exec"):
        plugin = user["exec"]
        out = subprocess.run([plugin["command"], *plugin.get("args", [])], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        status = json.loads(out)["status"]
        if status.get("clientCertificateData"):
            return status["clientCertificateData"].encode(), status["clientKeyData"].encode()
    return None


def load_client_certificate(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """ssl loads a certificate from files only: through a private directory that is gone afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory) / "client.crt", Path(directory) / "client.key"
        cert.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        context.load_cert_chain(cert, key)
