"""The relay: registry of clusters, agent sessions, and the splice between Dial and Accept streams."""
