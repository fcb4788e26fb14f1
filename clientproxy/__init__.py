"""The client proxy: a local HTTPS endpoint for kubectl; each connection becomes a ClientTunnel.Dial stream."""
