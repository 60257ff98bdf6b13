from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep torch from oversubscribing the 2-core CI box when pytest and torch both spawn threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Triton kernels run under the interpreter without a GPU. The flag must be set before triton
# is first imported anywhere in the process, so it is set here, before any test module loads.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny random-init checkpoint per supported family, written by transformers."""
    from tiny_models import FAMILIES, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_checkpoint(fam, root / fam, seed=i)
            for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]
