"""Who a user is: the built-in OIDC issuer, its users, and the per-cluster access lists checked on Dial."""
