"""The timing profile: fitted linear timing models of one deployment, as versioned JSON.

One format for every producer and consumer: `pdserve profile` writes it from a sweep of the
engine on this hardware (planner/profile.py), the router's online `TimingModel`s export their
fitted state in it (`TimingModel.export` / `from_linear`, and `SLOScheduler.timing_profile`
for a live cluster), and the planner's simulator reads it.

A `LinearModel` is y ≈ Σ coef_i * feature_i over named features ("1" is the intercept), with
the fit error it was measured to have. The feature names are a small shared vocabulary:

- prefill step:  "uncached_tokens" (prompt tokens computed in the step),
                 "uncached_x_context" (Σ over chunks of chunk tokens × the context they attend
                 to: the attention term);
- decode step:   "batch_size", "context_tokens" (Σ of the decoding sequences' lengths);
- mixed step:    both sets (prefill chunks riding with decodes);
- KV transfer:   "bytes" (one request's KV), per transport;
- cluster-learnt prefill: "tokens_in_flight" (router/slo.py's service model: grant to first
                 token against the uncached tokens in flight on the worker).

Contract: `from_json(to_json(p)) == p`; `from_json` raises `ProfileError` saying what is wrong
(bad JSON, another version, a model whose coefficients do not match its features). Times are
seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pdserve_api.errors import ConfigError

PROFILE_VERSION = 1


class ProfileError(ConfigError):
    """A profile that cannot be read or used; str() says why (the CLI prints it)."""


@dataclass(frozen=True)
class LinearModel:
    """y ≈ Σ coef[i] * value(features[i]); "1" is the constant feature.

    Fit error (relative to the measured y): `rel_rmse` on held-out points (the honest
    figure), `max_rel_error` the largest over every measured point (None where no points were
    kept: an online model), `n_points` how many."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    rel_rmse: float = 0.0
    max_rel_error: float | None = 0.0
    n_points: int = 0

    def __post_init__(self) -> None:
        if len(self.features) != len(self.coef) or not self.features:
            raise ProfileError(f"model has features {list(self.features)} but coefficients "
                               f"{list(self.coef)}: one coefficient per feature, at least one")
        if not all(math.isfinite(c) for c in self.coef):
            raise ProfileError(f"model coefficients {list(self.coef)} are not all finite")

    def predict(self, values: Mapping[str, float]) -> float:
        """Never negative. `values` may hold more features than the model uses; a feature the
        model uses and `values` lacks is an error (the model was fitted on something else)."""
        total = 0.0
        for name, c in zip(self.features, self.coef):
            if name == "1":
                total += c
            elif name in values:
                total += c * values[name]
            else:
                raise ProfileError(f"model needs feature {name!r}; given {sorted(values)}")
        return max(0.0, total)

    def coefficient(self, name: str) -> float:
        return self.coef[self.features.index(name)] if name in self.features else 0.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LinearModel:
        try:
            return cls(tuple(str(f) for f in raw["features"]),
                       tuple(float(c) for c in raw["coef"]),
                       float(raw.get("rel_rmse", 0.0)),
                       None if raw.get("max_rel_error") is None
                       else float(raw["max_rel_error"]),
                       int(raw.get("n_points", 0)))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"bad model {dict(raw)!r}: {e}") from e


@dataclass(frozen=True)
class Profile:
    """Timing models of one model on one kind of worker (see module doc).

    `points` keeps the measured points per model ({"prefill": [{feature: value, ..., "y": s}],
    ...}) so a reader can check the fits or refit; it may be empty (a cluster export)."""

    model: str
    source: str  # "sweep" (pdserve profile) or "cluster" (a live router's online models)
    block_size: int
    kv_pool_blocks: int | None  # blocks per worker for the configured KV memory; None: unknown
    kv_bytes_per_token: int  # one token's K and V over all layers (a transfer); 0: unknown
    prefill: LinearModel | None = None
    decode: LinearModel | None = None
    mixed: LinearModel | None = None
    transfer: dict[str, LinearModel] = field(default_factory=dict)  # by transport
    points: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    hardware: str = ""
    notes: str = ""
    version: int = PROFILE_VERSION

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.kv_bytes_per_token < 0:
            raise ProfileError(f"block_size {self.block_size} must be >= 1 and "
                               f"kv_bytes_per_token {self.kv_bytes_per_token} >= 0")
        if self.kv_pool_blocks is not None and self.kv_pool_blocks < 1:
            raise ProfileError(f"kv_pool_blocks must be >= 1, got {self.kv_pool_blocks}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ProfileError("profile JSON must be an object")
        version = raw.get("version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"profile version {version!r} is not {PROFILE_VERSION}; "
                               "re-run `pdserve profile`")

        def model(key: str) -> LinearModel | None:
            m = raw.get(key)
            return None if m is None else LinearModel.from_dict(m)

        try:
            return cls(
                model=str(raw["model"]), source=str(raw["source"]),
                block_size=int(raw["block_size"]),
                kv_pool_blocks=(None if raw.get("kv_pool_blocks") is None
                                else int(raw["kv_pool_blocks"])),
                kv_bytes_per_token=int(raw["kv_bytes_per_token"]),
                prefill=model("prefill"), decode=model("decode"), mixed=model("mixed"),
                transfer={str(k): LinearModel.from_dict(v)
                          for k, v in (raw.get("transfer") or {}).items()},
                points={str(k): [{str(f): float(x) for f, x in p.items()} for p in v]
                        for k, v in (raw.get("points") or {}).items()},
                hardware=str(raw.get("hardware", "")), notes=str(raw.get("notes", "")),
                version=PROFILE_VERSION)
        except KeyError as e:
            raise ProfileError(f"profile lacks the field {e.args[0]!r}") from e
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"bad profile: {e}") from e
