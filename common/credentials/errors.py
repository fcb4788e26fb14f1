"""The one error of the credential store."""

from __future__ import annotations

from clusterconnect.errors import Unauthenticated


class LoginError(Unauthenticated):
    """No usable credential; the message tells the user what to do (e.g. log in again)."""
