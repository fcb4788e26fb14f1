from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCAResponse(_message.Message):
    __slots__ = ("ca_pem", "ca_hash", "agent_port")
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_HASH_FIELD_NUMBER: _ClassVar[int]
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    ca_pem: str
    ca_hash: str
    agent_port: int
    def __init__(self, ca_pem: _Optional[str] = ..., ca_hash: _Optional[str] = ..., agent_port: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("cluster", "join_token", "csr_pem")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    join_token: str
    csr_pem: bytes
    def __init__(self, cluster: _Optional[str] = ..., join_token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class AgentCertificate(_message.Message):
    __slots__ = ("certificate_pem", "not_after_unix")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_UNIX_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    not_after_unix: int
    def __init__(self, certificate_pem: _Optional[bytes] = ..., not_after_unix: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("certificate", "agent_port")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_PORT_FIELD_NUMBER: _ClassVar[int]
    certificate: AgentCertificate
    agent_port: int
    def __init__(self, certificate: _Optional[_Union[AgentCertificate, _Mapping]] = ..., agent_port: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate",)
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: AgentCertificate
    def __init__(self, certificate: _Optional[_Union[AgentCertificate, _Mapping]] = ...) -> None: ...
