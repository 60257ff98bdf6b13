"""Build the prefix index a cluster's URL asks for (the launcher's and the workers' entry)."""

from __future__ import annotations

from typing import Any

from prefix_index.in_process import InProcessPrefixIndex
from prefix_index.interface import PrefixIndex
from prefix_index.redis_index import RedisPrefixIndex


def make_prefix_index(url: str | None, *, verify: bool = True, **kwargs: Any) -> PrefixIndex:
    """Redis index for a redis:// or rediss:// URL; the in-process one for None or "".

    `verify` asks Redis once (`RedisPrefixIndex.verify`): ConfigError when it refuses the
    credentials or the TLS handshake; an unreachable Redis only degrades, as at any time.
    """
    if not url:
        return InProcessPrefixIndex()
    index = RedisPrefixIndex(url, **kwargs)
    if verify:
        try:
            index.verify()
        except BaseException:
            index.close()
            raise
    return index
