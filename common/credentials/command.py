"""A login whose token comes from a command (``az account get-access-token ... -o json``, ``gcloud ...``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import time

from clusterconnect.credentials.errors import LoginError
from clusterconnect.credentials.expiry import UNKNOWN_EXPIRY_CACHE, jwt_expiry
from clusterconnect.credentials.records import CommandLogin

COMMAND_TIMEOUT = 60.0


def run_command(login: CommandLogin) -> tuple[str, int]:
    """Run the command (no shell) and read its token: plain text, or JSON as az and others print it."""
    argv = shlex.split(login.command)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoginError(f"token command failed: {exc}") from None
    if result.returncode != 0:
        raise LoginError(f"token command exited with {result.returncode}: {result.stderr.strip()[:300]}")
    output = result.stdout.strip()
    token, expires = output, None
    try:
        document = json.loads(output)
    except ValueError:
        document = None
    if isinstance(document, dict):  # az: accessToken/expires_on; others: access_token/token
        token = document.get("accessToken") or document.get("access_token") or document.get("token") or \
            document.get("id_token") or document.get("status", {}).get("token") or ""
        for key in ("expires_on", "expiresOn", "expires_unix"):
            value = document.get(key)
            if isinstance(value, (int, float)) or (isinstance(value, str) and value.isdigit()):
                expires = int(value)
                break
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise LoginError("token command printed no token")
    return token, jwt_expiry(token) or expires or int(time.time()) + UNKNOWN_EXPIRY_CACHE
