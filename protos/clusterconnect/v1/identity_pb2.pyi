from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoginRequest(_message.Message):
    __slots__ = ("code", "device")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    code: str
    device: str
    def __init__(self, code: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("refresh_credential", "username", "issuer", "audience", "credential_id", "credential_expires_unix")
    REFRESH_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    refresh_credential: str
    username: str
    issuer: str
    audience: str
    credential_id: str
    credential_expires_unix: int
    def __init__(self, refresh_credential: _Optional[str] = ..., username: _Optional[str] = ..., issuer: _Optional[str] = ..., audience: _Optional[str] = ..., credential_id: _Optional[str] = ..., credential_expires_unix: _Optional[int] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("access_token", "expires_unix")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    expires_unix: int
    def __init__(self, access_token: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class LogoutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogoutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class User(_message.Message):
    __slots__ = ("name", "groups", "created_unix", "credentials")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    created_unix: int
    credentials: int
    def __init__(self, name: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., created_unix: _Optional[int] = ..., credentials: _Optional[int] = ...) -> None: ...

class AddUserRequest(_message.Message):
    __slots__ = ("name", "groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class AddUserResponse(_message.Message):
    __slots__ = ("user", "login_code", "login_code_expires_unix")
    USER_FIELD_NUMBER: _ClassVar[int]
    LOGIN_CODE_FIELD_NUMBER: _ClassVar[int]
    LOGIN_CODE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    user: User
    login_code: str
    login_code_expires_unix: int
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ..., login_code: _Optional[str] = ..., login_code_expires_unix: _Optional[int] = ...) -> None: ...

class ListUsersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListUsersResponse(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedCompositeFieldContainer[User]
    def __init__(self, users: _Optional[_Iterable[_Union[User, _Mapping]]] = ...) -> None: ...

class RemoveUserRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveUserResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NewLoginCodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AccessEntry(_message.Message):
    __slots__ = ("user", "group")
    USER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    user: str
    group: str
    def __init__(self, user: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class AccessChange(_message.Message):
    __slots__ = ("cluster", "entry")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    entry: AccessEntry
    def __init__(self, cluster: _Optional[str] = ..., entry: _Optional[_Union[AccessEntry, _Mapping]] = ...) -> None: ...

class GetAccessRequest(_message.Message):
    __slots__ = ("cluster",)
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    def __init__(self, cluster: _Optional[str] = ...) -> None: ...

class AccessList(_message.Message):
    __slots__ = ("cluster", "entries")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    entries: _containers.RepeatedCompositeFieldContainer[AccessEntry]
    def __init__(self, cluster: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[AccessEntry, _Mapping]]] = ...) -> None: ...

class Credential(_message.Message):
    __slots__ = ("id", "device", "created_unix", "last_used_unix", "expires_unix")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    id: str
    device: str
    created_unix: int
    last_used_unix: int
    expires_unix: int
    def __init__(self, id: _Optional[str] = ..., device: _Optional[str] = ..., created_unix: _Optional[int] = ..., last_used_unix: _Optional[int] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class ListCredentialsRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: str
    def __init__(self, user: _Optional[str] = ...) -> None: ...

class ListCredentialsResponse(_message.Message):
    __slots__ = ("credentials",)
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[Credential]
    def __init__(self, credentials: _Optional[_Iterable[_Union[Credential, _Mapping]]] = ...) -> None: ...

class RevokeCredentialRequest(_message.Message):
    __slots__ = ("user", "id")
    USER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    user: str
    id: str
    def __init__(self, user: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class RevokeCredentialResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateSigningKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateSigningKeyResponse(_message.Message):
    __slots__ = ("kid", "published_kids")
    KID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_KIDS_FIELD_NUMBER: _ClassVar[int]
    kid: str
    published_kids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kid: _Optional[str] = ..., published_kids: _Optional[_Iterable[str]] = ...) -> None: ...
