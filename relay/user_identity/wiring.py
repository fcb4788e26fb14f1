"""Wiring of user identity into the relay: built-in issuer, its HTTPS endpoint, verifier, access lists.

``add_flags`` adds the flags to ``clusterconnect-relay serve``; ``start`` builds everything and
returns a :class:`UserIdentity` whose ``authorizer`` the Dial handler consults.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from clusterconnect import cliargs
from clusterconnect.errors import StartupError
from clusterconnect.logs import get_logger
from clusterconnect.oidc import AuthenticationConfig, ConfigError, IssuerConfig, IssuerKeys, Verifier, load_config
from clusterconnect.oidc.config import PrefixedClaim
from clusterconnect.relay.datapath.connections import ConnectionRegistry
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.sealing import SealBroken, SealingKey
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import AccessStore, DialAuthorizer
from clusterconnect.relay.user_identity.api import AccessAdmin, IdentityProvider
from clusterconnect.relay.user_identity.issuer import (
    DEFAULT_ACCESS_TOKEN_LIFETIME,
    MAX_ACCESS_TOKEN_LIFETIME,
    Issuer,
    IssuerEndpoint,
    SigningKeys,
)
from clusterconnect.relay.user_identity.revocation import RevocationWatch
from clusterconnect.relay.user_identity.users import DEFAULT_CREDENTIAL_LIFETIME, UserStore
from clusterconnect.v1 import identity_pb2_grpc

log = get_logger(__name__)

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def add_flags(serve: argparse.ArgumentParser) -> None:
    cliargs.add_flag(serve, "--issuer-listen",
                     help="HOST:PORT of the built-in issuer's HTTPS endpoint (discovery + JWKS);"
                          " default: the --listen host, port + 2: 0.0.0.0:8445 (port + 1 is --agent-listen's)")
    cliargs.add_flag(serve, "--issuer-url",
                     help="public https:// URL of that endpoint, the iss of access tokens"
                          " (default: https://HOST:PORT of --issuer-listen)")
    cliargs.add_flag(serve, "--token-audience",
                     help="aud of the built-in issuer's access tokens (default: the issuer URL)")
    cliargs.add_flag(serve, "--access-token-lifetime", type=int, default=DEFAULT_ACCESS_TOKEN_LIFETIME,
                     help=f"seconds an access token is valid (at most {MAX_ACCESS_TOKEN_LIFETIME})")
    cliargs.add_flag(serve, "--signing-key-max-age", type=int, default=7 * 24 * 3600,
                     help="rotate the issuer's signing key when it is older than this (seconds; 0: never)")
    cliargs.add_flag(serve, "--authentication-config", type=Path,
                     help="AuthenticationConfiguration (as the auth proxy's) of external issuers whose users"
                          " may be on access lists; an entry for the built-in issuer overrides its mapping")
    cliargs.add_flag(serve, "--refresh-credential-lifetime", type=int, default=DEFAULT_CREDENTIAL_LIFETIME,
                     help="seconds a login (refresh credential) stays valid; then the user logs in again")
    cliargs.add_flag(serve, "--clock-skew-seconds", type=int, default=60,
                     help="clock skew allowed when the relay verifies tokens (exp/nbf/iat)")


@dataclass
class UserIdentity:
    issuer: Issuer
    endpoint: IssuerEndpoint
    users: UserStore
    access: AccessStore
    keys: SigningKeys
    authorizer: DialAuthorizer
    revocations: RevocationWatch


def _issuer_address(args: argparse.Namespace) -> tuple[str, int]:
    if args.issuer_listen:
        host, _, port = args.issuer_listen.rpartition(":")
    else:
        host, _, port = args.listen.rpartition(":")
        # 8443 -> 8445: the user port, the agent port (8444) and the issuer's, each its own by default.
        port = str(int(port) + 2) if int(port) else "0"
    return host.strip("[]"), int(port)


def _public_host(host: str, args: argparse.Namespace) -> str:
    if host not in _WILDCARDS:
        return f"[{host}]" if ":" in host else host
    names: list[str] = args.hostname or [socket.gethostname()]
    return names[0]


def builtin_issuer_config(url: str, audience: str, ca_pem: str | None) -> IssuerConfig:
    """How the relay maps its own tokens: user = sub, groups = groups, no prefixes, uid = the user's id."""
    return IssuerConfig(url=url, audiences=(audience,), certificate_authority=ca_pem,
                        username=PrefixedClaim("sub", ""), groups=PrefixedClaim("groups", ""), uid="uid")


async def start(args: argparse.Namespace, data_dir: Path, store: Store, clusters: ClusterStore,
                sealing: SealingKey, cert: Path, key: Path, ca_pem: str | None, admin_credential: str,
                server: grpc.aio.Server, connections: ConnectionRegistry) -> UserIdentity:
    """Everything of user identity on ``store`` (the records of an earlier version's relay.db imported
    once), its services added to ``server``; ``sealing`` opens the issuer's signing keys."""
    external = AuthenticationConfig()
    if args.authentication_config:
        try:
            external = load_config(args.authentication_config)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
    if not 1 <= args.access_token_lifetime <= MAX_ACCESS_TOKEN_LIFETIME:
        raise StartupError(f"--access-token-lifetime must be 1..{MAX_ACCESS_TOKEN_LIFETIME} seconds")

    if args.refresh_credential_lifetime < 1:
        raise StartupError("--refresh-credential-lifetime must be at least 1 second")

    legacy_db = data_dir / "relay.db"  # where earlier versions kept these records
    try:
        keys = await SigningKeys.open(store, sealing, max_age=args.signing_key_max_age, legacy_db=legacy_db)
    except SealBroken as exc:
        raise StartupError(f"{exc} (--sealing-key-file must be the key this database was sealed with)") from None
    users = await UserStore.open(store, legacy_db, credential_lifetime=args.refresh_credential_lifetime)
    access = await AccessStore.open(store, clusters, legacy_db)
    issuer = Issuer("", "", keys, args.access_token_lifetime)
    endpoint = IssuerEndpoint(issuer, cert, key)
    host, port = _issuer_address(args)
    try:
        port = await endpoint.start(host, port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port} (--issuer-listen): {exc.strerror}") from None
    issuer.url = (args.issuer_url or f"https://{_public_host(host, args)}:{port}").rstrip("/")
    issuer.audience = args.token_audience or issuer.url

    own = external.issuer(issuer.url) or builtin_issuer_config(issuer.url, issuer.audience, ca_pem)
    # The relay checks the user id of its own tokens (access.py), whatever mapping an override gives.
    own = dataclasses.replace(own, uid="uid")
    config = AuthenticationConfig(issuers=(own, *(i for i in external.issuers if i.url != issuer.url)))
    fetch = issuer.local_fetch()
    verifier = Verifier(config, leeway=float(args.clock_skew_seconds), keys={
        i.url: IssuerKeys(i, fetch, min_refresh_interval=1.0 if i.url == issuer.url else 10.0,
                          max_key_age=60.0 if i.url == issuer.url else 3600.0)
        for i in config.issuers
    })
    authorizer = DialAuthorizer(access, verifier, users, issuer.url)
    revocations = RevocationWatch(store, clusters, authorizer, connections)
    # The generated *_pb2_grpc modules have no type stubs.
    identity_pb2_grpc.add_IdentityProviderServicer_to_server(
        IdentityProvider(users, issuer), server)
    identity_pb2_grpc.add_AccessAdminServicer_to_server(
        AccessAdmin(users, access, issuer, admin_credential), server)
    log.info("issuer serving", url=issuer.url, address=f"{host}:{port}", audience=issuer.audience,
             lifetime_seconds=args.access_token_lifetime, external_issuers=[i.url for i in external.issuers])
    return UserIdentity(issuer, endpoint, users, access, keys, authorizer, revocations)
