"""Registry: the admin API (add, list, get, remove clusters). Every call needs the admin credential."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from clusterconnect.errors import ClusterConnectError
from clusterconnect.logs import get_logger
from clusterconnect.relay.admin_api.check import AdminCheck
from clusterconnect.relay.agent_identity.enrollment import AgentEnrollment
from clusterconnect.relay.datapath.sessions import EndReason, SessionTable
from clusterconnect.relay.rpc import UnaryContext, abort_with
from clusterconnect.relay.storage.clusters import ClusterRecord, ClusterStore
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)


class Registry(tunnel_pb2_grpc.RegistryServicer):
    def __init__(self, store: ClusterStore, sessions: SessionTable, admin_credential: str,
                 agent_enrollment: AgentEnrollment, holder: Callable[[str], str]) -> None:
        self.store = store
        self.sessions = sessions
        # cluster -> the relay replica holding its agent ("" with a single relay): Tunnel.holder
        self.holder = holder
        self._admin = AdminCheck(admin_credential)
        # Join tokens for new clusters; a removed cluster's certificates stop working.
        self.agent_enrollment = agent_enrollment

    def _status(self, record: ClusterRecord) -> tunnel_pb2.Cluster:
        session = self.sessions.get(record.name)
        replica = self.holder(record.name)
        if session is not None:
            return tunnel_pb2.Cluster(
                name=record.name, connected=True, last_seen_unix=int(session.last_seen),
                agent_version=session.agent_version, kubernetes_version=session.kubernetes_version,
                created_unix=record.created_unix, replica=replica,
            )
        # Held by another replica (its route), or by none.
        last_seen = self.sessions.last_seen.get(record.name, record.last_seen_unix)
        return tunnel_pb2.Cluster(
            name=record.name, connected=bool(replica), replica=replica, last_seen_unix=int(last_seen),
            agent_version=record.agent_version, kubernetes_version=record.kubernetes_version,
            created_unix=record.created_unix,
        )

    async def AddCluster(self, request: tunnel_pb2.AddClusterRequest,
                         context: UnaryContext) -> tunnel_pb2.AddClusterResponse:
        await self._admin.require(context)
        try:
            record = await self.store.add(request.name)
            log.info("cluster added", cluster=record.name)
            token, expires, ca_hash = await self.agent_enrollment.new_join_token(record.name)
        except ClusterConnectError as exc:  # InvalidName, AlreadyExists; Unavailable (etcd unreachable)
            await abort_with(context, exc)
        return tunnel_pb2.AddClusterResponse(
            cluster=self._status(record), join_token=token, join_token_expires_unix=expires, relay_ca_hash=ca_hash
        )

    async def ListClusters(self, request: tunnel_pb2.ListClustersRequest,
                           context: UnaryContext) -> tunnel_pb2.ListClustersResponse:
        await self._admin.require(context)
        return tunnel_pb2.ListClustersResponse(clusters=[self._status(r) for r in self.store.list()])

    async def GetCluster(self, request: tunnel_pb2.GetClusterRequest, context: UnaryContext) -> tunnel_pb2.Cluster:
        await self._admin.require(context)
        record = self.store.get(request.name)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {request.name} is not registered")
        return self._status(record)

    async def RemoveCluster(self, request: tunnel_pb2.RemoveClusterRequest,
                            context: UnaryContext) -> tunnel_pb2.RemoveClusterResponse:
        await self._admin.require(context)
        try:
            removed = await self.store.remove(request.name)
        except ClusterConnectError as exc:  # Unavailable (etcd unreachable): nothing removed
            await abort_with(context, exc)
        if not removed:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {request.name} is not registered")
        try:
            await self.agent_enrollment.revoke(request.name)
        except ClusterConnectError as exc:  # its certificates are refused anyway: the cluster is gone
            log.warning("certificates of a removed cluster not forgotten", cluster=request.name, reason=str(exc))
        self.sessions.end(request.name, EndReason.CLUSTER_REMOVED)
        log.info("cluster removed", cluster=request.name)
        return tunnel_pb2.RemoveClusterResponse()
