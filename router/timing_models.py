"""The router's online timing models, learnt from each worker's observed timings.

- `TimingModel`: y ≈ a + b*x by exponentially weighted least squares with a decaying prior
  (a prefill worker's service time against the tokens in flight; a decode worker's step time
  against its batch size), with `spread`, the typical error of its predictions.
- `Throughput`: work per second of busy time, a ratio of two sums that forget with a
  half-life (a prefill worker's uncached tokens brought to their first token per second).

Both ignore non-finite observations and never predict a negative time. Pure arithmetic: no
clock, no I/O, no locks (`router/slo.py` owns them on its event loop).

A `TimingModel`'s fitted state reads and writes the timing profile format
(router/timing_profile.py): `export` gives a `LinearModel`, `from_linear` starts a model from
one (a profile's fit becomes the prior the online fit starts from).
"""

from __future__ import annotations

import math

from router.timing_profile import LinearModel


class TimingModel:
    """y ≈ a + b*x, fitted online by exponentially weighted least squares.

    Every observation first multiplies the weight of all earlier ones (and of the prior) by
    `decay`, so the fit follows a worker whose speed changes. The prior (a0, b0) counts as
    `prior_weight` pseudo-observations centred on the data, so one odd timing moves the
    prediction only part of the way; its weight decays like any observation, so the data win.
    Observed x all equal: the slope is not identifiable, so it stays at b0 and only the level
    is fitted. `predict` never returns a negative time.
    """

    def __init__(self, a0: float, b0: float, decay: float = 0.9, *, prior_weight: float = 2.0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self.a0, self.b0, self.decay = float(a0), float(b0), float(decay)
        self.n = 0
        self._prior = float(prior_weight)
        # Weighted sums of 1, x, y, x*x, x*y over the observations.
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._sq_err = 0.0  # weighted sum of squared prediction errors
        self._a, self._b = self.a0, self.b0

    @property
    def a(self) -> float:
        return self._a

    @property
    def b(self) -> float:
        return self._b

    def observe(self, x: float, y: float) -> None:
        x, y = float(x), float(y)
        if not (math.isfinite(x) and math.isfinite(y)):
            return  # one NaN would poison the sums for good
        d = self.decay
        err = y - self.predict(x)
        self._sq_err = self._sq_err * d + err * err
        self._prior *= d
        self._w = self._w * d + 1.0
        self._sx = self._sx * d + x
        self._sy = self._sy * d + y
        self._sxx = self._sxx * d + x * x
        self._sxy = self._sxy * d + x * y
        self.n += 1
        self._refit()

    def predict(self, x: float) -> float:
        return max(0.0, self._a + self._b * x)

    @property
    def spread(self) -> float:
        """Root mean square of the errors the model made predicting each observation before
        learning it (weighted like the fit): how far off a prediction is, typically."""
        return math.sqrt(self._sq_err / self._w) if self._w else 0.0

    def _refit(self) -> None:
        w, p = self._w, self._prior
        mx = self._sx / w
        sxx_c = self._sxx - self._sx * mx  # weighted sum of squares about the mean
        sxy_c = self._sxy - self._sy * mx
        # Relative threshold: with equal x the centred sum is rounding noise, and once the prior
        # has decayed to nothing noise/noise would be an arbitrary slope.
        if sxx_c <= 1e-9 * self._sxx:
            b = self.b0
        else:
            # Ridge towards b0, scaled by the data's second moment so the prior counts as p
            # pseudo-observations whatever the units of x.
            k = p * self._sxx / w
            b = (sxy_c + k * self.b0) / (sxx_c + k)
        level = (self._sy + p * (self.a0 + self.b0 * mx)) / (w + p)  # fitted y at x = mx
        self._a, self._b = level - b * mx, b

    def as_dict(self) -> dict[str, float | int]:
        return {"a": self._a, "b": self._b, "spread": self.spread, "n": self.n}

    def export(self, x_feature: str) -> LinearModel:
        """The fitted line as a profile model in `x_feature`. Its relative error is `spread`
        over the (weighted) mean observed y: the online errors are measured before each
        observation is learnt, so they are held-out errors. No points are kept, so the
        largest error is unknown (None)."""
        mean_y = self._sy / self._w if self._w else 0.0
        rel = self.spread / mean_y if mean_y > 0 else 0.0
        return LinearModel(("1", x_feature), (self._a, self._b), rel_rmse=rel,
                           max_rel_error=None, n_points=self.n)

    @classmethod
    def from_linear(cls, model: LinearModel, x_feature: str, decay: float = 0.9, *,
                    prior_weight: float = 2.0) -> TimingModel:
        """A model whose prior is `model`'s intercept and `x_feature` slope. The online model
        is a line in one x: `model`'s other terms (e.g. a profile's attention term) are left
        out, so import a model fitted in that x for exact agreement."""
        return cls(model.coefficient("1"), model.coefficient(x_feature), decay,
                   prior_weight=prior_weight)


class Throughput:
    """Work units per second of busy time: the ratio of two sums that forget with a half-life
    of busy time, starting from a prior rate worth `prior_s` busy seconds.

    A ratio of sums, not a fit per observation: work is completed in batches, so single
    intervals between completions say little (a batch's first completion carries its whole
    time, the rest none), while the sums over many are the throughput.
    """

    def __init__(self, prior_rate: float, *, prior_s: float = 0.01, half_life_s: float = 30.0):
        if prior_rate <= 0 or prior_s <= 0 or half_life_s <= 0:
            raise ValueError(f"prior_rate={prior_rate}, prior_s={prior_s} and "
                             f"half_life_s={half_life_s} must all be positive")
        self.half_life_s = float(half_life_s)
        self.n = 0
        self._work, self._seconds = prior_rate * prior_s, float(prior_s)

    @property
    def rate(self) -> float:
        return self._work / self._seconds

    def observe(self, work: float, busy_s: float) -> None:
        """`work` completed over `busy_s` more seconds of busy time."""
        if not (math.isfinite(work) and math.isfinite(busy_s)) or work < 0 or busy_s < 0:
            return  # one NaN or negative would poison the sums for good
        keep = 0.5 ** (busy_s / self.half_life_s)
        self._work = self._work * keep + work
        self._seconds = self._seconds * keep + busy_s
        self.n += 1

    def as_dict(self) -> dict[str, float | int]:
        return {"rate": self.rate, "n": self.n}
