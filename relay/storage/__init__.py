"""What the relay keeps: the cluster registry and the SQLite file every store opens the same way."""
