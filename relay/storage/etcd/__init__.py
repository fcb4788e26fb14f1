"""The relay's store on etcd v3: a small client (client.py), a watch-fed cache (cache.py), generated stubs (api/)."""
