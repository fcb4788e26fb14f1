"""Registry: the admin API (add, list, get, remove clusters). Every call needs the admin credential."""

from __future__ import annotations

import time

import grpc

from clusterconnect.logs import get_logger
from clusterconnect.relay.admin_api.check import AdminCheck
from clusterconnect.relay.datapath.sessions import SessionTable
from clusterconnect.relay.storage.clusters import AlreadyExists, ClusterRecord, ClusterStore, InvalidName
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc

log = get_logger(__name__)


class Registry(tunnel_pb2_grpc.RegistryServicer):
    # relay.enrollment.AgentEnrollment: join tokens and agent certificates (set in main.py).
    agent_enrollment = None

    def __init__(self, store: ClusterStore, sessions: SessionTable, admin_credential: str) -> None:
        self.store = store
        self.sessions = sessions
        self._admin = AdminCheck(admin_credential)

    def _status(self, record: ClusterRecord) -> tunnel_pb2.Cluster:
        session = self.sessions.get(record.name)
        if session is not None:
            return tunnel_pb2.Cluster(
                name=record.name, connected=True, last_seen_unix=int(session.last_seen),
                agent_version=session.agent_version, kubernetes_version=session.kubernetes_version,
                created_unix=record.created_unix,
            )
        last_seen = self.sessions.last_seen.get(record.name, record.last_seen_unix)
        return tunnel_pb2.Cluster(
            name=record.name, connected=False, last_seen_unix=int(last_seen),
            agent_version=record.agent_version, kubernetes_version=record.kubernetes_version,
            created_unix=record.created_unix,
        )

    async def AddCluster(self, request, context):
        await self._admin.require(context)
        try:
            record = self.store.add(request.name)
        except InvalidName as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AlreadyExists as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        log.info("cluster added", cluster=record.name)
        token, expires, ca_hash = self.agent_enrollment.new_join_token(record.name)
        return tunnel_pb2.AddClusterResponse(
            cluster=self._status(record), join_token=token, join_token_expires_unix=expires, relay_ca_hash=ca_hash
        )

    async def ListClusters(self, request, context):
        await self._admin.require(context)
        return tunnel_pb2.ListClustersResponse(clusters=[self._status(r) for r in self.store.list()])

    async def GetCluster(self, request, context):
        await self._admin.require(context)
        record = self.store.get(request.name)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {request.name} is not registered")
        return self._status(record)

    async def RemoveCluster(self, request, context):
        await self._admin.require(context)
        if not self.store.remove(request.name):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"cluster {request.name} is not registered")
        self.agent_enrollment.revoke(request.name)
        self.sessions.end(request.name, f"cluster removed at {int(time.time())}")
        log.info("cluster removed", cluster=request.name)
        return tunnel_pb2.RemoveClusterResponse()
