from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Chunk(_message.Message):
    __slots__ = ("data", "eof", "bound")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    BOUND_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    eof: bool
    bound: Bound
    def __init__(self, data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., bound: _Optional[_Union[Bound, _Mapping]] = ...) -> None: ...

class Bound(_message.Message):
    __slots__ = ("traceparent", "caller")
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    traceparent: str
    caller: Caller
    def __init__(self, traceparent: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("issuer", "subject", "uid")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    uid: str
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., uid: _Optional[str] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("cluster", "agent_version", "kubernetes_version")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_VERSION_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    agent_version: str
    kubernetes_version: str
    def __init__(self, cluster: _Optional[str] = ..., agent_version: _Optional[str] = ..., kubernetes_version: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("unix_millis",)
    UNIX_MILLIS_FIELD_NUMBER: _ClassVar[int]
    unix_millis: int
    def __init__(self, unix_millis: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: Heartbeat
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...

class DialRequest(_message.Message):
    __slots__ = ("dial_id", "traceparent", "caller")
    DIAL_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    dial_id: str
    traceparent: str
    caller: Caller
    def __init__(self, dial_id: _Optional[str] = ..., traceparent: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("heartbeat_seconds",)
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: int
    def __init__(self, heartbeat_seconds: _Optional[int] = ...) -> None: ...

class RelayMessage(_message.Message):
    __slots__ = ("welcome", "dial", "drain")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    DIAL_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    dial: DialRequest
    drain: Drain
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., dial: _Optional[_Union[DialRequest, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("kubernetes_version", "auth_proxy_version")
    KUBERNETES_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_PROXY_VERSION_FIELD_NUMBER: _ClassVar[int]
    kubernetes_version: str
    auth_proxy_version: str
    def __init__(self, kubernetes_version: _Optional[str] = ..., auth_proxy_version: _Optional[str] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("name", "connected", "last_seen_unix", "agent_version", "kubernetes_version", "created_unix", "replica")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KUBERNETES_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    name: str
    connected: bool
    last_seen_unix: int
    agent_version: str
    kubernetes_version: str
    created_unix: int
    replica: str
    def __init__(self, name: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix: _Optional[int] = ..., agent_version: _Optional[str] = ..., kubernetes_version: _Optional[str] = ..., created_unix: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class AddClusterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AddClusterResponse(_message.Message):
    __slots__ = ("cluster", "join_token", "join_token_expires_unix", "relay_ca_hash")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    RELAY_CA_HASH_FIELD_NUMBER: _ClassVar[int]
    cluster: Cluster
    join_token: str
    join_token_expires_unix: int
    relay_ca_hash: str
    def __init__(self, cluster: _Optional[_Union[Cluster, _Mapping]] = ..., join_token: _Optional[str] = ..., join_token_expires_unix: _Optional[int] = ..., relay_ca_hash: _Optional[str] = ...) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters",)
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[Cluster]
    def __init__(self, clusters: _Optional[_Iterable[_Union[Cluster, _Mapping]]] = ...) -> None: ...

class GetClusterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveClusterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveClusterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
