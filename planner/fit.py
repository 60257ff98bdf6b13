"""Least-squares fits of timing models, with their error measured on held-out points.

`fit_linear(features, points)` fits y ≈ Σ c_i * feature_i (feature "1" is the intercept) to
points ({feature: value, ..., "y": seconds}), minimising the squared *relative* error (each
row weighted by 1/y): step times span orders of magnitude, and a fit that is 10% off on a
1 ms decode step matters as much as one 10% off on a 1 s prefill.

The reported error is leave-one-out: each point predicted by the fit on all the others, so it
is what the model does on a point it has not seen (`rel_rmse`). `max_rel_error` is the
largest relative error of the final fit (all points) over the points it was fitted on. Exact
data give exact coefficients (to rounding) and zero error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from router.timing_profile import LinearModel, ProfileError


def _design(features: Sequence[str], points: Sequence[Mapping[str, float]]) -> np.ndarray:
    return np.array([[1.0 if f == "1" else float(p[f]) for f in features] for p in points])


def _solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    w = 1.0 / y  # relative error (y > 0, checked by the caller)
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    return coef


def fit_linear(features: Sequence[str], points: Sequence[Mapping[str, float]]) -> LinearModel:
    """See module doc. Needs more points than features and every y > 0."""
    features = tuple(features)
    if len(points) <= len(features):
        raise ProfileError(f"fitting {list(features)} needs more than {len(features)} points, "
                           f"got {len(points)}")
    missing = {f for p in points for f in (*features, "y") if f != "1" and f not in p}
    if missing:
        raise ProfileError(f"points lack the features {sorted(missing)}")
    x = _design(features, points)
    y = np.array([float(p["y"]) for p in points])
    if not np.all(y > 0) or not np.all(np.isfinite(x)):
        raise ProfileError("every measured time must be positive and every feature finite")
    held_out = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        coef_i = _solve(x[keep], y[keep])
        held_out.append((float(x[i] @ coef_i) - y[i]) / y[i])
    coef = _solve(x, y)
    rel = np.abs(x @ coef - y) / y
    return LinearModel(features, tuple(float(c) for c in coef),
                       rel_rmse=math.sqrt(float(np.mean(np.square(held_out)))),
                       max_rel_error=float(rel.max()), n_points=len(y))
