"""gRPC services of identity.proto: IdentityProvider (users log in, get tokens) and AccessAdmin (admin).

A write the store cannot take (etcd unreachable from this replica) is answered UNAVAILABLE with the
store's one-line reason. Ending open connections after a revocation is not done here: it follows
the store, at every replica (revocation.py).
"""

from __future__ import annotations

import grpc

from clusterconnect.errors import ResourceExhausted, Unavailable
from clusterconnect.grpc_options import bearer_from_metadata
from clusterconnect.logs import get_logger
from clusterconnect.ratelimit import FailureLimiter, peer_address
from clusterconnect.relay.admin_api.check import AdminCheck
from clusterconnect.relay.rpc import UnaryContext, abort_with
from clusterconnect.relay.user_identity.access import AccessError, AccessStore, Entry
from clusterconnect.relay.user_identity.issuer import Issuer
from clusterconnect.relay.user_identity.users import NoSuchUser, UserError, UserRecord, UserStore
from clusterconnect.v1 import identity_pb2, identity_pb2_grpc

log = get_logger(__name__)


def _user(record: UserRecord) -> identity_pb2.User:
    return identity_pb2.User(name=record.name, groups=list(record.groups), created_unix=record.created_unix,
                             credentials=record.credentials)


class IdentityProvider(identity_pb2_grpc.IdentityProviderServicer):
    def __init__(self, users: UserStore, issuer: Issuer, login_limiter: FailureLimiter | None = None) -> None:
        self.users = users
        self.issuer = issuer
        # Wrong login codes per client address and overall (clusterconnect.ratelimit has the defaults).
        self.login_limiter = login_limiter or FailureLimiter("login code")

    async def Login(self, request: identity_pb2.LoginRequest, context: UnaryContext) -> identity_pb2.LoginResponse:
        source = peer_address(context.peer())
        try:
            self.login_limiter.check(source)
            user, credential = await self.users.redeem_code(request.code.strip(), request.device)
        except ResourceExhausted as exc:
            log.debug("login refused", reason="rate limited", peer=context.peer())
            await abort_with(context, exc)
        except Unavailable as exc:
            await abort_with(context, exc)
        except UserError as exc:
            self.login_limiter.failed(source)
            await abort_with(context, exc)
        issued = self.users.credential_info(credential)
        assert issued is not None  # made in the line above
        # login_id, not credential_id: the log redacts keys naming credentials, and this id is public.
        log.info("user logged in", user=user.name, device=request.device[:128], login_id=issued.id)
        return identity_pb2.LoginResponse(refresh_credential=credential, username=user.name,
                                          issuer=self.issuer.url, audience=self.issuer.audience,
                                          credential_id=issued.id, credential_expires_unix=issued.expires_unix)

    async def IssueToken(self, request: identity_pb2.IssueTokenRequest,
                         context: UnaryContext) -> identity_pb2.IssueTokenResponse:
        credential = bearer_from_metadata(context.invocation_metadata())
        if credential is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "refresh credential missing")
        try:
            user = await self.users.user_of_credential(credential)
            token, expires = await self.issuer.mint(user.name, user.groups, user.uid)
        except (UserError, Unavailable) as exc:
            await abort_with(context, exc)
        log.info("access token issued", user=user.name, expires_unix=expires)
        return identity_pb2.IssueTokenResponse(access_token=token, expires_unix=expires)

    async def Logout(self, request: identity_pb2.LogoutRequest, context: UnaryContext) -> identity_pb2.LogoutResponse:
        credential = bearer_from_metadata(context.invocation_metadata())
        if credential is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "refresh credential missing")
        try:
            user = await self.users.revoke_own(credential)
        except Unavailable as exc:
            await abort_with(context, exc)
        if user is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "refresh credential is not valid (already revoked?)")
        log.info("user logged out", user=user)
        return identity_pb2.LogoutResponse()


class AccessAdmin(identity_pb2_grpc.AccessAdminServicer):
    def __init__(self, users: UserStore, access: AccessStore, issuer: Issuer, admin_credential: str) -> None:
        self.users = users
        self.access = access
        self.issuer = issuer
        self._admin = AdminCheck(admin_credential)

    async def AddUser(self, request: identity_pb2.AddUserRequest,
                      context: UnaryContext) -> identity_pb2.AddUserResponse:
        await self._admin.require(context)
        try:
            record, code, expires = await self.users.add(request.name, list(request.groups))
        except (UserError, Unavailable) as exc:
            await abort_with(context, exc)
        log.info("user added", user=record.name, groups=list(record.groups))
        return identity_pb2.AddUserResponse(user=_user(record), login_code=code, login_code_expires_unix=expires)

    async def NewLoginCode(self, request: identity_pb2.NewLoginCodeRequest,
                           context: UnaryContext) -> identity_pb2.AddUserResponse:
        await self._admin.require(context)
        try:
            code, expires = await self.users.new_code(request.name)
        except (UserError, Unavailable) as exc:
            await abort_with(context, exc)
        record = self.users.get(request.name)
        if record is None:  # removed between the two lines
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.name} does not exist")
        return identity_pb2.AddUserResponse(user=_user(record), login_code=code, login_code_expires_unix=expires)

    async def ListUsers(self, request: identity_pb2.ListUsersRequest,
                        context: UnaryContext) -> identity_pb2.ListUsersResponse:
        await self._admin.require(context)
        return identity_pb2.ListUsersResponse(users=[_user(r) for r in self.users.list()])

    async def RemoveUser(self, request: identity_pb2.RemoveUserRequest,
                         context: UnaryContext) -> identity_pb2.RemoveUserResponse:
        await self._admin.require(context)
        try:
            removed = await self.users.remove(request.name)
        except Unavailable as exc:
            await abort_with(context, exc)
        if not removed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.name} does not exist")
        log.info("user removed", user=request.name)
        return identity_pb2.RemoveUserResponse()

    @staticmethod
    def _entry(message: identity_pb2.AccessEntry) -> Entry:
        kind = message.WhichOneof("subject") or ""
        return Entry(kind, getattr(message, kind) if kind else "")

    def _list(self, cluster: str, entries: list[Entry]) -> identity_pb2.AccessList:
        return identity_pb2.AccessList(
            cluster=cluster, entries=[identity_pb2.AccessEntry(**{e.kind: e.name}) for e in entries])

    async def Grant(self, request: identity_pb2.AccessChange, context: UnaryContext) -> identity_pb2.AccessList:
        await self._admin.require(context)
        try:
            entries = await self.access.grant(request.cluster, self._entry(request.entry))
        except (AccessError, Unavailable) as exc:
            await abort_with(context, exc)
        log.info("access granted", cluster=request.cluster, entry=str(self._entry(request.entry)))
        return self._list(request.cluster, entries)

    async def Revoke(self, request: identity_pb2.AccessChange, context: UnaryContext) -> identity_pb2.AccessList:
        await self._admin.require(context)
        try:
            entries = await self.access.revoke(request.cluster, self._entry(request.entry))
        except (AccessError, Unavailable) as exc:
            await abort_with(context, exc)
        log.info("access revoked", cluster=request.cluster, entry=str(self._entry(request.entry)))
        return self._list(request.cluster, entries)

    async def GetAccess(self, request: identity_pb2.GetAccessRequest, context: UnaryContext) -> identity_pb2.AccessList:
        await self._admin.require(context)
        if self.access.clusters.get(request.cluster) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {request.cluster} is not registered")
        return self._list(request.cluster, self.access.entries(request.cluster))

    async def ListCredentials(self, request: identity_pb2.ListCredentialsRequest,
                              context: UnaryContext) -> identity_pb2.ListCredentialsResponse:
        await self._admin.require(context)
        try:
            found = self.users.credentials(request.user)
        except UserError as exc:
            await abort_with(context, exc)
        return identity_pb2.ListCredentialsResponse(credentials=[
            identity_pb2.Credential(id=c.id, device=c.device, created_unix=c.created_unix,
                                    last_used_unix=c.last_used_unix, expires_unix=c.expires_unix) for c in found])

    async def RevokeCredential(self, request: identity_pb2.RevokeCredentialRequest,
                               context: UnaryContext) -> identity_pb2.RevokeCredentialResponse:
        await self._admin.require(context)
        try:
            if not await self.users.revoke_credential(request.user, request.id):
                raise NoSuchUser(f"user {request.user} has no credential {request.id}")
        except (UserError, Unavailable) as exc:
            await abort_with(context, exc)
        log.info("credential revoked", user=request.user, login_id=request.id)
        return identity_pb2.RevokeCredentialResponse()

    async def RotateSigningKey(self, request: identity_pb2.RotateSigningKeyRequest,
                               context: UnaryContext) -> identity_pb2.RotateSigningKeyResponse:
        await self._admin.require(context)
        try:
            current = await self.issuer.keys.rotate()
        except Unavailable as exc:
            await abort_with(context, exc)
        return identity_pb2.RotateSigningKeyResponse(
            kid=current.kid, published_kids=[k["kid"] for k in self.issuer.keys.jwks()["keys"]])
