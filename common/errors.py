"""The one error hierarchy: every error this project raises on purpose is a ClusterConnectError.

An error that reaches a user carries how it is reported there: the exit code of a command, the gRPC
status of an RPC, the HTTP status of a response. Callers catch these classes, never ``ValueError``
(a broad ``except ValueError`` would swallow a programming error along with them) and never match
message text: the class says what happened, the message says it to a person.
"""

from __future__ import annotations

import grpc


class ClusterConnectError(Exception):
    """Root of the hierarchy. The message is one line, fit to show a user as it is."""

    exit_code: int = 1
    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidInput(ClusterConnectError):
    """A name, flag or request that can never succeed as given."""

    exit_code = 2
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(ClusterConnectError):
    grpc_status = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(ClusterConnectError):
    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class Unauthenticated(ClusterConnectError):
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(ClusterConnectError):
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class Unavailable(ClusterConnectError):
    """Something needed is not there right now; trying again later may work."""

    grpc_status = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class StartupError(ClusterConnectError):
    """A configuration or environment problem found at start: reported as one line, exit code 2."""

    exit_code = 2
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ClusterConnectError):
    """Too many attempts or connections right now: a limit of the service, not a fault of the request."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
