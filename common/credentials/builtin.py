"""The relay's built-in issuer: redeem a one-time login code, exchange the refresh credential for tokens,
revoke it (logout)."""

from __future__ import annotations

from typing import Any

import grpc

from clusterconnect.credentials.errors import LoginError
from clusterconnect.credentials.records import BuiltinLogin
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.v1 import identity_pb2, identity_pb2_grpc

RPC_TIMEOUT = 15


def _identity_provider(relay: str, ca_pem: str | None) -> tuple[grpc.Channel, Any]:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem.encode() if ca_pem else None)
    channel = grpc.secure_channel(grpc_target(relay), credentials, options=CHANNEL_OPTIONS)
    return channel, identity_pb2_grpc.IdentityProviderStub(channel)


def login_relay(relay: str, ca_pem: str | None, code: str, device: str) -> BuiltinLogin:
    """Redeem a one-time login code at the relay; returns the login to save."""
    channel, stub = _identity_provider(relay, ca_pem)
    try:
        reply = stub.Login(identity_pb2.LoginRequest(code=code, device=device), timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        raise LoginError(f"login failed: {exc.details() or exc.code().name}") from None
    finally:
        channel.close()
    return BuiltinLogin(relay=relay, relay_ca=ca_pem, refresh_credential=reply.refresh_credential,
                        username=reply.username, issuer=reply.issuer, audience=reply.audience,
                        credential_id=reply.credential_id, credential_expires_unix=int(reply.credential_expires_unix))


def refresh_builtin(login: BuiltinLogin) -> tuple[str, int]:
    """A new access token for the login: (token, expires_unix)."""
    channel, stub = _identity_provider(login.relay, login.relay_ca)
    try:
        reply = stub.IssueToken(identity_pb2.IssueTokenRequest(),
                                metadata=(bearer(login.refresh_credential),), timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise LoginError(f"{exc.details()}") from None
        raise LoginError(f"cannot get a token from relay {login.relay}: {exc.details() or exc.code().name}") from None
    finally:
        channel.close()
    return reply.access_token, int(reply.expires_unix)


def logout_builtin(login: BuiltinLogin) -> bool:
    """Revoke the login's refresh credential at the relay: True if revoked now, False if the relay no
    longer knew it (revoked, expired, user removed); LoginError if the relay could not be asked."""
    channel, stub = _identity_provider(login.relay, login.relay_ca)
    try:
        stub.Logout(identity_pb2.LogoutRequest(), metadata=(bearer(login.refresh_credential),), timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return False
        raise LoginError(f"cannot revoke the login at relay {login.relay}: {exc.details() or exc.code().name}; "
                         "the login is kept, try again") from None
    finally:
        channel.close()
    return True
