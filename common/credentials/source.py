"""A login's token for a long-running process (the client proxy), kept in memory between refreshes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from clusterconnect.credentials.expiry import fresh_enough
from clusterconnect.credentials.store import get_token


class CachedTokenSource:
    """``await source.get()`` is a token valid for a while yet; refreshed (in a thread) when it is not."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.state_dir = state_dir
        self.name = name
        self._token = ""
        self._expires = 0.0
        self._obtained = 0.0
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return bool(self._token) and fresh_enough(self._expires, self._obtained, time.time())

    def cached(self) -> str | None:
        """The token if it is still good for a while, without waiting; None if it must be refreshed."""
        return self._token if self._fresh() else None

    async def get(self) -> str:
        if self._fresh():
            return self._token
        async with self._lock:
            if not self._fresh():
                obtained = time.time()
                token, expires = await asyncio.to_thread(get_token, self.state_dir, self.name)
                self._token, self._expires, self._obtained = token, float(expires), obtained
        return self._token
