"""Revocation follows the store: a change of a user, an access list or a cluster, made at any replica,
ends this replica's open connections that it no longer admits.

The Store tells of every change (``subscribe``); the changes of one commit arrive together, in one
turn of the event loop, so they are gathered and rechecked once, right after: a user removed with
their hundred credentials, or a cluster removed with its access list, is one recheck, and each
cluster's access list is read once per recheck, not once per connection.
"""

from __future__ import annotations

import asyncio

from clusterconnect.logs import get_logger
from clusterconnect.relay.datapath.connections import ConnectionRegistry, OpenConnection
from clusterconnect.relay.storage.clusters import ClusterStore
from clusterconnect.relay.storage.store import Store
from clusterconnect.relay.user_identity.access import CLUSTERS, GRANTS, DialAuthorizer
from clusterconnect.relay.user_identity.users import USERS

log = get_logger(__name__)


class RevocationWatch:
    def __init__(self, store: Store, clusters: ClusterStore, authorizer: DialAuthorizer,
                 connections: ConnectionRegistry) -> None:
        self.clusters = clusters
        self.authorizer = authorizer
        self.connections = connections
        self._users: set[str] = set()  # names whose record changed
        self._uids: set[str] = set()  # cluster registrations whose access list changed
        self._names: set[str] = set()  # clusters whose record changed (removed, registered again)
        self._due = False
        store.subscribe(USERS, lambda key, _: self._note(self._users, key[len(USERS):]))
        store.subscribe(GRANTS, lambda key, _: self._note(self._uids, key[len(GRANTS):].partition("/")[0]))
        store.subscribe(CLUSTERS, lambda key, _: self._note(self._names, key[len(CLUSTERS):]))

    def _note(self, changed: set[str], what: str) -> None:
        changed.add(what)
        if not self._due:
            self._due = True
            # After the commit's other changes (same turn of the loop), before anything else runs long.
            asyncio.get_running_loop().call_soon(self.recheck)

    @property
    def pending(self) -> bool:
        """Changes have arrived whose recheck has not run yet (it runs in the loop's next turn)."""
        return self._due

    def recheck(self) -> int:
        """End the open connections the changes gathered since the last recheck no longer admit."""
        users, uids, names = self._users, self._uids, self._names
        self._users, self._uids, self._names, self._due = set(), set(), set(), False
        if uids:
            names |= {c.name for c in self.clusters.list() if c.uid in uids}
        refusal = self.authorizer.refusals()

        def concerned(connection: OpenConnection) -> str | None:
            caller = connection.caller
            if connection.cluster in names or (caller is not None and caller.username in users):
                return refusal(connection.cluster, caller)
            return None

        ended = self.connections.revoke_where(concerned)
        if ended:
            log.info("open connections ended by revocation", connections=ended, users=sorted(users),
                     clusters=sorted(names))
        return ended
