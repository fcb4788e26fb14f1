"""The admin role and the Registry API (clusters added, listed, removed)."""
