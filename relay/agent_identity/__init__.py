"""Who an agent is: join tokens, the agent CA, client certificates for exactly one cluster."""
