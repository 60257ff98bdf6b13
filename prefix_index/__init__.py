"""Prefix-cache index: which worker holds which chained block hash (DESIGN: request path step 2).

- `interface.py`: the `PrefixIndex` contract, and netting block events into changes.
- `in_process.py`: one process, no Redis (a single router; the tests' reference).
- `redis_index.py`: in Redis, shared by a cluster's routers and workers; degrades, never raises.
- `lua.py`: the Redis key layout and the scripts that keep it (one round trip per call).
- `url.py`: a Redis URL's TLS options, and redaction for logs.
- `factory.py`: `make_prefix_index(url)`, the one a launcher or worker builds.
"""
