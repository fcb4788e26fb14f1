"""clusterconnect.oidc and the auth proxy's OIDC authenticator, without network (fake discovery/JWKS)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from clusterconnect.aadproxy.authn import Forward, Reject
from clusterconnect.aadproxy.kubeapi import ResourceAttributes
from clusterconnect.aadproxy.oidc_authn import (
    ImpersonationRequest,
    OIDCAuthenticator,
    extract_token,
    identity_headers,
    without_credentials,
)
from clusterconnect.oidc import (
    ConfigError,
    Identity,
    IssuerKeys,
    NotAJWT,
    TokenError,
    UnknownIssuer,
    Verifier,
    parse_config,
    unverified_issuer,
)

ISSUER = "https://issuer.test"
OTHER = "https://other.test"
AUD = "cluster-a"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def document(**jwt_entry) -> dict:
    entry = {
        "issuer": {"url": ISSUER, "audiences": [AUD]},
        "claimMappings": {"username": {"claim": "sub", "prefix": "oidc:"},
                          "groups": {"claim": "groups", "prefix": "oidc:"}},
    }
    entry.update(jwt_entry)
    return {"apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration", "jwt": [entry]}


class FakeIssuer:
    """Discovery + JWKS served from memory; counts fetches."""

    def __init__(self, url: str = ISSUER) -> None:
        self.url = url
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published = [self.jwk(self.rsa, "rsa1", "RS256"), self.jwk(self.ec, "ec1", "ES256")]
        self.discovery_issuer = url
        self.fetched: list[str] = []

    @staticmethod
    def jwk(key, kid: str, alg: str) -> dict:
        algo = jwt.algorithms.RSAAlgorithm if alg[:2] in ("RS", "PS") else jwt.algorithms.ECAlgorithm
        data = json.loads(algo.to_jwk(key.public_key()))
        data.update({"kid": kid, "alg": alg, "use": "sig"})
        return data

    async def fetch(self, url: str, ca: str | None) -> dict:
        self.fetched.append(url)
        if url == self.url + "/.well-known/openid-configuration":
            return {"issuer": self.discovery_issuer, "jwks_uri": self.url + "/jwks"}
        if url == self.url + "/jwks":
            return {"keys": self.published}
        raise AssertionError(url)

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        base = {"iss": self.url, "aud": AUD, "sub": "alice", "groups": ["dev"], "iat": now, "exp": now + 300}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, alg: str = "RS256", kid: str = "rsa1", key=None, **overrides) -> str:
        if key is None:
            key = self.ec if alg.startswith("ES") else self.rsa
        return jwt.encode(self.claims(**overrides), key, algorithm=alg, headers={"kid": kid})


def verifier_for(issuer: FakeIssuer, **entry) -> Verifier:
    return Verifier(parse_config(document(**entry)), fetch=issuer.fetch)


def verify(verifier: Verifier, token: str) -> Identity:
    return asyncio.run(verifier.verify(token))


# ---- configuration ------------------------------------------------------------------------------


def test_config_parses_kube_apiserver_shape() -> None:
    config = parse_config(document(
        claimValidationRules=[{"claim": "hd", "requiredValue": "example.com"}],
        claimMappings={
            "username": {"claim": "email", "prefix": ""},
            "groups": {"claim": "roles", "prefix": "r:"},
            "uid": {"claim": "oid"},
            "extra": [{"key": "example.org/tenant", "valueExpression": "claims.tid"}],
        },
    ))
    issuer = config.issuers[0]
    assert issuer.url == ISSUER and issuer.audiences == (AUD,)
    assert issuer.username.claim == "email" and issuer.groups.prefix == "r:" and issuer.uid == "oid"
    assert issuer.extra[0].claim == "tid" and issuer.claim_validation_rules[0].required_value == "example.com"


@pytest.mark.parametrize("change, message", [
    ({"issuer": {"url": "http://issuer.test", "audiences": [AUD]}}, "https"),
    ({"issuer": {"url": ISSUER, "audiences": []}}, "audiences"),
    ({"claimMappings": {"username": {"claim": "sub"}}}, "prefix"),
    ({"claimMappings": {"username": {"expression": "claims.sub"}}}, "CEL"),
    ({"claimMappings": {"username": {"claim": "sub", "prefix": ""},
                        "extra": [{"key": "example.org/x", "valueExpression": "claims.a + claims.b"}]}}, "claims.NAME"),
])
def test_config_errors_are_clear(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(document(**change))


def test_config_rejects_duplicate_issuers() -> None:
    doc = document()
    doc["jwt"].append(doc["jwt"][0])
    with pytest.raises(ConfigError, match="twice"):
        parse_config(doc)


# ---- verification -------------------------------------------------------------------------------


def test_valid_tokens_map_claims() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(issuer)
    assert verify(verifier, issuer.token()) == Identity("oidc:alice", ("oidc:dev",), None, {}, ISSUER, subject="alice")
    assert verify(verifier, issuer.token(alg="ES256", kid="ec1")).username == "oidc:alice"
    # audience as a list, one of them ours
    assert verify(verifier, issuer.token(aud=["x", AUD])).username == "oidc:alice"


def test_uid_extra_and_claim_rules() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(
        issuer,
        claimValidationRules=[{"claim": "tenant", "requiredValue": "t1"}],
        claimMappings={"username": {"claim": "sub", "prefix": ""}, "uid": {"claim": "oid"},
                       "extra": [{"key": "example.org/tenant", "valueExpression": 'claims["tenant"]'}]},
    )
    identity = verify(verifier, issuer.token(tenant="t1", oid="u-1"))
    assert identity == Identity("alice", (), "u-1", {"example.org/tenant": ("t1",)}, ISSUER, subject="alice")
    assert identity.expires_unix is not None and identity.expires_unix > time.time()
    with pytest.raises(TokenError, match="required value"):
        verify(verifier, issuer.token(tenant="t2"))


@pytest.mark.parametrize("overrides, message", [
    # Times are offsets from when the test runs (parameters are made at collection, minutes earlier).
    ({"exp": -120}, "expired"),
    ({"nbf": 300}, "not valid yet"),
    ({"iat": 300}, "not valid yet"),
    ({"aud": "someone-else"}, "audience"),
    ({"exp": None}, "exp"),
    ({"aud": None}, "aud"),
    ({"sub": "system:admin"}, None),  # mapped with prefix: oidc:system:admin is fine
    ({"groups": ["system:masters"]}, None),  # mapped with prefix: oidc:system:masters is fine
    ({"groups": "dev"}, None),  # one group as a string
    ({"groups": [1]}, "groups"),
])
def test_claim_checks(overrides, message) -> None:
    now = int(time.time())
    overrides = {k: now + v if k in ("exp", "nbf", "iat") and v is not None else v for k, v in overrides.items()}
    issuer = FakeIssuer()
    verifier = verifier_for(issuer)
    if message is None:
        verify(verifier, issuer.token(**overrides))
        return
    with pytest.raises(TokenError, match=message):
        verify(verifier, issuer.token(**overrides))


def test_bounded_clock_skew_is_accepted() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(issuer)
    now = int(time.time())
    verify(verifier, issuer.token(exp=now - 30, iat=now - 600))  # within the 60 s leeway
    verify(verifier, issuer.token(nbf=now + 30, iat=now + 30))


def test_reserved_names_without_prefix_are_refused() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(issuer, claimMappings={"username": {"claim": "sub", "prefix": ""},
                                                   "groups": {"claim": "groups", "prefix": ""}})
    with pytest.raises(TokenError, match="reserved"):
        verify(verifier, issuer.token(groups=["system:masters"]))
    with pytest.raises(TokenError, match="reserved"):
        verify(verifier, issuer.token(sub="system:admin"))


def test_alg_none_and_hmac_with_the_public_key_are_refused() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(issuer)
    payload = b64(json.dumps(issuer.claims()).encode())
    none_token = b64(json.dumps({"alg": "none", "kid": "rsa1"}).encode()) + "." + payload + "."
    with pytest.raises(TokenError):
        verify(verifier, none_token)
    with pytest.raises(TokenError, match="algorithm"):
        verify(verifier, b64(json.dumps({"alg": "none", "kid": "rsa1"}).encode()) + "." + payload + ".c2ln")
    pem = issuer.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(issuer.published[0]).encode()):
        signing_input = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode()) + "." + payload
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(TokenError, match="algorithm"):
            verify(verifier, signing_input + "." + b64(mac))


def test_algorithm_must_fit_the_key() -> None:
    issuer = FakeIssuer()
    verifier = verifier_for(issuer)
    # PS256 with a key published as RS256; ES256 header on the RSA kid
    with pytest.raises(TokenError, match="unknown key"):
        verify(verifier, issuer.token(alg="PS256", kid="rsa1"))
    with pytest.raises(TokenError, match="unknown key"):
        verify(verifier, issuer.token(alg="ES256", kid="rsa1"))


def test_bad_signature_and_untrusted_issuer() -> None:
    issuer, evil = FakeIssuer(), FakeIssuer(OTHER)
    verifier = verifier_for(issuer)
    with pytest.raises(TokenError, match="signature"):
        verify(verifier, issuer.token(key=evil.rsa))  # right iss and kid, wrong key
    with pytest.raises(UnknownIssuer):
        verify(verifier, evil.token())
    with pytest.raises(UnknownIssuer):
        verify(verifier, issuer.token(iss=ISSUER + "/"))  # exact match only


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "e30.e30.", "e30.e30.x", "x" * 20000,
                                   "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ"])
def test_garbage_is_not_a_jwt(token) -> None:
    with pytest.raises(NotAJWT):
        verify(verifier_for(FakeIssuer()), token)
    assert unverified_issuer(token) is None


def test_truncated_signature_is_refused() -> None:
    issuer = FakeIssuer()
    token = issuer.token()
    with pytest.raises(TokenError):
        verify(verifier_for(issuer), token[:-10])


def test_discovery_issuer_must_match_exactly() -> None:
    issuer = FakeIssuer()
    issuer.discovery_issuer = ISSUER + "/"
    with pytest.raises(TokenError, match="cannot verify"):
        verify(verifier_for(issuer), issuer.token())


def test_unknown_kid_refetch_is_rate_limited() -> None:
    issuer = FakeIssuer()
    clock = [1000.0]
    keys = IssuerKeys(parse_config(document()).issuers[0], issuer.fetch, clock=lambda: clock[0])
    verifier = Verifier(parse_config(document()), keys={ISSUER: keys})
    verify(verifier, issuer.token())
    assert keys.fetches == 1
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issuer.token(key=rotated, kid="rsa2")
    with pytest.raises(TokenError, match="unknown key"):
        verify(verifier, token)
    assert keys.fetches == 1  # within 10 s of the last fetch: no new fetch
    issuer.published.append(FakeIssuer.jwk(rotated, "rsa2", "RS256"))
    clock[0] += 11
    assert verify(verifier, token).username == "oidc:alice"  # rotated key found by one refetch
    assert keys.fetches == 2
    for _ in range(5):
        with pytest.raises(TokenError):
            verify(verifier, issuer.token(key=rotated, kid="nope"))
    assert keys.fetches == 2  # an unknown-kid storm costs at most one fetch per 10 s


def test_failed_refresh_keeps_known_keys() -> None:
    issuer = FakeIssuer()
    clock = [0.0]
    keys = IssuerKeys(parse_config(document()).issuers[0], issuer.fetch, clock=lambda: clock[0], max_key_age=100)
    verifier = Verifier(parse_config(document()), keys={ISSUER: keys})
    verify(verifier, issuer.token())

    async def down(url, ca):
        from clusterconnect.oidc import KeysUnavailable
        raise KeysUnavailable("down")

    keys._fetch = down
    clock[0] += 200
    assert verify(verifier, issuer.token()).username == "oidc:alice"


def test_private_and_symmetric_keys_in_jwks_are_ignored() -> None:
    issuer = FakeIssuer()
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.rsa))
    private.update({"kid": "rsa1"})
    issuer.published = [{"kty": "oct", "kid": "rsa1", "k": b64(b"secret")}, private]
    with pytest.raises(TokenError, match="cannot verify"):
        verify(verifier_for(issuer), issuer.token())


# ---- the authenticator's header handling ---------------------------------------------------------


class Reviewer:
    def __init__(self, allow: set[tuple[str, str]]) -> None:
        self.allow = allow
        self.asked: list[ResourceAttributes] = []

    async def allowed(self, user, groups, uid, extra, attributes: ResourceAttributes) -> bool:
        self.asked.append(attributes)
        return (attributes.resource, attributes.name) in self.allow


def authenticator(issuer: FakeIssuer, reviewer=None) -> OIDCAuthenticator:
    return OIDCAuthenticator(verifier_for(issuer), lambda: "proxy-own-token", reviewer,
                             ["https://kubernetes.default.svc", "kubernetes/serviceaccount"])


def authenticate(auth: OIDCAuthenticator, headers) -> Forward | Reject:
    return asyncio.run(auth.authenticate(headers))


def test_oidc_caller_is_impersonated_with_own_credential() -> None:
    issuer = FakeIssuer()
    token = issuer.token().encode()
    result = authenticate(authenticator(issuer), [
        (b"host", b"x"), (b"authorization", b"Bearer " + token), (b"accept", b"*/*"),
    ])
    assert isinstance(result, Forward)
    assert result.headers == [
        (b"host", b"x"), (b"accept", b"*/*"), (b"authorization", b"Bearer proxy-own-token"),
        (b"impersonate-user", b"oidc:alice"), (b"impersonate-group", b"oidc:dev"),
    ]


def test_websocket_bearer_protocol_is_a_credential_and_is_removed() -> None:
    issuer = FakeIssuer()
    encoded = base64.urlsafe_b64encode(issuer.token().encode()).rstrip(b"=")
    headers = [(b"sec-websocket-protocol", b"v5.channel.k8s.io, base64url.bearer.authorization.k8s.io." + encoded)]
    result = authenticate(authenticator(issuer), headers)
    assert isinstance(result, Forward)
    assert (b"sec-websocket-protocol", b"v5.channel.k8s.io") in result.headers
    assert not any(b"bearer" in v for n, v in result.headers if n == b"sec-websocket-protocol")
    # both a websocket token and an Authorization header: refused
    both = headers + [(b"authorization", b"Bearer " + issuer.token().encode())]
    assert authenticate(authenticator(issuer), both).status == 401


def test_credential_rules() -> None:
    issuer = FakeIssuer()
    auth = authenticator(issuer)
    token = issuer.token().encode()
    assert authenticate(auth, []).status == 401
    assert authenticate(auth, [(b"authorization", b"Bearer " + token)] * 2).status == 401
    assert authenticate(auth, [(b"authorization", b"Basic YTpi")]).status == 401
    assert authenticate(auth, [(b"authorization", b"Bearer garbage")]).status == 401
    assert authenticate(auth, [(b"authorization", b"Bearer " + FakeIssuer(OTHER).token().encode())]).status == 401
    sa = jwt.encode({"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:a:b"}, "k" * 32)
    headers = [(b"authorization", f"Bearer {sa}".encode()), (b"impersonate-user", b"x")]
    assert authenticate(auth, headers) == Forward(headers=headers)  # ServiceAccount: untouched


def test_impersonation_needs_subject_access_review() -> None:
    issuer = FakeIssuer()
    token = issuer.token().encode()
    reviewer = Reviewer({("users", "bob")})
    auth = authenticator(issuer, reviewer)
    headers = [(b"authorization", b"Bearer " + token), (b"Impersonate-User", b"bob")]
    result = authenticate(auth, headers)
    assert isinstance(result, Forward)
    assert (b"impersonate-user", b"bob") in result.headers
    assert (b"impersonate-user", b"oidc:alice") not in result.headers
    denied = authenticate(auth, headers + [(b"impersonate-group", b"system:masters")])
    assert isinstance(denied, Reject) and denied.status == 403 and 'groups "system:masters"' in denied.message
    for extra in ([(b"impersonate-uid", b"1")], [(b"impersonate-extra-scopes", b"a")]):
        assert authenticate(auth, headers + extra).status == 403
    # groups without a user, two users: refused without asking
    assert authenticate(auth, [(b"authorization", b"Bearer " + token), (b"impersonate-group", b"g")]).status == 403
    assert authenticate(auth, headers + [(b"impersonate-user", b"carol")]).status == 403
    assert authenticate(authenticator(issuer, None), headers).status == 403


def test_impersonation_attributes_follow_kube_apiserver() -> None:
    request = ImpersonationRequest([
        (b"impersonate-user", b"system:serviceaccount:ns1:sa1"), (b"impersonate-group", b"g1"),
        (b"impersonate-uid", b"u1"), (b"impersonate-extra-example.org%2ftenant", b"t1"),
    ])
    assert request.attributes() == [
        ResourceAttributes("serviceaccounts", "sa1", namespace="ns1"),
        ResourceAttributes("groups", "g1"),
        ResourceAttributes("uids", "u1", group="authentication.k8s.io"),
        ResourceAttributes("userextras", "t1", group="authentication.k8s.io", subresource="example.org/tenant"),
    ]


def test_header_helpers() -> None:
    assert without_credentials([
        (b"Authorization", b"x"), (b"IMPERSONATE-USER", b"y"), (b"impersonate-extra-a", b"z"), (b"accept", b"1"),
    ]) == [(b"accept", b"1")]
    assert identity_headers(Identity("u", ("g1", "g2"), "id", {"example.org/a b": ("v",)})) == [
        (b"impersonate-user", b"u"), (b"impersonate-group", b"g1"), (b"impersonate-group", b"g2"),
        (b"impersonate-uid", b"id"), (b"impersonate-extra-example.org%2Fa%20b", b"v"),
    ]
    assert extract_token([(b"authorization", b"Bearer  abc ")]) == b"abc"
