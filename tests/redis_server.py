"""Real redis-server for tests: the `redis_port` session fixture (one server for the whole run;
tests keep apart by key namespace). Import it into a test module, or list this module in a
conftest's `pytest_plugins`. The process helpers live in launcher/redis_local.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from launcher.redis_local import (  # noqa: F401  (re-exported for tests)
    REDIS_SERVER,
    SKIP_REASON,
    RedisTLS,
    free_port,
    ping,
    running_redis_server,
    start_redis_server,
    stop_redis_server,
)


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a redis-server on 127.0.0.1 shared by the session; skips without the binary."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    port, proc = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield port
    stop_redis_server(proc)
