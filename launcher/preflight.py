"""What every worker's engine would refuse, refused by the launcher before any actor starts.

A worker that refuses its config dies in its Ray constructor, and the user sees an
`ActorDiedError` traceback per worker; the same check here is one `ConfigError` naming the
flag, which `pdserve` prints as one line. Contract: `check_engine_config` raises ConfigError
exactly when the engines would (the checks are the engine's own functions, run on the
launcher's copy of the model config), and never starts anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import EngineConfig, ModelConfig, resolve_max_model_len
from pdserve_api.errors import ConfigError


def check_engine_config(engine: dict[str, Any], model_path: Path, model_cfg: ModelConfig,
                        tp_sizes: dict[str, int]) -> None:
    """`engine`: the EngineConfig fields every worker gets; `tp_sizes`: the tensor-parallel
    size of each pool that has workers, keyed by its flag (e.g. "--prefill-tp")."""
    config = EngineConfig(**{**engine, "model": str(model_path)})  # field checks
    resolve_max_model_len(model_cfg, config)
    for flag, tp in tp_sizes.items():
        # Attention heads and MLP columns are split evenly across ranks (engine/parallel.py).
        for name, size in (("num_attention_heads", model_cfg.num_heads),
                           ("intermediate_size", model_cfg.intermediate_size)):
            if size % tp:
                raise ConfigError(f"{name} {size} is not divisible by {flag} {tp}")
