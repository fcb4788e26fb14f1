"""A real OIDC provider for the identity tests: Ory Hydra (tests/devcluster/bin/hydra), in memory, TLS.

Build it with ``make -C tests/devcluster/oidc`` (the fixture builds it when the binary is missing).
Hydra serves its public and admin APIs over HTTPS on two free loopback ports, with a certificate from
a CA generated here. Tokens for test users come from the real authorization code flow, run
headlessly: the login and consent challenges are accepted through Hydra's admin API (subject and
id_token claims set there), then the code is exchanged at the token endpoint.

The signing key of Hydra's id-token key set is replaced by one this fixture generated (Hydra's admin
API), so tests can also sign tokens that are well-formed and correctly signed but wrong in exactly
one respect (expired, wrong audience, ...): only the signature key is shared, Hydra still publishes
it through discovery + JWKS as usual.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from clusterconnect.pki import ensure_ca_and_server_cert

ROOT = Path(__file__).resolve().parent.parent
HYDRA = ROOT / "tests" / "devcluster" / "bin" / "hydra"
REDIRECT_URI = "https://127.0.0.1:9/callback"  # never contacted: the code is read from the redirect
ID_TOKEN_KEY_SET = "hydra.openid.id-token"

__all__ = ["Hydra", "oidc_provider", "oidc_provider_jwt_access_tokens", "build_hydra", "create_machine_client"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_hydra() -> Path:
    """The hydra binary, built with ``make -C tests/devcluster/oidc`` if missing."""
    if not HYDRA.exists():
        subprocess.run(["make", "-C", str(ROOT / "tests" / "devcluster" / "oidc")], check=True, timeout=1800)
    return HYDRA


@dataclass
class Hydra:
    state_dir: Path
    public_port: int = 0
    admin_port: int = 0
    process: subprocess.Popen | None = None
    client_id: str = ""
    client_secret: str = ""
    signing_key: rsa.RSAPrivateKey | None = None
    kid: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"https://127.0.0.1:{self.admin_port}"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()

    @property
    def log(self) -> Path:
        return self.state_dir / "hydra.log"

    # ---- process ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        binary = build_hydra()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _, cert, key = ensure_ca_and_server_cert(self.state_dir / "pki", "clusterconnect test OIDC CA", ["127.0.0.1"])
        self.public_port = self.public_port or _free_port()
        self.admin_port = self.admin_port or _free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.state_dir),
            "DSN": "memory",
            "URLS_SELF_ISSUER": self.issuer,
            "URLS_LOGIN": "https://127.0.0.1:9/login",
            "URLS_CONSENT": "https://127.0.0.1:9/consent",
            "SERVE_PUBLIC_HOST": "127.0.0.1",
            "SERVE_PUBLIC_PORT": str(self.public_port),
            "SERVE_ADMIN_HOST": "127.0.0.1",
            "SERVE_ADMIN_PORT": str(self.admin_port),
            "SERVE_TLS_ENABLED": "true",
            "SERVE_TLS_CERT_PATH": str(cert),
            "SERVE_TLS_KEY_PATH": str(key),
            "SECRETS_SYSTEM": secrets.token_hex(24),
            "LOG_LEVEL": "warn",
            "LOG_LEAK_SENSITIVE_VALUES": "false",
            **self.extra_env,
        }
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                [str(binary), "serve", "all", "--sqa-opt-out"],
                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"hydra exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if self._get(f"{self.issuer}/.well-known/openid-configuration").status_code == 200 and \
                        self._get(f"{self.admin_url}/health/ready").status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hydra did not become ready in {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.install_signing_key()
        self.create_client()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # ---- admin API -------------------------------------------------------------------------

    def _get(self, url: str, **kwargs) -> requests.Response:
        return requests.get(url, verify=str(self.ca_file), timeout=10, **kwargs)

    def _admin(self, method: str, path: str, **kwargs) -> dict:
        response = requests.request(method, self.admin_url + path, verify=str(self.ca_file), timeout=10, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"hydra admin {method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    def install_signing_key(self) -> None:
        """Replace the id-token signing key set by a key this fixture holds."""
        self.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-" + secrets.token_hex(6)
        private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.signing_key))
        private.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        self._admin("PUT", f"/admin/keys/{ID_TOKEN_KEY_SET}", json={"keys": [private]})
        published = self._get(f"{self.issuer}/.well-known/jwks.json").json()["keys"]
        assert self.kid in [k.get("kid") for k in published], "installed key is not published"

    def create_client(self) -> None:
        self.client_secret = secrets.token_urlsafe(24)
        client = self._admin("POST", "/admin/clients", json={
            "client_name": "clusterconnect-tests",
            "client_secret": self.client_secret,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "scope": "openid offline_access email",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "client_secret_post",
        })
        self.client_id = client["client_id"]

    def jwks(self) -> dict:
        return self._get(f"{self.issuer}/.well-known/jwks.json").json()

    # ---- tokens ----------------------------------------------------------------------------

    def login(self, subject: str, groups: list[str] | None = None, claims: dict | None = None) -> str:
        """An id_token for ``subject`` through the authorization code flow (no browser)."""
        browser = requests.Session()
        browser.verify = str(self.ca_file)
        state, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
        location = self._redirect(browser, f"{self.issuer}/oauth2/auth?" + urlencode({
            "client_id": self.client_id, "response_type": "code", "scope": "openid email",
            "redirect_uri": REDIRECT_URI, "state": state, "nonce": nonce,
        }))
        challenge = _query(location, "login_challenge")
        accepted = self._admin("PUT", "/admin/oauth2/auth/requests/login/accept",
                               params={"login_challenge": challenge}, json={"subject": subject})
        location = self._redirect(browser, accepted["redirect_to"])
        challenge = _query(location, "consent_challenge")
        id_claims = {"groups": list(groups or []), **(claims or {})}
        accepted = self._admin("PUT", "/admin/oauth2/auth/requests/consent/accept",
                               params={"consent_challenge": challenge},
                               json={"grant_scope": ["openid", "email"], "session": {"id_token": id_claims}})
        location = self._redirect(browser, accepted["redirect_to"])
        assert location.startswith(REDIRECT_URI), location
        assert _query(location, "state") == state
        code = _query(location, "code")
        response = requests.post(f"{self.issuer}/oauth2/token", verify=str(self.ca_file), timeout=10, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "client_id": self.client_id, "client_secret": self.client_secret,
        })
        assert response.status_code == 200, response.text[:500]
        return response.json()["id_token"]

    def _redirect(self, browser: requests.Session, url: str) -> str:
        """Follow redirects inside Hydra until one leaves it; return that location."""
        for _ in range(10):
            response = browser.get(url, allow_redirects=False, timeout=10, verify=str(self.ca_file))
            assert response.status_code in (302, 303), f"{response.status_code}: {response.text[:300]}"
            url = response.headers["location"]
            if not url.startswith(self.issuer):
                return url
        raise AssertionError("too many redirects")

    def sign(self, claims: dict, *, headers: dict | None = None, key=None, algorithm: str = "RS256") -> str:
        """A token signed with the provider's published key (or ``key``), for crafted cases."""
        return jwt.encode(claims, key or self.signing_key, algorithm=algorithm,
                          headers={"kid": self.kid, **(headers or {})})

    def claims(self, **overrides) -> dict:
        """Valid id_token claims for alice, changed by ``overrides`` (value None removes a claim)."""
        now = int(time.time())
        base = {"iss": self.issuer, "aud": [self.client_id], "sub": "alice", "groups": ["dev"],
                "iat": now, "exp": now + 600, "nbf": now - 5}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}


def create_machine_client(hydra: Hydra, audience: str) -> tuple[str, str]:
    """A client for the client credentials grant (CI), allowed to ask for ``audience``; (id, secret)."""
    secret = secrets.token_urlsafe(24)
    client = hydra._admin("POST", "/admin/clients", json={
        "client_name": "clusterconnect-ci", "client_secret": secret, "grant_types": ["client_credentials"],
        "response_types": ["token"], "audience": [audience], "scope": "",
        "token_endpoint_auth_method": "client_secret_post",
    })
    return client["client_id"], secret


@pytest.fixture(scope="session")
def oidc_provider_jwt_access_tokens(tmp_path_factory) -> Hydra:
    """A second Hydra whose access tokens are JWTs (strategies.access_token=jwt): client credentials tokens
    that a relay or auth proxy can verify."""
    hydra = Hydra(tmp_path_factory.mktemp("hydra-jwt"), extra_env={"STRATEGIES_ACCESS_TOKEN": "jwt"})
    try:
        hydra.start()
        yield hydra
    finally:
        hydra.stop()


def _query(url: str, name: str) -> str:
    values = parse_qs(urlparse(url).query).get(name)
    assert values, f"no {name} in redirect"
    return values[0]


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory) -> Hydra:
    """A running Hydra (real OIDC provider) with a client and a known signing key."""
    hydra = Hydra(tmp_path_factory.mktemp("hydra"))
    try:
        hydra.start()
        yield hydra
    finally:
        hydra.stop()
