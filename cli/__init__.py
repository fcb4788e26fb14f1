"""The clusterconnect command line: user and admin commands."""
