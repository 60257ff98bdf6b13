"""What the cluster-level test modules share: a Ray session, a tiny model with a tokenizer,
and the no-leak check over every worker's block accounting."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import add_tiny_tokenizer, make_tiny_checkpoint


def tiny_model(path: Path, seed: int) -> Path:
    make_tiny_checkpoint("llama", path, seed=seed)
    add_tiny_tokenizer(path)
    return path


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """A local Ray for the module (reused if one is up); shut down only if started here."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def wait_idle(cluster, timeout_s: float = 20.0) -> None:
    """Every worker's blocks back on its free list (cached blocks count as free) and no
    request left anywhere; fails with what is still held."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        reports = {wid: ray.get(a.check_integrity.remote())
                   for wid, a in [*cluster.prefill.items(), *cluster.decode.items()]}
        held = {wid: r for wid, r in reports.items()
                if r.free_blocks != r.num_blocks or r.requests or r.jobs}
        if not held:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"blocks or requests still held: {held}")
        time.sleep(0.1)
